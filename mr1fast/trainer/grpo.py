"""GRPO-D training of a vision-language model (OThink-MR1, ../shared/PAPER.md).

One step, read top to bottom in train_grpo:
  1. rollout: P prompts (image + question) -> G sampled completions each (the sampler);
  2. rewards: accuracy + alpha * format (+ user rewards), contained in a worker process;
  3. group advantages: (r - mean_group) / (std_group + eps);
  4. the policy's log-probs at rollout time (the old policy, needed when mu > 1, and for the
     importance weights of a vLLM sampler) and the frozen reference model's, without logits;
  5. mu optimizer updates, each over micro-batches: grpo_loss with the scheduled beta
     (a function of the optimizer step), gradients accumulated, then one clipped step;
  6. weight sync to the sampler (every vllm.sync_every steps);
  7. metrics, evaluation when due, an atomic checkpoint every log.save_every steps.
Steps 4 and 5 run in the layout model.packing names (forward.StepBatch, packing.py): by
default each group's prompt is computed once, its G completions packed after it without
padding (shared_prefix), in micro-batches of grpo.max_tokens_per_micro_batch positions.
Simplifications: the reference model is the policy at the start of GRPO (after the SFT
warm-up, if any), frozen; with a frozen vision tower, images are encoded once per step and
shared by every pass (each prompt's image once for its G completions in any case).
The loss runs with check_values=False, so it never syncs the GPU; the step's value checks run
where the step syncs anyway: the sampled ids' range after the rollout, and a non-finite loss
or gradient norm (which skips the optimizer step) in Run.optimizer_step.
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import time
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..loss import group_advantages, grpo_loss, importance_weights, micro_batch_weight, \
    token_logprobs
from ..rollout import HFSampler, PromptBatch, Rollout, SamplingParams, resolve_sampler
from .checkpoint import checkpoint_problem, latest_checkpoint
from .config import Config, kl_schedule, loss_options
from .data import DataOrder
from .distributed import World, full_tensors, shard
from .errors import UserError
from .evaluate import evaluate_tasks, print_results
from .metrics import device_peak_mb
from .forward import StepBatch
from .model import Policy, lm_head_weight, load_model
from .rewards import RewardResult, RewardRunner
from .run import MicroBatchFit, Run, distributed_run, log, setup, total_steps
from .sft import train_sft

STATS = ("loss", "kl", "clip_frac", "clip_low", "clip_high", "entropy")


def train_grpo(cfg: Config, *, on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run GRPO / GRPO-D as configured, in one process or, under torchrun, sharded over all
    (distributed.py); returns the final metrics and eval results. Resumes from the newest intact
    checkpoint in cfg.output_dir when there is one. The output folder is locked for the run.
    `on_step(step, metrics)` is called after each step (tests use it to interrupt a run)."""
    with distributed_run(cfg) as (world, device):
        return _train_grpo(cfg, world, device, on_step)


