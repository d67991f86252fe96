"""The scaffolding every training loop shares (GRPO, SFT), so the loops hold only their algorithm.

`setup(cfg, ...)` resolves what the config names, checking everything cheap first
(preflight.py): the output folder (locked for the run, config.yaml written), the device, the
model (a preset is built once into the cache), its prompt encoder, the training examples, the
rewards, the evaluation sets; then the trainable model, and the disk space for a checkpoint.

`Run` owns the rest of a loop's plumbing: the optimizer and its learning-rate schedule, the data
order, resuming from the newest checkpoint (weights, optimizer, RNG, data position, extra state),
gradient clipping and the optimizer step, the one place where non-finite values are handled (a
NaN/inf loss or gradient norm skips the optimizer step; `grpo.max_bad_steps` in a row stop the
run), the metrics log and progress bar, checkpoints every `log.save_every` steps, and cleanup:

    with Run(cfg, cfg.sft, run_dir, model, encoder, order, total, desc="sft") as run:
        for step in run.steps():                  # from the resumed step on
            examples = [train_set[i] for i in run.order.next()]
            lr = run.set_lr(step)
            ...                                   # forward + backward
            applied, grad_norm = run.optimizer_step(loss)
            run.end_step(step, {"loss": loss, "lr": lr, ...})
"""
from __future__ import annotations

import contextlib
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .checkpoint import load_checkpoint, save_checkpoint
from .config import Config, save_config
from .data import DataOrder, Example, load_task
from .distributed import World, init_world, local, shard, shutdown
from .errors import UsageError
from .metrics import MetricsLogger, Progress, plot_metrics
from .model import (Policy, PromptEncoder, load_encoder, load_model, model_dtype, packing_mode,
                    resolve_model)
from .packing import resolve_backend
from .preflight import (check_device, check_disk, check_model, check_rewards, checkpoint_bytes,
                        claim_output_dir, rows_per_step)


def log(msg: str, world: Optional[World] = None) -> None:
    """A progress line on stderr (rank 0 only, when a `world` is given)."""
    if world is None or world.is_main:
        print(f"[mr1fast] {msg}", file=sys.stderr, flush=True)


@dataclass
class Setup:
    run_dir: Path
    model_path: str            # the resolved checkpoint folder or hub id
    encoder: PromptEncoder
    policy: Policy             # the trainable model behind one forward; sharded under torchrun
    train_set: list[Example]
    device: torch.device
    dtype: torch.dtype         # the compute dtype (the weights' dtype in one process)
    world: World
    packing: str = "padded"    # model.packing as it runs (packing_mode)
    attention: str = "sdpa"    # the packed forwards' attention backend (resolve_backend)

    @property
    def model(self) -> torch.nn.Module:
        """The Hugging Face model inside the Policy wrapper."""
        return self.policy.model


@contextlib.contextmanager
def distributed_run(cfg: Config):
    """The run's World (the process group under torchrun, torn down at the end) with its output
    folder locked by rank 0 for the whole run (preflight.RunLock)."""
    world, device = init_world(check_device(cfg.model.device), cfg.dist.timeout_s)
    try:
        lock = claim_output_dir(Path(cfg.output_dir), " ".join(sys.argv) or "mr1fast",
                                lambda m: log(m)) if world.is_main else None
        try:
            yield world, device
        finally:
            if lock is not None:
                lock.release()
    finally:
        shutdown(world)


