"""What the GRPO, SFT and eval entry points share: resolving the model and data named in the
config, the optimizer and LR schedule, the resumable data order, and the non-finite guard."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from .config import Config
from .data import Example, load_examples, question, resolve_source
from .model import PRESETS, PromptEncoder, init_tiny_model


def log(msg: str) -> None:
    print(f"[mr1fast] {msg}", file=sys.stderr, flush=True)


def cache_dir(cfg: Config) -> Path:
    return Path(os.path.expanduser(os.environ.get("MR1FAST_CACHE", cfg.cache_dir)))


def resolve_model(name: str, cfg: Config) -> str:
    """A preset name ('tiny', 'tiny-v152k', 'qwen2-vl-2b': mr1fast.model.PRESETS) is a
    random-weight Qwen2-VL built once into the cache; anything else is a hub id or a local
    path, passed through."""
    if name not in PRESETS:
        return name
    path = cache_dir(cfg) / f"{name}-qwen2vl-seed{cfg.seed}"
    if not (path / "config.json").is_file():
        log(f"building the {name} model in {path}")
        init_tiny_model(path, preset=name, seed=cfg.seed)
    return str(path)


def load_task(source: str, cfg: Config, encoder: PromptEncoder, *, split: str, n: int,
              limit: int, max_prompt_length: Optional[int], strict: bool) -> list[Example]:
    """Examples of one data source (synthetic:* names generate and cache `n` rows), with rows
    whose prompt exceeds max_prompt_length tokens (image tokens included) skipped."""
    path = resolve_source(source, split=split, cache_dir=cache_dir(cfg) / "data", n=n,
                          seed=cfg.seed)
    result = load_examples(path, split=split, limit=limit or None, strict=strict,
                           max_prompt_length=max_prompt_length,
                           prompt_length=lambda e: encoder.prompt_length(e.image,
                                                                         question(e.problem)),
                           warn=log)
    return result.examples


def setup_run(cfg: Config):
    """The run directory (with config.yaml), the model path, the prompt encoder, the trainable
    model and the training examples, as configured."""
    from .config import save_config
    from .model import default_device, load_model, model_dtype

    run_dir = Path(cfg.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    torch.manual_seed(cfg.seed)
    device = default_device(cfg.model.device)
    model_path = resolve_model(cfg.model.name, cfg)
    encoder = PromptEncoder(model_path)
    model = load_model(model_path, device=device, dtype=model_dtype(cfg.model.dtype, device),
                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                       freeze_vision=cfg.model.freeze_vision)
    train_set = load_task(cfg.data.train, cfg, encoder, split=cfg.data.split,
                          n=cfg.data.synthetic_size, limit=cfg.data.limit,
                          max_prompt_length=cfg.data.max_prompt_length, strict=cfg.data.strict)
    return run_dir, model_path, encoder, model, train_set


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW; on fp32 master copies when the weights are bf16 (see MasterWeightsAdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return MasterWeightsAdamW(params, lr=lr, weight_decay=weight_decay)


class MasterWeightsAdamW:
    """AdamW on fp32 master copies of bf16 parameters. Applied to bf16 weights directly, an
    update of lr = 1e-6 (the paper's) rounds away: a weight of 0.02 has a bf16 spacing of
    ~1.2e-4. Gradients are upcast into the masters, the step runs in fp32, and the result is
    rounded back into the model's bf16 weights. The masters are part of the state_dict."""

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = list(params)
        self.master = [p.detach().float().clone() for p in self.params]
        self.inner = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay)
        self.param_groups = self.inner.param_groups

    @torch.no_grad()
    def step(self) -> None:
        for p, m in zip(self.params, self.master):
            m.grad = None if p.grad is None else p.grad.float()
        self.inner.step()
        for p, m in zip(self.params, self.master):
            p.copy_(m)
            m.grad = None

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"adamw": self.inner.state_dict(), "master": list(self.master)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state["adamw"])
        for m, saved in zip(self.master, state["master"]):
            m.copy_(saved)


def lr_at(step: int, total: int, lr: float, schedule: str, warmup_ratio: float) -> float:
    """Linear warm-up over warmup_ratio * total steps, then constant, linear or cosine decay."""
    warmup = int(round(warmup_ratio * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    if schedule == "constant":
        return lr
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return lr * (1.0 - progress)
    return lr * 0.5 * (1.0 + math.cos(math.pi * progress))


def total_steps(n_examples: int, per_step: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    steps = int(epochs * (n_examples // per_step))
    if steps <= 0:
        raise ValueError(f"{n_examples} examples with {per_step} per step and epochs={epochs} "
                         "give no training step: add data or lower the batch size")
    return steps


class DataOrder:
    """Batches of `per_step` examples in a seeded per-epoch permutation; the position (epoch,
    offset) is part of a checkpoint, so a resumed run sees the same batches."""

    def __init__(self, n: int, per_step: int, seed: int, epoch: int = 0, offset: int = 0):
        if n < per_step:
            raise ValueError(f"{n} examples are fewer than the {per_step} needed per step")
        self.n, self.per_step, self.seed = n, per_step, seed
        self.epoch, self.offset = epoch, offset

    def next(self) -> list[int]:
        if self.offset + self.per_step > self.n:
            self.epoch, self.offset = self.epoch + 1, 0
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g)
        batch = order[self.offset: self.offset + self.per_step].tolist()
        self.offset += self.per_step
        return batch

    def state(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset}


def micro_batches(n: int, size: int) -> list[torch.Tensor]:
    size = n if size <= 0 else min(size, n)
    return [torch.arange(i, min(i + size, n)) for i in range(0, n, size)]


class NonFiniteGuard:
    """Counts steps skipped for a NaN/inf loss or gradient; too many in a row stop the run."""

    def __init__(self, max_consecutive: int):
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0

    def check(self, loss: torch.Tensor, grad_norm: torch.Tensor, step: int) -> bool:
        """True when the step may be applied."""
        if bool(torch.isfinite(loss)) and bool(torch.isfinite(grad_norm)):
            self.consecutive = 0
            return True
        self.skipped += 1
        self.consecutive += 1
        log(f"step {step}: non-finite loss ({loss.item()}) or grad norm ({grad_norm.item()}); "
            f"step skipped ({self.consecutive} in a row)")
        if self.consecutive >= self.max_consecutive:
            raise RuntimeError(
                f"stopping at step {step}: {self.consecutive} consecutive steps had a NaN/inf "
                "loss or gradient. Lower the learning rate, check the rewards, or use "
                "fp32 (model.dtype=fp32); the last checkpoint is intact.")
        return False


def clip_and_check(model, max_norm: float, loss: torch.Tensor, guard: NonFiniteGuard,
                   step: int) -> tuple[bool, float]:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    return guard.check(loss.detach(), norm, step), float(norm)


def device_peak_mb(device: torch.device) -> Optional[float]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