def _train_grpo(cfg: Config, world: World, device: torch.device, on_step) -> dict:
    g = cfg.grpo
    options = loss_options(g)
    loss_kwargs = dataclasses.asdict(options)
    per_step = {"grpo.prompts_per_step": g.prompts_per_step}
    if g.sft_warmup_steps > 0:
        per_step["sft.batch_size"] = cfg.sft.batch_size
    s = setup(cfg, world, device, per_step=per_step, rewards=g.rewards)
    policy, encoder = s.policy, s.encoder
    total = total_steps(len(s.train_set), g.prompts_per_step, g.epochs, g.max_steps)
    mu, G = g.updates_per_batch, g.num_generations
    beta_at = kl_schedule(g.beta_schedule, total * mu)
    rewards = RewardRunner({k: float(v) for k, v in g.rewards.items()},
                           timeout_s=g.reward_timeout_s, log=log)
    # Generation (the sampler, evaluation) runs on an unsharded copy under FSDP.
    gen = Replica(s)
    results: dict = {}
    warmup_dir = s.run_dir / "sft_warmup"
    resume_from = world.broadcast(latest_checkpoint(s.run_dir, log) if world.is_main else None)
    if resume_from is None and g.sft_warmup_steps > 0:
        train_sft(cfg, policy, encoder, s.train_set, steps=g.sft_warmup_steps,
                  run_dir=warmup_dir, world=world, packing=s.packing, attention=s.attention)
        results["after_sft"] = evaluate_tasks(cfg, gen.refresh(policy), encoder, world)
        print_results("after SFT warm-up", results["after_sft"], world)
    order = DataOrder(len(s.train_set), g.prompts_per_step, cfg.seed)
    # After the warm-up: the optimizer's fp32 master weights (bf16 models) copy the policy.
    with Run(cfg, g, s.run_dir, policy, encoder, order, total, world, updates_per_step=mu,
             desc="grpo", resume_from=resume_from) as run, rewards:
        if run.start > 0:
            results = json.loads(run.state["results"])
        ref = None
        if any(beta_at(k) > 0 for k in range(total * mu + 1)):
            ref = reference_model(cfg, s, warmup_dir)
        most_images = max([1, *(len(e.images) for e in s.train_set)])
        sampler = make_sampler(cfg, gen.model, encoder, s.model_path, s.dtype, most_images)
        t_sync = time.perf_counter()
        sync_weights(sampler, policy, world)  # the sampler starts from disk; the policy may be newer
        log(f"sampler: {type(sampler).__name__} (first weight sync "
            f"{time.perf_counter() - t_sync:.2f} s)", world)
        use_is = not isinstance(sampler, HFSampler) and cfg.vllm.importance_sampling != "none"
        params = SamplingParams(max_new_tokens=g.max_completion_length,
                                temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                ignore_eos=g.ignore_eos)
        # Micro-batches: completions (padded) or packed positions. Under FSDP every rank must
        # run the same passes: no out-of-memory retries there.
        fit = MicroBatchFit(g.micro_batch_size if s.packing == "padded"
                            else g.max_tokens_per_micro_batch, retry=not world.distributed)
        merge = policy.model.config.vision_config.spatial_merge_size
        vocab = lm_head_weight(policy.model).shape[0]
        metrics: dict = {}

        for step in run.steps():
            t0 = time.perf_counter()
            # 1. Rollout: G completions for each of this rank's share of the step's P prompts.
            indices = run.order.next()
            mine = indices[world.my_share(len(indices))]
            examples = [s.train_set[i] for i in mine]
            prompts = encoder.encode_examples(examples, device)
            rollout = sampler.generate(prompts, G, params,
                                       seeds=[prompt_seed(cfg.seed, step, i) for i in mine])
            ids, mask = rollout.completion_ids, rollout.completion_mask
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
            if lo < 0 or hi >= vocab:
                raise RuntimeError(f"the sampler produced token ids in [{lo}, {hi}], outside "
                                   f"the LM head's {vocab} rows: do the tokenizer and the "
                                   "model's vocabulary match?")
            t_rollout = time.perf_counter()

            # 2. Rewards and 3. group advantages (a prompt's G completions are on one rank).
            completions = encoder.decode(ids, mask)
            scored = rewards(completions, [e.reward_row() for e in examples for _ in range(G)])
            reward = torch.tensor(scored.total, dtype=torch.float32, device=device)
            advantages = group_advantages(reward, G, eps=options.advantage_eps)
            # The loss is normalised over the global batch: P * G sequences, all ranks' tokens.
            total_tokens = world.sum(mask.sum().clone())
            t_reward = time.perf_counter()

            # 4. Log-probs of the rollout under the policy at rollout time and the reference.
            features = StepBatch.features_of(policy, prompts, world) \
                if cfg.model.freeze_vision else None
            batch = StepBatch(prompts, rollout, features, s.packing, s.attention, merge, world)
            trainer_logp = logprobs(batch, policy, fit, cfg.model.impl, g.temperature) \
                if mu > 1 or use_is else None
            old_logp = trainer_logp if mu > 1 else None
            is_weights, is_stats = None, {}
            if use_is:
                is_weights, is_stats = importance_weights(
                    trainer_logp, rollout.logprobs, mask, level=cfg.vllm.importance_sampling,
                    mode=cfg.vllm.is_mode, cap=cfg.vllm.is_cap)
            # The sampler's own log-probs (vLLM), for the off-policy sequence mask.
            sampling_logp = getattr(rollout, "logprobs", None) \
                if options.off_policy_mask_threshold is not None else None
            ref_logp = logprobs(batch, ref, fit, cfg.model.impl, g.temperature) \
                if ref is not None else None
            t_ref = time.perf_counter()

            # 5. mu optimizer updates, each accumulating gradients over micro-batches.
            for u in range(mu):
                opt_step = step * mu + u
                beta, lr = beta_at(opt_step), run.set_lr(opt_step)
                for attempt in fit.attempts(batch.units(), on_retry=run.zero_grad,
                                            split=batch.split):
                    with attempt:
                        sums = {k: torch.zeros((), device=device) for k in STATS}
                        for mb in attempt.micro_batches:
                            take = functools.partial(batch.take, mb=mb)
                            loss, stats = policy(lambda m: grpo_loss(
                                batch.hidden(m, mb), lm_head_weight(m), take(ids),
                                batch.rows(advantages, mb), mask=take(mask),
                                old_logp=take(old_logp), ref_logp=take(ref_logp),
                                importance_weights=take(is_weights), beta=beta,
                                sampling_logp=take(sampling_logp), **loss_kwargs,
                                temperature=g.temperature,
                                max_completion_length=g.max_completion_length,
                                cu_seqlens=batch.cu_seqlens(mb), return_entropy=True,
                                impl=cfg.model.impl, check_values=False))
                            weight = micro_batch_weight(g.loss_type, take(mask),
                                                        total_sequences=g.prompts_per_step * G,
                                                        total_tokens=total_tokens,
                                                        sequences=mb.count)
                            if not mb.real:  # a pass for the collectives only
                                weight = weight * 0.0
                            (loss * weight).backward()
                            share = take(mask).sum() / total_tokens.clamp(min=1.0) * mb.real
                            sums["loss"] = sums["loss"] + loss.detach() * weight
                            for k in STATS[1:]:
                                sums[k] = sums[k] + stats[k] * share
                _, grad_norm = run.optimizer_step(sums["loss"])
            t_update = time.perf_counter()

            # 6. Weight sync: the sampler gets the updated policy.
            if (step + 1) % cfg.vllm.sync_every == 0 or step + 1 == total:
                sync_weights(sampler, policy, world)
            t_end = time.perf_counter()

            # 7. Metrics over the global batch, evaluation, checkpoint.
            everyone = RewardResult.merge(world.gather(scored))
            names = list(everyone.values)
            all_rewards = torch.tensor(everyone.total)
            seconds = t_end - t0
            summed = world.sum(torch.stack([sums[k] for k in STATS]).reshape(-1).clone())
            layouts = world.gather((batch.positions, batch.pack_s))
            metrics = {
                "reward_mean": float(all_rewards.mean()), "reward_std": float(all_rewards.std()),
                "acc_reward": everyone.mean([n for n in names if "accuracy" in n]),
                "format_reward": everyone.mean([n for n in names if n == "format"]),
                "beta": beta, "lr": lr, "grad_norm": grad_norm,
                **dict(zip(STATS, summed.tolist())),
                "completion_length": float(total_tokens) / len(all_rewards),
                "tokens_per_s": float(total_tokens) / seconds, "step_seconds": seconds,
                "rollout_s": t_rollout - t0, "reward_s": t_reward - t_rollout,
                "ref_s": t_ref - t_reward, "update_s": t_update - t_ref,
                "sync_s": t_end - t_update,
                # One pass over the step: the positions the language model computed (all
                # ranks), and the host time the packed layouts took (packing.py, csrc/).
                "positions": sum(p for p, _ in layouts), "pack_s": max(t for _, t in layouts),
                "reward_failures": sum(world.gather(sum(rewards.failures.values()))),
                **{f"reward/{n}": everyone.mean([n]) for n in names}}
            all_is = world.gather(is_stats)  # importance-weight stats: the mean over ranks
            metrics.update({k: sum(d[k] for d in all_is) / len(all_is) for k in is_stats})
            peak = device_peak_mb(device)
            if peak is not None:
                metrics["peak_mem_mb"] = max(world.gather(peak))
            if cfg.log.eval_every and (step + 1) % cfg.log.eval_every == 0 and step + 1 < total:
                results[f"step_{step + 1}"] = evaluate_tasks(cfg, gen.refresh(policy), encoder,
                                                             world)
            run.end_step(step, metrics, results=json.dumps(results))
            if on_step is not None:
                on_step(step + 1, metrics)

    results["final"] = evaluate_tasks(cfg, gen.refresh(policy), encoder, world)
    kind = g.beta_schedule["kind"]
    print_results("after GRPO-D" if kind == "grpo_d" else "after GRPO", results["final"], world)
    if world.is_main:
        (s.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return {"metrics": metrics, "eval": results, "steps": total, "run_dir": str(s.run_dir)}


def reference_model(cfg: Config, s, warmup_dir):
    """The frozen reference: the policy at the start of GRPO (the SFT warm-up's result, or the
    model it started from), behind a Policy wrapper; sharded (or offloaded) under torchrun."""
    path = warmup_dir / "checkpoints" / "final" if cfg.grpo.sft_warmup_steps > 0 \
        else s.model_path
    problem = checkpoint_problem(path) if cfg.grpo.sft_warmup_steps > 0 else None
    if problem is not None:
        raise UserError(f"the reference model, the SFT warm-up's result {path}, is damaged "
                        f"({problem})",
                        fix=f"delete {s.run_dir} (or use another --output-dir) to redo the "
                            "warm-up")
    ref = Policy(load_model(str(path), device=s.device, dtype=s.dtype, trainable=False,
                            packing=s.packing))
    if s.world.distributed:
        shard(ref, s.world, compute_dtype=s.dtype, master_dtype=s.dtype,
              cpu_offload=cfg.dist.reference == "offload")
    return ref


class Replica:
    """The model transformers' generate runs on (the HF sampler, evaluation): in one process
    the policy's own model; under FSDP an unsharded copy on each rank, refreshed from the
    sharded policy one gathered parameter at a time."""

    def __init__(self, s):
        self.world = s.world
        self.model = s.model if not s.world.distributed else \
            load_model(s.model_path, device=s.device, dtype=s.dtype, trainable=False)

    def refresh(self, policy):
        """The model, with the policy's current weights (a collective under FSDP)."""
        if self.model is not policy.model:
            copy_weights(self.model, full_tensors(policy.model.named_parameters(), self.world))
        return self.model


def prompt_seed(seed: int, step: int, example: int) -> int:
    """The sampling seed of a prompt: a function of the run's seed, the step and the example's
    index only, so the samples do not depend on batch composition or world size."""
    digest = hashlib.blake2b(f"{seed}/{step}/{example}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@torch.no_grad()
def logprobs(batch: StepBatch, policy, fit: MicroBatchFit, impl: str, temperature: float
             ) -> torch.Tensor:
    """fp32 per-token log-probs [B, C] of the batch's completions under `policy` (a Policy
    wrapper), 0 where masked."""
    r = batch.rollout
    out = torch.zeros_like(r.logprobs)
    for attempt in fit.attempts(batch.units(), split=batch.split):
        with attempt:
            for mb in attempt.micro_batches:
                logp = policy(lambda m: token_logprobs(
                    batch.hidden(m, mb), lm_head_weight(m), batch.take(r.completion_ids, mb),
                    temperature=temperature, impl=impl, check_values=False))
                if mb.real:
                    batch.put(out, mb, logp)
    return out


def make_sampler(cfg: Config, model, encoder, model_path: str, dtype: torch.dtype,
                 max_images: int = 1):
    """The configured sampler: transformers' generate on `model` (hf: the policy itself, or its
    replica under FSDP) or a colocated vLLM engine (vllm) started from `model_path` (synced
    with the policy before use)."""
    kind = resolve_sampler(cfg.sampler)
    if kind == "hf":
        return HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                         encoder.multimodal_ids)
    from ..rollout.vllm_sampler import VLLMSampler

    g, v = cfg.grpo, cfg.vllm
    return VLLMSampler(
        model_path, stop_ids=encoder.stop_ids, pad_id=encoder.tokenizer.pad_token_id,
        suppress_ids=encoder.multimodal_ids, dtype=dtype,
        max_model_len=cfg.data.max_prompt_length + g.max_completion_length,
        max_num_seqs=v.max_num_seqs or g.prompts_per_step * g.num_generations, seed=cfg.seed,
        bucket_mb=v.sync_bucket_mb, drain_encoder_cache=v.drain_encoder_cache,
        sleep_level=v.sleep_level, gpu_memory_utilization=v.gpu_memory_utilization,
        cpu_kv_cache_gb=v.cpu_kv_cache_gb, enforce_eager=v.enforce_eager,
        max_images_per_prompt=max_images)


def sync_weights(sampler, policy, world: World) -> None:
    """Push the policy (a Policy wrapper) into the sampler: every parameter on the first sync
    (and after a weight-dropping sleep), afterwards only the trainable ones (a frozen tower
    never changes). Sharded parameters are gathered one at a time (a collective)."""
    full = getattr(sampler, "needs_full_sync", True)
    sampler.update_weights(full_tensors(
        ((n, p) for n, p in policy.model.named_parameters() if full or p.requires_grad), world))


@torch.no_grad()
def copy_weights(model, named) -> None:
    """Copy (name, tensor) pairs into `model`'s parameters of those names."""
    params = dict(model.named_parameters())
    for name, tensor in named:
        params[name].copy_(tensor)
