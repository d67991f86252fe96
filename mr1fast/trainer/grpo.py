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
Simplifications: the reference model is the policy at the start of GRPO (after the SFT
warm-up, if any), frozen; with a frozen vision tower, images are encoded once per step and
shared by every pass (each prompt's image once for its G completions in any case).
The loss runs with check_values=False, so it never syncs the GPU; the step's value checks run
where the step syncs anyway: the sampled ids' range after the rollout, and a non-finite loss
or gradient norm (which skips the optimizer step) in Run.optimizer_step.
"""
from __future__ import annotations

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
from .config import Config, kl_schedule
from .data import DataOrder
from .errors import UserError
from .evaluate import evaluate_tasks, print_results
from .metrics import device_peak_mb
from .model import completion_hidden, encode_images, lm_head_weight, load_model
from .rewards import RewardRunner
from .run import MicroBatchFit, Run, locked_output_dir, log, setup, total_steps
from .sft import train_sft

STATS = ("loss", "kl", "clip_frac", "clip_low", "clip_high", "entropy")


def train_grpo(cfg: Config, *, on_step: Optional[Callable[[int, dict], None]] = None) -> dict:
    """Run GRPO / GRPO-D as configured; returns the final metrics and eval results. Resumes
    from the newest intact checkpoint in cfg.output_dir when there is one. The output folder is
    locked for the run. `on_step(step, metrics)` is called after each step (tests use it to
    interrupt a run)."""
    with locked_output_dir(cfg):
        return _train_grpo(cfg, on_step)


def _train_grpo(cfg: Config, on_step) -> dict:
    g = cfg.grpo
    s = setup(cfg, per_step=g.prompts_per_step, per_step_key="grpo.prompts_per_step",
              rewards=g.rewards)
    policy, encoder, device = s.model, s.encoder, s.device
    total = total_steps(len(s.train_set), g.prompts_per_step, g.epochs, g.max_steps)
    mu, G = g.updates_per_batch, g.num_generations
    beta_at = kl_schedule(g.beta_schedule, total * mu)
    rewards = RewardRunner({k: float(v) for k, v in g.rewards.items()},
                           timeout_s=g.reward_timeout_s, log=log)
    results: dict = {}
    warmup_dir = s.run_dir / "sft_warmup"
    resume_from = latest_checkpoint(s.run_dir, log)
    if resume_from is None and g.sft_warmup_steps > 0:
        train_sft(cfg, policy, encoder, s.train_set, steps=g.sft_warmup_steps,
                  run_dir=warmup_dir)
        results["after_sft"] = evaluate_tasks(cfg, policy, encoder)
        print_results("after SFT warm-up", results["after_sft"])
    order = DataOrder(len(s.train_set), g.prompts_per_step, cfg.seed)
    # After the warm-up: the optimizer's fp32 master weights (bf16 models) copy the policy.
    with Run(cfg, g, s.run_dir, policy, encoder, order, total, updates_per_step=mu,
             desc="grpo", resume_from=resume_from) as run, rewards:
        if run.start > 0:
            results = json.loads(run.state["results"])
        ref = None
        if any(beta_at(k) > 0 for k in range(total * mu + 1)):
            ref_path = warmup_dir / "checkpoints" / "final" if g.sft_warmup_steps > 0 \
                else s.model_path
            problem = checkpoint_problem(ref_path) if g.sft_warmup_steps > 0 else None
            if problem is not None:
                raise UserError(f"the reference model, the SFT warm-up's result {ref_path}, "
                                f"is damaged ({problem})",
                                fix=f"delete {s.run_dir} (or use another --output-dir) to "
                                    "redo the warm-up")
            ref = load_model(str(ref_path), device=device, dtype=next(policy.parameters()).dtype,
                             trainable=False)
        sampler = make_sampler(cfg, policy, encoder, s.model_path)
        t_sync = time.perf_counter()
        sync_weights(sampler, policy)  # the engine starts from disk; the policy may be newer
        log(f"sampler: {type(sampler).__name__} (first weight sync "
            f"{time.perf_counter() - t_sync:.2f} s)")
        use_is = not isinstance(sampler, HFSampler) and cfg.vllm.importance_sampling != "none"
        params = SamplingParams(max_new_tokens=g.max_completion_length,
                                temperature=g.temperature, top_p=g.top_p, top_k=g.top_k,
                                ignore_eos=g.ignore_eos)
        fit = MicroBatchFit(g.micro_batch_size)
        vocab = lm_head_weight(policy).shape[0]
        metrics: dict = {}

        for step in run.steps():
            t0 = time.perf_counter()
            # 1. Rollout: G completions for each of the step's P prompts.
            indices = run.order.next()
            examples = [s.train_set[i] for i in indices]
            prompts = encoder.encode_examples(examples, device)
            rollout = sampler.generate(prompts, G, params,
                                       seeds=[prompt_seed(cfg.seed, step, i) for i in indices])
            ids, mask = rollout.completion_ids, rollout.completion_mask
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()
            if lo < 0 or hi >= vocab:
                raise RuntimeError(f"the sampler produced token ids in [{lo}, {hi}], outside "
                                   f"the LM head's {vocab} rows: do the tokenizer and the "
                                   "model's vocabulary match?")
            t_rollout = time.perf_counter()

            # 2. Rewards and 3. group advantages.
            completions = encoder.decode(ids, mask)
            scored = rewards(completions, [e.reward_row() for e in examples for _ in range(G)])
            reward = torch.tensor(scored.total, dtype=torch.float32, device=device)
            advantages = group_advantages(reward, G)
            t_reward = time.perf_counter()

            # 4. Log-probs of the rollout under the policy at rollout time and the reference.
            features = None
            if cfg.model.freeze_vision:
                with torch.no_grad():
                    features = encode_images(policy, prompts)
            batch = StepBatch(prompts, rollout, features)
            trainer_logp = batch.logprobs(policy, fit, cfg.model.impl, g.temperature) \
                if mu > 1 or use_is else None
            old_logp = trainer_logp if mu > 1 else None
            is_weights, is_stats = None, {}
            if use_is:
                is_weights, is_stats = importance_weights(
                    trainer_logp, rollout.logprobs, mask, level=cfg.vllm.importance_sampling,
                    mode=cfg.vllm.is_mode, cap=cfg.vllm.is_cap)
            ref_logp = batch.logprobs(ref, fit, cfg.model.impl, g.temperature) \
                if ref is not None else None
            t_ref = time.perf_counter()

            # 5. mu optimizer updates, each accumulating gradients over micro-batches.
            for u in range(mu):
                opt_step = step * mu + u
                beta, lr = beta_at(opt_step), run.set_lr(opt_step)
                for attempt in fit.attempts(len(ids), on_retry=run.zero_grad):
                    with attempt:
                        sums = dict.fromkeys(STATS, 0.0)
                        for rows in attempt.micro_batches:
                            loss, stats = grpo_loss(
                                batch.hidden(policy, rows), lm_head_weight(policy), ids[rows],
                                advantages[rows], mask=mask[rows], old_logp=at(old_logp, rows),
                                ref_logp=at(ref_logp, rows),
                                importance_weights=at(is_weights, rows), beta=beta,
                                eps_low=g.eps_low, eps_high=g.eps_high,
                                temperature=g.temperature, loss_type=g.loss_type,
                                max_completion_length=g.max_completion_length,
                                return_entropy=True, impl=cfg.model.impl, check_values=False)
                            weight = micro_batch_weight(g.loss_type, mask[rows], mask)
                            (loss * weight).backward()
                            share = mask[rows].sum() / mask.sum().clamp(min=1.0)
                            sums["loss"] = sums["loss"] + loss.detach() * weight
                            for k in STATS[1:]:
                                sums[k] = sums[k] + stats[k] * share
                _, grad_norm = run.optimizer_step(sums["loss"])
            t_update = time.perf_counter()

            # 6. Weight sync: the sampler gets the updated policy.
            if (step + 1) % cfg.vllm.sync_every == 0 or step + 1 == total:
                sync_weights(sampler, policy)
            t_end = time.perf_counter()

            # 7. Metrics, evaluation, checkpoint.
            names = list(scored.values)
            seconds = t_end - t0
            metrics = {
                "reward_mean": float(reward.mean()), "reward_std": float(reward.std()),
                "acc_reward": scored.mean([n for n in names if "accuracy" in n]),
                "format_reward": scored.mean([n for n in names if n == "format"]),
                "beta": beta, "lr": lr, "grad_norm": grad_norm,
                **{k: float(v) for k, v in sums.items()},
                "completion_length": float(mask.sum(1).mean()),
                "tokens_per_s": rollout.num_tokens / seconds, "step_seconds": seconds,
                "rollout_s": t_rollout - t0, "reward_s": t_reward - t_rollout,
                "ref_s": t_ref - t_reward, "update_s": t_update - t_ref,
                "sync_s": t_end - t_update, "reward_failures": sum(rewards.failures.values()),
                **{f"reward/{n}": scored.mean([n]) for n in names}, **is_stats}
            peak = device_peak_mb(device)
            if peak is not None:
                metrics["peak_mem_mb"] = peak
            if cfg.log.eval_every and (step + 1) % cfg.log.eval_every == 0 and step + 1 < total:
                results[f"step_{step + 1}"] = evaluate_tasks(cfg, policy, encoder)
            run.end_step(step, metrics, results=json.dumps(results))
            if on_step is not None:
                on_step(step + 1, metrics)

    results["final"] = evaluate_tasks(cfg, policy, encoder)
    kind = g.beta_schedule["kind"]
    print_results("after GRPO-D" if kind == "grpo_d" else "after GRPO", results["final"])
    (s.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return {"metrics": metrics, "eval": results, "steps": total, "run_dir": str(s.run_dir)}


def prompt_seed(seed: int, step: int, example: int) -> int:
    """The sampling seed of a prompt: a function of the run's seed, the step and the example's
    index only, so the samples do not depend on batch composition or world size."""
    digest = hashlib.blake2b(f"{seed}/{step}/{example}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def at(x: Optional[torch.Tensor], rows: slice) -> Optional[torch.Tensor]:
    return None if x is None else x[rows]


@dataclass
class StepBatch:
    """One step's prompts and rollout, with the frozen vision tower's image features per
    prompt (None: the tower trains, and each pass encodes the images again)."""
    prompts: PromptBatch
    rollout: Rollout
    features: Optional[tuple]

    def hidden(self, model, rows: slice) -> torch.Tensor:
        """Final hidden states [b, C, d] of the completions `rows` under `model`; each distinct
        prompt's image is encoded once (or taken from `features`)."""
        r = self.rollout
        unique, local = torch.unique(r.prompt_index[rows], return_inverse=True)
        sub = self.prompts.select(unique)
        feats = [self.features[i] for i in unique.tolist()] if self.features is not None \
            else encode_images(model, sub)
        return completion_hidden(model, sub, feats, local, r.completion_ids[rows],
                                 r.completion_mask[rows])

    @torch.no_grad()
    def logprobs(self, model, fit: MicroBatchFit, impl: str, temperature: float) -> torch.Tensor:
        """fp32 per-token log-probs [B, C] of the rollout under `model`, 0 where masked."""
        r = self.rollout
        out = torch.zeros_like(r.logprobs)
        for attempt in fit.attempts(len(out)):
            with attempt:
                for rows in attempt.micro_batches:
                    logp = token_logprobs(self.hidden(model, rows), lm_head_weight(model),
                                          r.completion_ids[rows], temperature=temperature,
                                          impl=impl, check_values=False)
                    out[rows] = torch.where(r.completion_mask[rows] > 0, logp, 0.0)
        return out


def make_sampler(cfg: Config, policy, encoder, model_path: str):
    """The configured sampler: transformers' generate on the policy itself (hf) or a colocated
    vLLM engine (vllm) started from `model_path` (synced with the policy before use)."""
    kind = resolve_sampler(cfg.sampler)
    if kind == "hf":
        return HFSampler(policy, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                         encoder.multimodal_ids)
    from ..rollout.vllm_sampler import VLLMSampler

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
