"""GRPO-D training of a vision-language model (OThink-MR1, ../shared/PAPER.md).

One step (a rollout batch):
  1. rollout: P prompts (image + question) -> G sampled completions each (the sampler);
  2. rewards: accuracy + alpha * format (+ user rewards), contained in a worker process;
  3. group advantages: (r - mean_group) / (std_group + 1e-4);
  4. old log-probs (only when mu > 1: the ratio is then not identically 1) and the frozen
     reference model's log-probs, both without logits (token_logprobs on the LM head's input);
  5. mu optimizer updates, each over micro-batches: grpo_loss with the scheduled beta(s)
     (s = optimizer steps), gradient accumulation, clipping, a NaN/inf guard;
  6. weight sync to the sampler (every vllm.sync_every steps); metrics; an atomic checkpoint
     every log.save_every steps.
With the vLLM sampler, the loss also gets importance weights pi_trainer / pi_sampler per token
(mr1fast.importance) for the mismatch between the two (vllm.importance_sampling).
Images are encoded once per prompt and shared by its G completions; with a frozen vision
tower the features are also shared by the policy, old-policy and reference passes.
"""
from __future__ import annotations

import json
import time
from typing import Callable, Optional

import torch

from . import beta_schedule, grpo_loss, token_logprobs
from .advantages import group_advantages
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .evaluate import evaluate_tasks, print_results
from .importance import importance_weights
from .metrics import MetricsLogger, Progress, plot_metrics
from .model import (PromptBatch, completion_hidden, encode_images,
                    lm_head_weight, load_model)
from .rewards import RewardRunner
from .runtime import (DataOrder, NonFiniteGuard, clip_and_check, device_peak_mb, log, lr_at,
                      make_optimizer, micro_batches, setup_run, total_steps)
from .sampler import HFSampler, Rollout, SamplingParams, resolve_sampler
from .sft import train_sft


def make_beta(cfg: Config, total: int) -> Callable[[int], float]:
    g = cfg.grpo
    if g.beta_schedule == "grpo_d":
        return beta_schedule("grpo_d", total, beta_min=g.beta_min, beta_max=g.beta_max,
                             explore_ratio=g.explore_ratio)
    if g.beta_schedule == "constant":
        return beta_schedule("constant", total, beta=g.beta_max)
    return beta_schedule(g.beta_schedule, total, beta_start=g.beta_min, beta_end=g.beta_max)


def make_sampler(cfg: Config, policy, encoder, model_path: str):
    """The configured sampler: transformers' generate on the policy itself (hf) or a colocated
    vLLM engine (vllm) started from `model_path` (synced with the policy before use)."""
    kind = resolve_sampler(cfg.sampler)
    if kind == "hf":
        return HFSampler(policy, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                         encoder.multimodal_ids)
    from .vllm_sampler import VLLMSampler

    g, v = cfg.grpo, cfg.vllm
    return VLLMSampler(
        model_path, stop_ids=encoder.stop_ids, pad_id=encoder.tokenizer.pad_token_id,
        suppress_ids=encoder.multimodal_ids, dtype=next(policy.parameters()).dtype,
        max_model_len=cfg.data.max_prompt_length + g.max_completion_length,
        max_num_seqs=v.max_num_seqs or g.prompts_per_step * g.num_generations, seed=cfg.seed,
        bucket_mb=v.sync_bucket_mb, drain_encoder_cache=v.drain_encoder_cache,
        sleep_level=v.sleep_level, gpu_memory_utilization=v.gpu_memory_utilization,
        cpu_kv_cache_gb=v.cpu_kv_cache_gb, enforce_eager=v.enforce_eager)


def sync_weights(sampler, policy) -> None:
    """Push the policy into the sampler: every parameter on the first sync (and after a
    weight-dropping sleep), afterwards only the trainable ones (a frozen tower never changes)."""
    full = getattr(sampler, "needs_full_sync", True)
    sampler.update_weights((n, p) for n, p in policy.named_parameters()
                           if full or p.requires_grad)


