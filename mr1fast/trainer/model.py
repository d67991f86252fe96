"""Policy and reference models: loading Qwen2-VL / Qwen2.5-VL checkpoints, building the tiny
local model, encoding prompts, and the forward pass that stops at the LM head's input.

The trainer never runs the LM head through transformers: `completion_hidden` returns the final
hidden states of the completion positions only, and the loss (`grpo_loss` / `token_logprobs`)
takes them with `lm_head_weight(model)`, so no [B, T, V] logits exist. Images are encoded once
per prompt (`encode_images`) and the features are indexed for each of its G completions.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from ..rollout.sampler import PromptBatch
from .data import cache_path
from .errors import UserError
from .preflight import check_model

# Qwen2-VL's special tokens, in id order for the tiny model's tokenizer (ids 0..6).
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]

# Qwen2-VL's chat layout without its default system prompt (the tiny model has no use for it).
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}{% if part['type'] == 'image' %}"
    "<|vision_start|><|image_pad|><|vision_end|>{% elif part['type'] == 'text' %}"
    "{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# Text that teaches the tiny tokenizer the words it will meet (prompts, tags, numbers).
_TOKENIZER_CORPUS = [
    "How many objects are there? How many circles squares triangles are there?",
    "As shown in the figure, find the angle x in degrees.",
    "Output the thinking process in <think> </think> and final answer (number) in <answer> "
    "</answer> tags.",
    "<think> I count the objects one by one. </think> <answer> 3 </answer>",
    "<think> Let me look at the image. </think> <answer> 4 </answer>",
    "<think> The angles of a triangle sum to 180 degrees, so x = 180 - 50 - 60. </think> "
    "<answer>70°</answer>",
    " ".join(str(i) for i in range(0, 200)),
    "user assistant system red green blue yellow purple cyan grey the a of is are and so",
]

_TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
             num_attention_heads=2, num_key_value_heads=1, vision_depth=1, vision_embed_dim=64,
             vision_heads=2, vision_mlp_ratio=2, min_pixels=56 * 56, max_pixels=112 * 112)
# vocab_size is the tokenizer's (trained here); model_vocab, when given, widens the model's
# embedding and LM head beyond it (ids the tokenizer never makes, as in Qwen's padded vocab).
PRESETS = {
    # ~0.6 M parameters: 2 decoder layers (head_dim 32, the smallest vLLM's CPU attention
    # takes), a 1-block vision tower; a 112x112 image becomes 16 image tokens.
    "tiny": _TINY,
    # ~1.1 M parameters: the tiny model widened (hidden 128, 4 heads) with a 2-block vision
    # tower of width 128: the architecture of the embedded base (base.py, BASES), the smallest
    # measured that learns to count (docs/notes/embedded-base.md).
    "tiny-base": dict(_TINY, hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, vision_embed_dim=128, vision_heads=4,
                      vision_depth=2),
    # The tiny model with Qwen2-VL's vocabulary (151936): the LM head and the loss then take
    # their realistic share of a step (~9.7 M of its ~10 M parameters). For benchmarks; its
    # processor takes images up to 448x448 (256 image tokens), as R1-V's prompts have them.
    "tiny-v152k": dict(_TINY, model_vocab=151936, max_pixels=448 * 448),
    # ~5 M parameters whose decoder layers cost ~7.5x the LM head per position, as
    # Qwen2-VL-2B's cost ~5.6x (tiny-v152k is LM-head-bound: 2 layers of width 64 against
    # 151936 rows): the regime where the prompt's share of the positions sets the step's cost,
    # small enough for CPU benchmarks. 448x448 images.
    "small": dict(_TINY, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, model_vocab=2048,
                  max_pixels=448 * 448),
    # Qwen2-VL-2B-Instruct's dimensions (~2.2 B parameters) with random weights, saved in bf16:
    # GPU benchmarks without hub access. 448x448 images become 256 image tokens.
    "qwen2-vl-2b": dict(vocab_size=1024, model_vocab=151936, hidden_size=1536,
                        intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                        num_key_value_heads=2, vision_depth=32, vision_embed_dim=1280,
                        vision_heads=16, vision_mlp_ratio=4, min_pixels=56 * 56,
                        max_pixels=448 * 448, dtype="bfloat16"),
    # Qwen2-VL-7B-Instruct's dimensions (~8.3 B parameters, untied LM head), random weights.
    "qwen2-vl-7b": dict(vocab_size=1024, model_vocab=152064, hidden_size=3584,
                        intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                        num_key_value_heads=4, vision_depth=32, vision_embed_dim=1280,
                        vision_heads=16, vision_mlp_ratio=4, min_pixels=56 * 56,
                        max_pixels=448 * 448, dtype="bfloat16", tied=False),
}
# The paper's models by hub id -> the preset with their dimensions (planning without the hub).
HUB_DIMENSIONS = {"Qwen/Qwen2-VL-2B-Instruct": "qwen2-vl-2b",
                  "Qwen/Qwen2-VL-7B-Instruct": "qwen2-vl-7b"}


def resolve_model(name: str, cfg, log: Callable[[str], None] = print) -> str:
    """A preset name (PRESETS: tiny, tiny-v152k, tiny-base, small, qwen2-vl-2b, qwen2-vl-7b) is
    a random-weight Qwen2-VL built once into the cache (cfg.cache_dir, seed cfg.seed); a
    pre-trained base's name (base.BASES: embedded-base) is that base: its weights shipped with
    the package, else built once into the cache by its recipe (a few minutes on 2 cores);
    anything else is a hub id or a local path, passed through."""
    from .base import BASES, build_base
    if name in BASES:
        return str(build_base(name, cache_path(cfg.cache_dir), log))
    if name not in PRESETS:
        return name
    path = cache_path(cfg.cache_dir) / f"{name}-qwen2vl-seed{cfg.seed}"
    if not (path / "config.json").is_file():
        log(f"building the {name} model in {path}")
        init_tiny_model(path, preset=name, seed=cfg.seed)
    return str(path)


def init_tiny_model(out_dir: str | Path, preset: str = "tiny", seed: int = 0) -> Path:
    """Write a random-weight Qwen2-VL, a locally trained byte-level BPE tokenizer and an image
    processor to `out_dir`, in the Hugging Face layout that transformers and vLLM load offline.
    Atomic: built in a temporary folder, then renamed."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2VLForConditionalGeneration
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    if preset not in PRESETS:
        raise ValueError(f"preset={preset!r}: expected one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    out_dir = Path(out_dir)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=p["vocab_size"], special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}

    config = preset_config(preset, ids, len(tok))
    torch.manual_seed(seed)
    dtype = getattr(torch, p.get("dtype", "float32"))
    # The 2B-sized preset initializes on the GPU when there is one (minutes on CPU).
    build_on = "cuda" if dtype != torch.float32 and torch.cuda.is_available() else "cpu"
    with torch.device(build_on):
        model = Qwen2VLForConditionalGeneration(config).to(dtype)
    model.generation_config.eos_token_id = [ids["<|im_end|>"], ids["<|endoftext|>"]]
    model.generation_config.pad_token_id = ids["<|endoftext|>"]
    image_processor = Qwen2VLImageProcessorPil(min_pixels=p["min_pixels"],
                                               max_pixels=p["max_pixels"])

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
        _save_image_processor(image_processor, tmp)
        (tmp / "chat_template.jinja").write_text(CHAT_TEMPLATE)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def preset_config(preset: str, ids: dict, tokenizer_vocab: int):
    """The Qwen2VLConfig of a preset; `ids`: special token -> id in the tokenizer."""
    from transformers import Qwen2VLConfig

    p = PRESETS[preset]
    head_dim = p["hidden_size"] // p["num_attention_heads"]
    quarter = head_dim // 2 // 4  # mrope_section (t, h, w) must sum to head_dim / 2
    return Qwen2VLConfig(
        text_config=dict(
            vocab_size=p.get("model_vocab", tokenizer_vocab), hidden_size=p["hidden_size"],
            intermediate_size=p["intermediate_size"], num_hidden_layers=p["num_hidden_layers"],
            num_attention_heads=p["num_attention_heads"],
            num_key_value_heads=p["num_key_value_heads"], max_position_embeddings=4096,
            rope_parameters=dict(rope_type="default", rope_theta=10000.0,
                                 mrope_section=[quarter, quarter * 3 // 2,
                                                head_dim // 2 - quarter - quarter * 3 // 2]),
            tie_word_embeddings=p.get("tied", True), bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"]),
        vision_config=dict(depth=p["vision_depth"], embed_dim=p["vision_embed_dim"],
                           hidden_size=p["hidden_size"], num_heads=p["vision_heads"],
                           mlp_ratio=p["vision_mlp_ratio"], patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, in_channels=3),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=p.get("tied", True))


def _save_image_processor(image_processor, out_dir: Path) -> None:
    """Saved under the backend-neutral class name, so either backend (PIL here, torchvision
    where it is installed, vLLM) loads it."""
    image_processor.save_pretrained(out_dir)
    pp = Path(out_dir) / "preprocessor_config.json"
    cfg = json.loads(pp.read_text())
    cfg["image_processor_type"] = cfg["image_processor_type"].removesuffix("Pil")
    pp.write_text(json.dumps(cfg, indent=2))


def attention_implementation(device: torch.device, packing: str = "padded"):
    """What load_model passes as attn_implementation. Padded: flash_attention_2 where flash-attn
    and CUDA are present, SDPA otherwise. Packed modes: mr1fast's registered attention function
    (attention.py: SDPA, FlexAttention or varlen by the mask it is given) for the language
    model, the vision tower keeping the padded choice."""
    from .attention import has_flash_attn, register

    base = "flash_attention_2" if device.type == "cuda" and has_flash_attn() else "sdpa"
    if packing == "padded":
        return base

    return {"text_config": register(), "vision_config": base, "": base}


def load_model(name_or_path: str, *, device: torch.device, dtype: torch.dtype,
               gradient_checkpointing: bool = False, freeze_vision: bool = False,
               trainable: bool = True, packing: str = "padded"):
    """A Qwen2-VL / Qwen2.5-VL checkpoint by hub id or local path (a Hugging Face checkpoint, or
    one of mr1fast's step checkpoints), on `device` in `dtype`. `trainable=False` gives a
    frozen eval-mode copy (the reference model). `packing` (model.packing) picks the attention
    implementation (attention_implementation)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    from .checkpoint import is_step_checkpoint, load_weights

    check_model(name_or_path, key="model")
    try:
        if is_step_checkpoint(name_or_path):  # mr1fast's own: weights in DCP shards
            model = AutoModelForImageTextToText.from_config(
                AutoConfig.from_pretrained(name_or_path), dtype=dtype,
                attn_implementation=attention_implementation(device, packing))
            load_weights(name_or_path, model)
        else:
            model = AutoModelForImageTextToText.from_pretrained(
                name_or_path, dtype=dtype,
                attn_implementation=attention_implementation(device, packing))
    except (OSError, ValueError) as e:
        raise UserError(f"model {name_or_path!r} cannot be loaded: {_first_line(e)}",
                        fix="check that the folder holds a complete Qwen2-VL / Qwen2.5-VL "
                            "checkpoint (config.json and the weights)") from None
    model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
        return model
    model.train()
    if freeze_vision:
        vision_tower(model).requires_grad_(False)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


class Policy(torch.nn.Module):
    """The Hugging Face model behind one forward: `policy(fn, *args)` runs `fn(model, *args)`
    inside this module's forward. Every trainer pass (image features, hidden states and the
    loss, log-probs) goes through it, because under FSDP2 this wrapper is the root unit: its
    forward gathers the root's parameters (embeddings, LM head, the vision tower's patch
    embedding and merger) and its backward reduce-scatters their gradients. In one process it
    is a plain call."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, fn, *args, **kwargs):
        return fn(self.model, *args, **kwargs)


PACKABLE = ("qwen2_vl", "qwen2_5_vl")  # model types whose position ids packing.py computes


def packing_mode(requested: str, name_or_path: str, log: Callable[[str], None] = print) -> str:
    """model.packing as it will run: padded for a model type packing.py does not know."""
    if requested == "padded":
        return requested
    from transformers import AutoConfig

    kind = getattr(AutoConfig.from_pretrained(name_or_path), "model_type", None)
    if kind not in PACKABLE:
        log(f"model.packing={requested}: not available for model type {kind!r} (only "
            f"{', '.join(PACKABLE)}); running padded")
        return "padded"
    return requested


def vision_tower(model) -> torch.nn.Module:
    return model.model.visual


def lm_head_weight(model) -> torch.Tensor:
    """The LM head's [V, d] weight (the input embedding when tied, as in Qwen2-VL-2B)."""
    return model.get_output_embeddings().weight


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_encoder(name_or_path: str) -> "PromptEncoder":
    """The PromptEncoder of a checkpoint; a UserError when its tokenizer or image processor
    cannot be loaded."""
    try:
        return PromptEncoder(name_or_path)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model {name_or_path!r}: its tokenizer or image processor cannot be "
                        f"loaded: {_first_line(e)}",
                        fix="a checkpoint folder needs the tokenizer and preprocessor files "
                            "next to the weights") from None


class PromptEncoder:
    """Chat template + image processor + tokenizer for Qwen2-VL prompts, without the
    processor class (which needs torchvision for videos): expands each image placeholder to
    its number of image tokens, as Qwen2VLProcessor does."""

    def __init__(self, name_or_path: str):
        from transformers import AutoImageProcessor, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(name_or_path)
        self.image_processor = AutoImageProcessor.from_pretrained(name_or_path)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = "<|endoftext|>"
        self.image_token = "<|image_pad|>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.merge = self.image_processor.merge_size ** 2
        self.stop_ids = sorted({self.tokenizer.convert_tokens_to_ids(t)
                                for t in ("<|im_end|>", "<|endoftext|>")})
        # Tokens a completion must never contain: the sampler suppresses them.
        self.multimodal_ids = sorted(
            {self.tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS[3:]}
            - {self.tokenizer.unk_token_id, None})

    def chat_text(self, question: str, n_images: int = 1) -> str:
        """The chat prompt: n_images image placeholders, then the question."""
        content = [{"type": "image"}] * n_images + [{"type": "text", "text": question}]
        return self.tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                                  tokenize=False, add_generation_prompt=True)

    def prompt_length(self, images, question: str) -> int:
        """Tokens of one prompt, image tokens included (for the data loader's limit). `images`:
        one image or a list (possibly empty)."""
        images = _as_list(images)
        text = self.chat_text(question, len(images))
        n = len(self.tokenizer(text)["input_ids"]) - len(images)
        if images:
            grid = self.image_processor(images=images, return_tensors="pt")["image_grid_thw"]
            n += int(grid.prod(-1).sum()) // self.merge
        return n

    def encode(self, images: Sequence, questions: Sequence[str],
               device: torch.device) -> PromptBatch:
        """The prompts of `questions`; images[i] is prompt i's image or list of images (any
        number, none included)."""
        per_prompt = [_as_list(x) for x in images]
        flat = [im for row in per_prompt for im in row]
        grid, pixels = None, None
        if flat:
            vis = self.image_processor(images=flat, return_tensors="pt")
            grid, pixels = vis["image_grid_thw"], vis["pixel_values"]
        tokens = iter([] if grid is None else (grid.prod(-1) // self.merge).tolist())
        texts = []
        for q, row in zip(questions, per_prompt):
            text = self.chat_text(q, len(row))
            parts = text.split(self.image_token)
            text = parts[0] + "".join(self.image_token * next(tokens) + part
                                      for part in parts[1:])
            texts.append(text)
        tok = self.tokenizer(texts, return_tensors="pt", padding=True)
        return PromptBatch(input_ids=tok["input_ids"].to(device),
                           attention_mask=tok["attention_mask"].to(device),
                           pixel_values=None if pixels is None else pixels.to(device),
                           image_grid_thw=None if grid is None else grid.to(device),
                           image_token_id=self.image_token_id,
                           pad_token_id=self.tokenizer.pad_token_id, images=list(images),
                           image_counts=[len(row) for row in per_prompt])

    def encode_examples(self, examples: Sequence, device: torch.device) -> PromptBatch:
        """encode() of data.Example rows: their images and R1-V questions."""
        from .data import question

        return self.encode([e.images for e in examples],
                           [question(e.problem) for e in examples], device)

    def save(self, out_dir: str | Path) -> None:
        """Tokenizer, chat template and image processor, next to a saved model."""
        self.tokenizer.save_pretrained(out_dir)
        _save_image_processor(self.image_processor, Path(out_dir))

    def decode(self, ids: torch.Tensor, mask: torch.Tensor) -> list[str]:
        return [self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
                for row, m in zip(ids.cpu(), mask.cpu())]


def _as_list(images) -> list:
    return list(images) if isinstance(images, (list, tuple)) else [images]


def encode_images(model, prompts: PromptBatch) -> tuple[torch.Tensor, ...]:
    """The vision tower's output per image (prompt order): a tuple of N tensors
    [image_tokens_i, d] (empty when the batch has no image)."""
    if prompts.num_images == 0:
        return ()
    out = model.model.get_image_features(prompts.pixel_values, prompts.image_grid_thw,
                                         return_dict=True)
    return tuple(out.pooler_output)


def vision_keepalive(model) -> torch.Tensor:
    """0 x the vision tower's output on one minimal blank image (a scalar in the graph). Under
    FSDP every process must run the sharded tower the same number of times per pass, forward
    and backward: a process whose prompts have no image adds this to its output instead."""
    cfg = model.config.vision_config
    m = cfg.spatial_merge_size
    patch = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size ** 2
    device = model.get_input_embeddings().weight.device
    pixels = torch.zeros(m * m, patch, device=device)
    grid = torch.tensor([[1, m, m]], device=device)
    out = model.model.get_image_features(pixels, grid, return_dict=True).pooler_output
    return 0.0 * sum(o.float().sum() for o in out)


def image_inputs(prompts: PromptBatch, features: Sequence[torch.Tensor],
                 prompt_rows: Sequence[int]) -> dict:
    """The image arguments of a language-model forward over sequences that hold the prompts
    `prompt_rows` in that order: their images' grids and already computed features
    (`features`: encode_images' output for `prompts`). Nothing when they have no image."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    images = prompts.image_rows(prompt_rows)
    if not images:
        return {}
    index = torch.tensor(images, device=prompts.image_grid_thw.device)
    feats = BaseModelOutputWithPooling(pooler_output=tuple(features[i] for i in images))
    return {"image_grid_thw": prompts.image_grid_thw[index],
            "mm_encoder_outputs": {"image": feats}}


def completion_hidden(model, prompts: PromptBatch, image_features: Sequence[torch.Tensor],
                      prompt_index: torch.Tensor, completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> torch.Tensor:
    """Final hidden states that predict each completion token: [B, C, d], from the padded
    per-completion forward (model.packing=padded; the reference of the packed forwards).

    prompt_index [B] int64 says which prompt each completion continues; completion_ids and
    completion_mask are [B, C] (right-padded). `image_features` comes from `encode_images` and
    is indexed, not recomputed, for each completion."""
    prompt_ids = prompts.input_ids[prompt_index]
    # An image token inside a completion (the samplers suppress them) must not be taken for
    # an image placeholder.
    completion_in = completion_ids.masked_fill(completion_ids == prompts.image_token_id,
                                               prompts.pad_token_id)
    ids = torch.cat([prompt_ids, completion_in], 1)
    attn = torch.cat([prompts.attention_mask[prompt_index], completion_mask.long()], 1)
    out = model.model(input_ids=ids, attention_mask=attn,
                      mm_token_type_ids=(ids == prompts.image_token_id).int(), use_cache=False,
                      **image_inputs(prompts, image_features, prompt_index.tolist()))
    lp, c = prompts.input_ids.shape[1], completion_ids.shape[1]
    return out.last_hidden_state[:, lp - 1: lp - 1 + c]


def model_dtype(name: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU and fp32 on CPU."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if name not in table:
        raise ValueError(f"dtype={name!r}: expected auto, bf16 or fp32")
    return table[name]
