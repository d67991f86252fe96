"""How much memory a recipe takes per process, and how many bytes its processes exchange per
step: `mr1fast plan --config FILE --nproc N [--gpu-gb G]` (and one line when a run starts).

Estimates from the model's dimensions (its config; the paper's hub models also without the
hub, HUB_DIMENSIONS) and the recipe, not measurements. Per process:
- one process: the weights in the model dtype, fp32 master copies (bf16 models), gradients,
  AdamW's two fp32 moments, the frozen reference in the model dtype;
- N processes (FSDP2): fp32 master, gradient and AdamW shards (1/N each), the reference's
  shard, and the largest unit gathered at once (the root: embeddings and LM head) with its
  unsharded gradient; generation runs on an unsharded replica in the model dtype;
- the sampler: vLLM's share of the GPU (vllm.gpu_memory_utilization) when sampler=vllm;
- the loss: the bounded dlogits scratch (256 MiB) and the completion hidden states;
- activations of one micro-batch: ~34 bytes x hidden size per token and layer at 2-byte
  activations (Megatron-LM's count, without the attention-score term that FlashAttention and
  SDPA avoid), or with gradient checkpointing each layer's input plus one layer recomputed;
  the vision tower's likewise when it trains.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import Config
from .errors import UserError, human_bytes
from .model import HUB_DIMENSIONS, PRESETS, SPECIAL_TOKENS, preset_config

GB = 10**9  # GPU memory is sold in GB: an "80 GB" GPU holds 74.5 GiB
SCRATCH_BYTES = 256 << 20  # the fused loss's dlogits scratch (kernels/token_logprobs.py)


@dataclass
class Shape:
    params: int          # every parameter (a tied LM head once)
    vision: int          # the vision tower's
    root: int            # the FSDP root unit's: embeddings, LM head, norm, patch embed, merger
    lm_head: int         # V x d
    hidden: int
    layers: int
    vision_embed: int
    vision_depth: int
    tied: bool


def model_shape(name_or_path: str) -> Shape:
    """The dimensions of a model (a local folder, a preset, or a hub id), counted on the meta
    device: no weights are read."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    if name_or_path in PRESETS or name_or_path in HUB_DIMENSIONS:
        preset = HUB_DIMENSIONS.get(name_or_path, name_or_path)
        config = preset_config(preset, {t: i for i, t in enumerate(SPECIAL_TOKENS)}, 1024)
    else:
        try:
            config = AutoConfig.from_pretrained(name_or_path)
        except (OSError, ValueError) as e:
            raise UserError(f"model.name={name_or_path!r}: its config cannot be read for the "
                            f"plan ({str(e).splitlines()[0] if str(e) else type(e).__name__})",
                            fix="give a local checkpoint folder, a preset or one of "
                                f"{sorted(HUB_DIMENSIONS)}") from None
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(config)
    inner = model.model
    in_units = {id(p) for unit in [*inner.language_model.layers, *inner.visual.blocks]
                for p in unit.parameters()}
    text = config.text_config if hasattr(config, "text_config") else config
    head = model.get_output_embeddings().weight
    return Shape(params=sum(p.numel() for p in model.parameters()),
                 vision=sum(p.numel() for p in inner.visual.parameters()),
                 root=sum(p.numel() for p in model.parameters() if id(p) not in in_units),
                 lm_head=head.numel(), hidden=text.hidden_size,
                 layers=text.num_hidden_layers, vision_embed=config.vision_config.embed_dim,
                 vision_depth=config.vision_config.depth,
                 tied=bool(getattr(config, "tie_word_embeddings", False)))