def micro_hidden(model, prompts: PromptBatch, rollout: Rollout, idx: torch.Tensor,
                 features) -> torch.Tensor:
    """Hidden states [b, C, d] of the completions `idx`. Each distinct prompt's image is
    encoded once (or taken from `features`, the frozen tower's per-prompt output)."""
    unique, local = torch.unique(rollout.prompt_index[idx], return_inverse=True)
    sub = prompts.select(unique)
    feats = [features[i] for i in unique.tolist()] if features is not None \
        else encode_images(model, sub)
    return completion_hidden(model, sub, feats, local, rollout.completion_ids[idx],
                             rollout.completion_mask[idx])


@torch.no_grad()
def sequence_logprobs(model, prompts: PromptBatch, rollout: Rollout, micro: list[torch.Tensor],
                      features, impl: str, temperature: float = 1.0) -> torch.Tensor:
    """fp32 per-token log-probs [B, C] of the rollout under `model`, micro-batch by micro-batch.
    `features` (per prompt) is reused when given (frozen vision tower), else recomputed."""
    out = torch.zeros_like(rollout.logprobs)
    for idx in micro:
        hidden = micro_hidden(model, prompts, rollout, idx, features)
        if not bool(torch.isfinite(hidden).all()):
            out[idx] = float("nan")  # update() turns this into a skipped step
            continue
        out[idx] = token_logprobs(hidden, lm_head_weight(model), rollout.completion_ids[idx],
                                  temperature=temperature, impl=impl) * rollout.completion_mask[idx]
    return out


def micro_weight(loss_type: str, idx: torch.Tensor, mask: torch.Tensor) -> float:
    """Scale that makes the micro-batch losses add up to the loss of the whole batch."""
    if loss_type in ("grpo", "dr_grpo"):
        return len(idx) / mask.shape[0]
    if loss_type == "bnpo":
        return float(mask[idx].sum() / mask.sum().clamp(min=1))
    return 1.0  # dapo: normalized by num_items_in_batch, the batch's token count


def update(policy, cfg: Config, prompts: PromptBatch, rollout: Rollout, advantages, old_logp,
           ref_logp, beta: float, micro: list[torch.Tensor], features,
           is_weights: Optional[torch.Tensor] = None) -> dict:
    """Forward + backward of grpo_loss over the micro-batches (gradients accumulate)."""
    g, mask = cfg.grpo, rollout.completion_mask
    totals = {"loss": 0.0, "kl": 0.0, "clip_frac": 0.0, "clip_low": 0.0, "clip_high": 0.0,
              "entropy": 0.0}
    loss_sum = torch.zeros(())
    for idx in micro:
        hidden = micro_hidden(policy, prompts, rollout, idx, features)
        inputs = [hidden] + [x[idx] for x in (old_logp, ref_logp) if x is not None]
        if not all(bool(torch.isfinite(x).all()) for x in inputs):
            # A non-finite forward pass: report a NaN loss so the guard skips the step.
            totals["loss"] = torch.tensor(float("nan"))
            return totals
        loss, stats = grpo_loss(
            hidden, lm_head_weight(policy), rollout.completion_ids[idx], advantages[idx],
            mask=mask[idx], old_logp=None if old_logp is None else old_logp[idx],
            ref_logp=None if ref_logp is None else ref_logp[idx],
            importance_weights=None if is_weights is None else is_weights[idx], beta=beta,
            eps_low=g.eps_low, eps_high=g.eps_high, temperature=g.temperature,
            loss_type=g.loss_type,
            max_completion_length=g.max_completion_length,
            num_items_in_batch=mask.sum() if g.loss_type == "dapo" else None,
            return_entropy=True, impl=cfg.model.impl)
        w = micro_weight(g.loss_type, idx, mask)
        (loss * w).backward()
        loss_sum = loss_sum + loss.detach().cpu() * w
        tokens = float(mask[idx].sum()) / max(float(mask.sum()), 1.0)
        for k in totals:
            if k != "loss":
                totals[k] += float(stats[k]) * tokens
    totals["loss"] = loss_sum
    return totals


class MicroBatchFit:
    """Micro-batches of the configured size, or (size 0) the largest that fits: the whole
    batch first, halved on each CUDA out-of-memory error; the size found is kept."""

    def __init__(self, size: int):
        self.size = size

    def run(self, fn, n: int, on_retry=None):
        while True:
            size = n if self.size <= 0 else min(self.size, n)
            try:
                return fn(micro_batches(n, size))
            except torch.cuda.OutOfMemoryError:
                if size == 1:
                    raise
                self.size = size // 2
                log(f"out of memory with micro-batches of {size}; retrying with {self.size}")
                if on_retry is not None:
                    on_retry()
                torch.cuda.empty_cache()