def setup(cfg: Config, world: World, device: torch.device, *, per_step: dict,
          rewards: Optional[dict] = None) -> Setup:
    """Check everything that can be checked cheaply, then load the model: the world size
    against the batch sizes (`per_step`: config key -> examples per step), the model name or
    preset, the training data (rows for a step), the reward functions (`rewards`, GRPO), the
    evaluation sets, the free disk space for one checkpoint (estimated from the model's
    config); config.yaml is written; then the model is loaded (and sharded under torchrun).
    The caller holds the output folder (distributed_run)."""
    run_dir = Path(cfg.output_dir)
    if world.distributed and device.type == "cpu" and (
            cfg.dist.cpu_offload or cfg.dist.reference == "offload"):
        raise UsageError("config keys dist.cpu_offload / dist.reference=offload: offloading "
                         "moves GPU memory to the CPU; these processes run on the CPU already",
                         fix="dist.cpu_offload=false dist.reference=shard")
    for key, n in per_step.items():
        if n % world.size:
            raise UsageError(f"config key {key}: {n} is not divisible by the {world.size} "
                             "processes; each takes an equal share of a step",
                             fix=f"use a multiple of {world.size}")
    # Rank 0 first: it builds presets and synthetic data into the shared cache; the others
    # then read them.
    for builders in (True, False):
        if world.is_main == builders:
            model_path = resolve_model(cfg.model.name, cfg, lambda m: log(m, world))
            check_model(model_path)
            encoder = load_encoder(model_path)
            train_set = load_task(cfg.data.train, cfg, encoder, key="data.train",
                                  split=cfg.data.split, n=cfg.data.synthetic_size,
                                  limit=cfg.data.limit, rows=(cfg.data.holdout, None),
                                  max_prompt_length=cfg.data.max_prompt_length,
                                  strict=cfg.data.strict,
                                  warn=(lambda m: log(m)) if world.is_main else (lambda m: None))
            check_eval_tasks(cfg, encoder)
        world.barrier()
    for key, n in per_step.items():
        rows_per_step(len(train_set), n, "data.train", key, cfg.data.train)
    if rewards is not None:
        check_rewards(rewards, sorted(set().union(*(e.reward_row() for e in train_set))))
    dtype = model_dtype(cfg.model.dtype, device)
    if world.is_main:
        check_disk(run_dir, checkpoint_bytes(model_path, dtype, cfg.model.freeze_vision))
        save_config(cfg, run_dir / "config.yaml")
        if device.type == "cuda":
            log(plan_line(cfg, model_path, world.size, device))
    packing = packing_mode(cfg.model.packing, model_path, lambda m: log(m, world))
    attention = resolve_backend(cfg.model.attention, device, packing, dtype)
    torch.manual_seed(cfg.seed)
    # Under FSDP the sharded parameters are the fp32 masters; compute runs in `dtype`.
    model = load_model(model_path, device=device,
                       dtype=torch.float32 if world.distributed else dtype,
                       gradient_checkpointing=cfg.model.gradient_checkpointing,
                       freeze_vision=cfg.model.freeze_vision, packing=packing)
    policy = Policy(model)
    if world.distributed:
        shard(policy, world, compute_dtype=dtype, cpu_offload=cfg.dist.cpu_offload)
    return Setup(run_dir, model_path, encoder, policy, train_set, device, dtype, world,
                 packing, attention)


def plan_line(cfg: Config, model_path: str, nproc: int, device: torch.device) -> str:
    """One line of the memory plan (plan.py) against this GPU's memory."""
    from .plan import GB, memory_plan, model_shape

    gpu_gb = torch.cuda.get_device_properties(device).total_memory / GB
    total = sum(b for _, b in memory_plan(cfg, nproc, model_shape(model_path), gpu_gb))
    return (f"memory plan: about {total / GB:.1f} GB per process of this GPU's {gpu_gb:.0f} GB "
            "(an estimate: `mr1fast plan` shows the parts)")


def check_eval_tasks(cfg: Config, encoder) -> None:
    """Each evaluation set loads (its first row), so a wrong path fails now, not after
    training."""
    e = cfg.eval
    for task, source in e.tasks.items():
        load_task(source, cfg, encoder, key=f"eval.tasks.{task}", split=e.split,
                  n=e.synthetic_size, limit=1, max_prompt_length=None, strict=cfg.data.strict,
                  warn=lambda message: None, rows=(0, e.rows or None))


