"""Importance-sampling correction for the sampler/trainer mismatch.

The rollout's tokens come from the sampler's distribution (vLLM: other kernels, maybe another
dtype, maybe weights a few steps old), while GRPO's ratio assumes they come from the trainer's
policy at rollout time (old_logp). Weighting each token's loss by
w = pi_trainer(token) / pi_sampler(token) corrects the expectation; the weights are truncated
(or the tokens masked) above `cap`, to bound the variance:

- token:    w_t = exp(old_logp_t - sampler_logp_t)
- sequence: w = exp(sum_t (old_logp_t - sampler_logp_t)), the same for every token of a
  completion
- truncate: min(w, cap); mask: w where w <= cap, else 0.

The result goes to grpo_loss(importance_weights=...), which multiplies each token's loss by it.
"""
from __future__ import annotations

import torch

from .options import LEVELS

MODES = ("truncate", "mask")


def importance_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor,
                       mask: torch.Tensor, *, level: str = "token", mode: str = "truncate",
                       cap: float = 2.0) -> tuple[torch.Tensor, dict]:
    """Weights [B, T] (fp32, 0 where mask is 0) and stats: `is_weight_mean` (the raw weight's
    mean over tokens), `is_capped_frac` (share of tokens above cap) and `sampler_abs_diff`
    (mean |trainer_logp - sampler_logp|)."""
    if level not in LEVELS:
        raise ValueError(f"level: expected one of {LEVELS}, got {level!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    if not cap > 0:
        raise ValueError(f"cap: expected > 0, got {cap}")
    if trainer_logp.shape != sampler_logp.shape or mask.shape != trainer_logp.shape:
        raise ValueError(f"trainer_logp {tuple(trainer_logp.shape)}, sampler_logp "
                         f"{tuple(sampler_logp.shape)} and mask {tuple(mask.shape)}: expected "
                         "the same [B, T] shape")
    m = mask.float()
    diff = (trainer_logp.float() - sampler_logp.float()) * m
    if level == "token":
        log_w = diff
    else:
        log_w = diff.sum(-1, keepdim=True).expand_as(diff)
    w = torch.exp(log_w.clamp(max=80.0))  # exp(80) is finite in fp32; capped below anyway
    above = (w > cap) & (m > 0)
    capped = w.clamp(max=cap) if mode == "truncate" else torch.where(above, torch.zeros_like(w), w)
    n = m.sum().clamp(min=1)
    stats = {"is_weight_mean": float((w * m).sum() / n),
             "is_capped_frac": float(above.float().sum() / n),
             "sampler_abs_diff": float(diff.abs().sum() / n)}
    return capped * m, stats