def train_grpo(cfg: Config, *, on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run GRPO / GRPO-D as configured; returns the final metrics and eval results.
    Resumes from the newest checkpoint in cfg.output_dir when there is one."""
    g = cfg.grpo
    run_dir, model_path, encoder, policy, train_set = setup_run(cfg)
    device, dtype = next(policy.parameters()).device, next(policy.parameters()).dtype
    total = total_steps(len(train_set), g.prompts_per_step, g.epochs, g.max_steps)
    beta_at = make_beta(cfg, total * g.updates_per_batch)
    needs_ref = g.beta_max > 0 or (g.beta_schedule != "constant" and g.beta_min > 0)
    optimizer = make_optimizer(policy, g.lr, g.weight_decay)
    order = DataOrder(len(train_set), g.prompts_per_step, cfg.seed)
    results: dict = {}

    start = 0
    warmup_dir = run_dir / "sft_warmup"
    resume_from = latest_checkpoint(run_dir)
    if resume_from is not None:
        state = load_checkpoint(resume_from, policy, optimizer)
        start, results = state["step"], json.loads(state["results"])
        order = DataOrder(len(train_set), g.prompts_per_step, cfg.seed, **state["data"])
        log(f"resumed from {resume_from} at step {start}")
    elif g.sft_warmup_steps > 0:
        train_sft(cfg, policy, encoder, train_set, steps=g.sft_warmup_steps, run_dir=warmup_dir)
        results["after_sft"] = evaluate_tasks(cfg, policy, encoder)
        print_results("after SFT warm-up", results["after_sft"])
    # The reference is the policy at the start of GRPO (after the warm-up, if any), frozen.
    ref = None
    if needs_ref:
        ref_path = warmup_dir / "checkpoints" / "final" if g.sft_warmup_steps > 0 else model_path
        ref = load_model(str(ref_path), device=device, dtype=dtype, trainable=False)
    sampler = make_sampler(cfg, policy, encoder, model_path)
    t_sync = time.perf_counter()
    sync_weights(sampler, policy)  # the engine starts from disk; the policy may be newer
    log(f"sampler: {type(sampler).__name__} (first weight sync "
        f"{time.perf_counter() - t_sync:.2f} s)")
    use_is = not isinstance(sampler, HFSampler) and cfg.vllm.importance_sampling != "none"
    params = SamplingParams(max_new_tokens=g.max_completion_length, temperature=g.temperature,
                            top_p=g.top_p, top_k=g.top_k, ignore_eos=g.ignore_eos)
    rewards = RewardRunner({k: float(v) for k, v in g.rewards.items()},
                           timeout_s=g.reward_timeout_s, log=log)
    guard = NonFiniteGuard(g.max_bad_steps)
    logger = MetricsLogger(run_dir, tensorboard=cfg.log.tensorboard, wandb=cfg.log.wandb,
                           resume=start > 0)
    logger.truncate_after(start + 1)
    progress = Progress(total, initial=start, desc="grpo",
                        disable=None if cfg.log.progress else True)
    metrics: dict = {}
    fit = MicroBatchFit(g.micro_batch_size)
    try:
        for step in range(start, total):
            t0 = time.perf_counter()
            examples = [train_set[i] for i in order.next()]
            prompts = encoder.encode_examples(examples, device)
            rollout = sampler.generate(prompts, g.num_generations, params)
            t_rollout = time.perf_counter()

            completions = encoder.decode(rollout.completion_ids, rollout.completion_mask)
            rows = [e.reward_row() for e in examples for _ in range(g.num_generations)]
            scored = rewards(completions, rows)
            reward = torch.tensor(scored.total, dtype=torch.float32, device=device)
            advantages = group_advantages(reward, g.num_generations)
            t_reward = time.perf_counter()

            n = len(reward)
            features = None
            if cfg.model.freeze_vision:
                with torch.no_grad():
                    features = encode_images(policy, prompts)
            # The policy's log-probs at rollout time: needed for the ratio when mu > 1, and for
            # the importance weights against the sampler's log-probs.
            trainer_logp = fit.run(lambda micro: sequence_logprobs(
                policy, prompts, rollout, micro, features, cfg.model.impl, g.temperature), n) \
                if g.updates_per_batch > 1 or use_is else None
            old_logp = trainer_logp if g.updates_per_batch > 1 else None
            is_weights, is_stats = None, {}
            if use_is:
                is_weights, is_stats = importance_weights(
                    trainer_logp, rollout.logprobs, rollout.completion_mask,
                    level=cfg.vllm.importance_sampling, mode=cfg.vllm.is_mode,
                    cap=cfg.vllm.is_cap)
            ref_logp = fit.run(lambda micro: sequence_logprobs(
                ref, prompts, rollout, micro, features, cfg.model.impl, g.temperature), n) \
                if ref is not None else None
            t_ref = time.perf_counter()

            for u in range(g.updates_per_batch):
                opt_step = step * g.updates_per_batch + u
                beta = beta_at(opt_step)
                lr = lr_at(opt_step, total * g.updates_per_batch, g.lr, g.lr_schedule,
                           g.warmup_ratio)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                stats = fit.run(lambda micro: update(
                    policy, cfg, prompts, rollout, advantages, old_logp, ref_logp, beta, micro,
                    features, is_weights), n,
                    on_retry=lambda: optimizer.zero_grad(set_to_none=True))
                ok, grad_norm = clip_and_check(policy, g.max_grad_norm, stats["loss"], guard,
                                               step)
                if ok:
                    optimizer.step()
                optimizer.zero_grad(set_to_none=True)
            t_update = time.perf_counter()
            if (step + 1) % cfg.vllm.sync_every == 0 or step + 1 == total:
                sync_weights(sampler, policy)
            t_end = time.perf_counter()

            metrics = _step_metrics(scored, reward, rollout, stats, beta, lr, grad_norm, guard,
                                    rewards, t0, t_rollout, t_reward, t_ref, t_update, t_end,
                                    device)
            metrics.update(is_stats)
            logger.log(step + 1, metrics)
            progress.update(metrics)
            if cfg.log.eval_every and (step + 1) % cfg.log.eval_every == 0 and step + 1 < total:
                results[f"step_{step + 1}"] = evaluate_tasks(cfg, policy, encoder)
            if (step + 1) % cfg.log.save_every == 0 or step + 1 == total:
                save_checkpoint(run_dir, step + 1, policy, encoder, optimizer,
                                {"step": step + 1, "data": order.state(),
                                 "results": json.dumps(results)}, keep=cfg.log.keep_checkpoints)
            if on_step is not None:
                on_step(step + 1, metrics)
    finally:
        progress.close()
        logger.close()
        rewards.close()
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")

    results["final"] = evaluate_tasks(cfg, policy, encoder)
    print_results("after GRPO" if g.beta_schedule != "grpo_d" else "after GRPO-D",
                  results["final"])
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return {"metrics": metrics, "eval": results, "steps": total, "run_dir": str(run_dir)}


def _step_metrics(scored, reward, rollout, stats, beta, lr, grad_norm, guard, rewards, t0,
                  t_rollout, t_reward, t_ref, t_update, t_end, device) -> dict:
    def mean_of(names):
        vals = [v for n in names for v in scored.values[n] if v is not None]
        return sum(vals) / len(vals) if vals else float("nan")

    names = list(scored.values)
    seconds = t_end - t0
    m = {
        "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
        "acc_reward": mean_of([n for n in names if "accuracy" in n]),
        "format_reward": mean_of([n for n in names if n == "format"]),
        "beta": beta, "lr": lr, "kl": stats["kl"], "loss": float(stats["loss"]),
        "clip_frac": stats["clip_frac"], "clip_low": stats["clip_low"],
        "clip_high": stats["clip_high"], "entropy": stats["entropy"], "grad_norm": grad_norm,
        "completion_length": float(rollout.completion_mask.sum(1).mean()),
        "tokens_per_s": rollout.num_tokens / seconds, "step_seconds": seconds,
        "rollout_s": t_rollout - t0, "reward_s": t_reward - t_rollout,
        "ref_s": t_ref - t_reward, "update_s": t_update - t_ref, "sync_s": t_end - t_update,
        "skipped_steps": guard.skipped, "reward_failures": sum(rewards.failures.values()),
    }
    for n in names:
        m[f"reward/{n}"] = mean_of([n])
    peak = device_peak_mb(device)
    if peak is not None:
        m["peak_mem_mb"] = peak
    return m