def total_steps(n_examples: int, per_step: int, epochs: float, max_steps: int) -> int:
    if max_steps > 0:
        return max_steps
    steps = int(epochs * (n_examples // per_step))
    if steps <= 0:
        raise ValueError(f"{n_examples} examples with {per_step} per step and epochs={epochs} "
                         "give no training step: add data or lower the batch size")
    return steps


class Run:
    """A training loop's plumbing (module doc). `section` is the loop's config section
    (cfg.grpo or cfg.sft: lr, lr_schedule, warmup_ratio, weight_decay, max_grad_norm);
    `total` loop steps of `updates_per_step` optimizer steps each (the LR schedule spans all
    of them). `policy`: the Policy wrapper (sharded under torchrun). `resume_from`: the
    checkpoint to resume from (checkpoint.latest_checkpoint: the newest intact one), or None.
    `resumable=False` (the SFT warm-up inside a GRPO run) writes no periodic checkpoints and
    logs to no TensorBoard / W&B. Rank 0 alone logs; every rank checkpoints its shards."""

    def __init__(self, cfg: Config, section, run_dir: Path, policy, encoder, order: DataOrder,
                 total: int, world: World, *, updates_per_step: int = 1, desc: str,
                 resumable: bool = True, resume_from: Optional[Path] = None):
        self.cfg, self.section, self.run_dir, self.world = cfg, section, Path(run_dir), world
        self.policy, self.model = policy, policy.model
        self.encoder, self.order, self.total = encoder, order, total
        self.optimizer_steps = total * updates_per_step
        self.resumable = resumable
        self.optimizer = make_optimizer(self.model, section.lr, section.weight_decay)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.start, self.state = 0, {}
        if resume_from is not None:
            self.state = load_checkpoint(resume_from, self.model, self.optimizer, world)
            self.start = self.state["step"]
            order.restore(**self.state["data"])
            log(f"resumed from {resume_from} at step {self.start}", world)
        self.skipped = self.consecutive_bad = 0
        self.logger = None
        if world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            self.logger = MetricsLogger(self.run_dir, resume=self.start > 0,
                                        tensorboard=resumable and cfg.log.tensorboard,
                                        wandb=resumable and cfg.log.wandb)
            self.logger.truncate_after(self.start + 1)
        self.progress = Progress(total, initial=self.start, desc=desc,
                                 disable=None if cfg.log.progress and world.is_main else True)

    def steps(self) -> range:
        return range(self.start, self.total)

    def set_lr(self, optimizer_step: int) -> float:
        """Linear warm-up over warmup_ratio of the optimizer steps, then the schedule."""
        s = self.section
        lr = lr_at(optimizer_step, self.optimizer_steps, s.lr, s.lr_schedule, s.warmup_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def optimizer_step(self, loss: torch.Tensor) -> tuple[bool, float]:
        """Clip the accumulated gradients, step unless the loss (summed over ranks: each holds
        its share) or the gradient norm is NaN/inf, zero the gradients: the one host sync of an
        update, and the same decision on every rank. Returns (applied, grad_norm)."""
        max_norm = self.section.max_grad_norm
        norm = local(torch.nn.utils.clip_grad_norm_(
            [p for p in self.params if p.grad is not None],
            max_norm if max_norm > 0 else float("inf")))
        total_loss = self.world.sum(loss.detach().float().reshape(1).to(norm.device).clone())
        loss_value, norm_value = torch.cat([total_loss, norm.float().reshape(1)]).tolist()
        applied = math.isfinite(loss_value) and math.isfinite(norm_value)
        if applied:
            self.optimizer.step()
            self.consecutive_bad = 0
        else:
            self.skipped += 1
            self.consecutive_bad += 1
            log(f"non-finite loss ({loss_value}) or gradient norm ({norm_value}); optimizer "
                f"step skipped ({self.consecutive_bad} in a row)", self.world)
            if self.consecutive_bad >= self.cfg.grpo.max_bad_steps:
                raise RuntimeError(
                    f"stopping: {self.consecutive_bad} consecutive steps had a NaN/inf loss or "
                    "gradient. Lower the learning rate, check the rewards, or use fp32 "
                    "(model.dtype=fp32); the last checkpoint is intact.")
        self.zero_grad()
        return applied, norm_value

    def end_step(self, step: int, metrics: dict, **state) -> None:
        """Log step + 1's metrics (rank 0), advance the progress bar, and write a checkpoint
        (with the data position and `state`) when one is due."""
        metrics["skipped_steps"] = self.skipped
        if self.logger is not None:
            self.logger.log(step + 1, metrics)
        self.progress.update(metrics)
        due = (step + 1) % self.cfg.log.save_every == 0 or step + 1 == self.total
        if self.resumable and due:
            self.save(step + 1, **state)

    def save(self, step: int, **state) -> None:
        """An atomic checkpoint of the weights, the optimizer, the RNGs, the data position and
        `state` (a collective)."""
        save_checkpoint(self.run_dir, step, self.model, self.encoder, self.optimizer,
                        {"step": step, "data": self.order.state(), **state}, self.world,
                        keep=self.cfg.log.keep_checkpoints)

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.progress.close()
        if self.logger is not None:
            self.logger.close()
            plot_metrics(self.run_dir / "metrics.jsonl", self.run_dir / "metrics.png")


def make_optimizer(model, lr: float, weight_decay: float):
    """AdamW; on fp32 master copies when the weights are bf16 (see MasterWeightsAdamW)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if all(p.dtype == torch.float32 for p in params):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    return MasterWeightsAdamW(params, lr=lr, weight_decay=weight_decay)


class MasterWeightsAdamW:
    """AdamW on fp32 master copies of bf16 parameters (one process; under FSDP the sharded
    parameters themselves are the fp32 masters). Applied to bf16 weights directly, an update of
    lr = 1e-6 (the paper's) rounds away: a weight of 0.02 has a bf16 spacing of ~1.2e-4.
    Gradients are upcast into the masters, the step runs in fp32, and the result is rounded
    back into the model's bf16 weights. The masters are what a checkpoint stores as the
    weights (checkpoint.training_state, via master_of; load_masters after loading)."""

    def __init__(self, params, lr: float, weight_decay: float):
        self.params = list(params)
        self.master = [p.detach().float().clone() for p in self.params]
        self._master_of = {id(p): m for p, m in zip(self.params, self.master)}
        self.inner = torch.optim.AdamW(self.master, lr=lr, weight_decay=weight_decay)
        self.param_groups = self.inner.param_groups

    def master_of(self, p: torch.Tensor) -> torch.Tensor:
        """The fp32 master of a trainable parameter; a frozen one is its own."""
        return self._master_of.get(id(p), p)

    @torch.no_grad()
    def load_masters(self) -> None:
        """After the masters were loaded (a checkpoint): round them into the parameters."""
        for p, m in zip(self.params, self.master):
            p.copy_(m)

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


def micro_batches(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` rows (all n when size <= 0): views, so indexing a
    device tensor with one copies and syncs nothing."""
    size = n if size <= 0 else min(size, n)
    return [slice(i, min(i + size, n)) for i in range(0, n, size)]


class MicroBatchFit:
    """Micro-batches of the configured size, or (size 0) the largest that fits: the whole
    batch first, halved on each CUDA out-of-memory error; the size found is kept. retry=False
    (several processes, which must run the same passes) lets the error through. The size is in
    whatever unit `split` takes (completions, or packed positions: forward.StepBatch.split);
    without a split, n rows in consecutive slices.

        for attempt in fit.attempts(n, on_retry=run.zero_grad, split=batch.split):
            with attempt:                         # an out-of-memory error ends this attempt
                for mb in attempt.micro_batches:
                    ...
    """

    def __init__(self, size: int, retry: bool = True):
        self.size, self.retry = size, retry

    def attempts(self, n: int, on_retry=None, split=None):
        while True:
            attempt = _Attempt(self, n, on_retry, split)
            yield attempt
            if attempt.done:
                return


class _Attempt:
    def __init__(self, fit: MicroBatchFit, n: int, on_retry, split):
        self.fit, self.on_retry, self.done = fit, on_retry, False
        self.size = n if fit.size <= 0 else min(fit.size, n)
        self.micro_batches = split(self.size) if split is not None \
            else micro_batches(n, self.size)

    def _smallest(self) -> bool:
        """Every micro-batch holds one completion: nothing left to halve."""
        return all((m.count if hasattr(m, "count") else m.stop - m.start) <= 1
                   for m in self.micro_batches)

    def __enter__(self) -> "_Attempt":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None:
            self.done = True
            return False
        if not issubclass(kind, torch.cuda.OutOfMemoryError) or self.size <= 1 or \
                self._smallest() or not self.fit.retry:
            return False
        self.fit.size = self.size // 2
        log(f"out of memory with micro-batches of {self.size}; retrying with {self.fit.size}")
        if self.on_retry is not None:
            self.on_retry()
        torch.cuda.empty_cache()
        return True