def memory_plan(cfg: Config, nproc: int, shape: Shape, gpu_gb: float) -> list[tuple[str, float]]:
    """(what, bytes) per process for the GRPO recipe `cfg` on `nproc` processes, at the worst
    case (every prompt and completion at its maximum length). The micro-batch, in completions:
    grpo.micro_batch_size (padded) or as many as grpo.max_tokens_per_micro_batch positions hold
    (packed layouts); with 0, the largest that fits `gpu_gb` (the whole local batch, halved
    until it fits or is 1: what the trainer does on out-of-memory errors)."""
    g = cfg.grpo
    local_seqs = g.prompts_per_step * g.num_generations // nproc
    packed = cfg.model.packing != "padded"
    size = g.max_tokens_per_micro_batch if packed else g.micro_batch_size
    if size <= 0:
        micro = local_seqs
    elif packed:
        micro = max(1, min(local_seqs, int(size // positions_per_completion(cfg))))
    else:
        micro = min(size, local_seqs)
    while True:
        rows = _rows(cfg, nproc, shape, gpu_gb, micro)
        if size > 0 or micro == 1 or sum(b for _, b in rows) <= gpu_gb * GB:
            return rows
        micro //= 2


def positions_per_completion(cfg: Config) -> float:
    """The positions one completion costs in a micro-batch of the layout model.packing, at the
    maximum lengths: its prompt and itself (padded, packed), or its share of its group's one
    prompt (shared_prefix)."""
    P, C = cfg.data.max_prompt_length, cfg.grpo.max_completion_length
    return P / cfg.grpo.num_generations + C if cfg.model.packing == "shared_prefix" else P + C


def _rows(cfg: Config, nproc: int, shape: Shape, gpu_gb: float, micro: int) -> list:
    g, m = cfg.grpo, cfg.model
    compute = 4 if m.dtype == "fp32" else 2  # auto is bf16 on the GPUs this plans for
    trainable = shape.params - (shape.vision if m.freeze_vision else 0)
    rows = []
    if nproc == 1:
        rows.append(("weights (model dtype)", shape.params * compute))
        if compute == 2:
            rows.append(("fp32 master weights", trainable * 4))
        rows.append(("gradients (model dtype)", trainable * compute))
        rows.append(("AdamW moments (fp32)", trainable * 8))
    else:
        rows.append(("fp32 master weight shards", shape.params * 4 / nproc))
        rows.append(("fp32 gradient shards", trainable * 4 / nproc))
        rows.append(("AdamW moment shards (fp32)", trainable * 8 / nproc))
        # The root unit gathered in the compute dtype, and its gradient before the
        # fp32 reduce-scatter.
        rows.append(("largest unit gathered (root: embeddings, LM head)",
                     shape.root * (compute + 4)))
        rows.append(("generation replica (model dtype)", shape.params * compute))
    if _needs_reference(cfg):
        shard = 0 if nproc > 1 and cfg.dist.reference == "offload" else 1
        rows.append(("reference model" + (" shard" if nproc > 1 else ""),
                     shard * shape.params * compute / nproc))
    if cfg.sampler == "vllm" or cfg.sampler == "auto":
        rows.append(("vLLM engine (vllm.gpu_memory_utilization of the GPU)",
                     cfg.vllm.gpu_memory_utilization * gpu_gb * GB))
    seq = cfg.data.max_prompt_length + g.max_completion_length
    tokens = int(micro * positions_per_completion(cfg))
    rows.append(("loss scratch and completion hidden states",
                 SCRATCH_BYTES + micro * g.max_completion_length * shape.hidden * 4))
    per_layer = 17 * shape.hidden * compute  # Megatron-LM: 34 * h bytes at 2-byte activations
    if m.gradient_checkpointing:
        act = tokens * (shape.layers * shape.hidden * compute + per_layer)
    else:
        act = tokens * shape.layers * per_layer
    if not m.freeze_vision:  # ~4 patches per image token, before the merger; each prompt's
        # images once per micro-batch
        prompts = -(-micro // g.num_generations) if m.packing == "shared_prefix" else micro
        patches = 4 * prompts * cfg.data.max_prompt_length
        vision_layer = 17 * shape.vision_embed * compute
        act += patches * (shape.vision_depth * shape.vision_embed * compute + vision_layer
                          if m.gradient_checkpointing else shape.vision_depth * vision_layer)
    layout = f"micro-batch of {micro} x {seq} tokens" if m.packing == "padded" else \
        f"micro-batch of {micro} completions, {tokens} positions {m.packing}"
    rows.append((f"activations ({layout}"
                 f"{', checkpointed' if m.gradient_checkpointing else ''})", act))
    return rows


def _needs_reference(cfg: Config) -> bool:
    from .config import kl_schedule

    beta_at = kl_schedule(cfg.grpo.beta_schedule, 100)
    return any(beta_at(k) > 0 for k in range(101))


def communication(cfg: Config, nproc: int, shape: Shape, micro: int) -> dict:
    """Bytes each process receives per optimizer step, by estimate (ring collectives: (N-1)/N of
    the full size). `fsdp`: every all-gather (forward, and again in backward) and the fp32
    reduce-scatter of the gradients, over the step's passes; and for the LM head alone, the
    two ways the fused loss can run sharded: `lm_head_gathered` (FSDP gathers the V x d weight,
    as today) and `lm_head_vocab_parallel` (each rank keeps its vocabulary shard and exchanges
    the completion hidden states, the log-sum-exp partials and dH instead)."""
    g, m = cfg.grpo, cfg.model
    if nproc < 2:
        return {"fsdp": 0.0, "lm_head_gathered": 0.0, "lm_head_vocab_parallel": 0.0}
    ring = (nproc - 1) / nproc
    compute = 4 if m.dtype == "fp32" else 2
    trainable = shape.params - (shape.vision if m.freeze_vision else 0)
    local_seqs = g.prompts_per_step * g.num_generations // nproc
    n_micro = -(-local_seqs // micro)
    updates = g.updates_per_batch
    extra_forwards = n_micro * ((updates > 1) + _needs_reference(cfg))
    train_passes = n_micro * updates
    fsdp = ring * (train_passes * (2 * shape.params * compute + trainable * 4)
                   + extra_forwards * shape.params * compute
                   + trainable * 4)  # the replica's refresh, one fp32 gather per parameter
    head = shape.lm_head
    gathered = ring * (train_passes * (2 * head * compute + head * 4)
                       + extra_forwards * head * compute)
    tokens = micro * g.max_completion_length * nproc  # completion tokens of all ranks
    per_pass = tokens * shape.hidden * compute + tokens * 16  # hidden, partials and dlogp
    vocab_parallel = ring * (train_passes * (per_pass + tokens * shape.hidden * 4)
                             + extra_forwards * per_pass)
    if shape.tied:  # the tied embedding is gathered whole anyway, and its gradient reduced
        vocab_parallel += gathered
    return {"fsdp": fsdp, "lm_head_gathered": gathered,
            "lm_head_vocab_parallel": vocab_parallel}


def micro_batch(rows) -> int:
    """The micro-batch size a plan settled on (from its activations row)."""
    label = next(w for w, _ in rows if w.startswith("activations"))
    return int(label.split("micro-batch of ")[1].split()[0])


def format_plan(cfg: Config, nproc: int, shape: Shape, gpu_gb: float) -> str:
    rows = memory_plan(cfg, nproc, shape, gpu_gb)
    total = sum(b for _, b in rows)
    width = max(len(w) for w, _ in rows)
    lines = [f"memory per process: {cfg.model.name}, {shape.params / 1e9:.2f} B parameters, "
             f"{nproc} process{'es' if nproc > 1 else ''}"]
    lines += [f"  {w:<{width}}  {human_bytes(b):>10}" for w, b in rows]
    fits = total <= gpu_gb * GB
    lines.append(f"  {'total':<{width}}  {human_bytes(total):>10}  "
                 f"{'fits' if fits else 'does NOT fit'} a {gpu_gb:g} GB GPU")
    comm = communication(cfg, nproc, shape, micro_batch(rows))
    if nproc > 1:
        lines.append(f"received per optimizer step and process: FSDP {human_bytes(comm['fsdp'])}"
                     f"; of it the LM head {human_bytes(comm['lm_head_gathered'])} gathered, "
                     f"vs {human_bytes(comm['lm_head_vocab_parallel'])} vocabulary-parallel")
    return "\n".join(lines)


def fits(cfg: Config, nproc: int, shape: Shape, gpu_gb: float) -> bool:
    return sum(b for _, b in memory_plan(cfg, nproc, shape, gpu_gb)) <= gpu_gb * GB
