"""The specification: the GRPO-D loss in plain torch.

These definitions are the single source of the loss math. The fp64 reference (full logits) is
what every implementation is tested against; the "torch" and "naive" implementations reuse
per_token_grpo and grpo_objective (and the normalisers of normalizers.py), so the math exists
once in torch (the Triton epilogue is the only other copy, and the tests hold it to this one).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .advantages import group_advantages
from .inputs import TokenBatch, prepare_batch
from .normalizers import token_scales


def per_token_grpo(logp, advantages, old_logp, ref_logp, importance_weights, beta,
                   eps_low: float, eps_high: float):
    """Per-token GRPO-D loss and its parts, all [n].

    loss = -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) * iw + beta * kl,
    r = exp(logp - old_logp) (old_logp None: on-policy, r = exp(logp - logp.detach()) = 1 with
    gradient), kl = exp(ref - logp) - (ref - logp) - 1 (k3; 0 when ref_logp is None).
    Returns (loss, kl, low_clipped, high_clipped), the clip flags as TRL defines them.
    """
    old = logp.detach() if old_logp is None else old_logp
    ratio = torch.exp(logp - old)
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    if importance_weights is not None:
        loss = loss * importance_weights
    if ref_logp is not None:
        delta = ref_logp - logp
        kl = torch.exp(delta) - delta - 1.0
        loss = loss + beta * kl
    else:
        kl = torch.zeros_like(logp)
    low = (ratio < 1.0 - eps_low) & (advantages < 0)
    high = (ratio > 1.0 + eps_high) & (advantages > 0)
    return loss, kl, low, high


def sequence_advantages(batch: TokenBatch) -> torch.Tensor:
    """Advantages of the kernel tokens [n]: given, or from rewards by group_advantages."""
    if batch.advantages is not None:
        return batch.at_kernel_tokens(batch.advantages)
    adv = group_advantages(batch.rewards, batch.group_size)
    return batch.at_kernel_tokens(adv[batch.seq_id])


def grpo_objective(batch: TokenBatch, logp: torch.Tensor, entropy: Optional[torch.Tensor] = None):
    """The loss and stats from the kernel tokens' log-probs logp [n] (differentiable). Kernel
    tokens with mask 0 (batch.has_mask) get logp and every input 0: an exact 0 contribution
    that nothing can overflow."""
    logp = batch.zero_masked(logp)
    loss_t, kl, low, high = per_token_grpo(
        logp, sequence_advantages(batch), batch.at_kernel_tokens(batch.old_logp),
        batch.at_kernel_tokens(batch.ref_logp), batch.at_kernel_tokens(batch.importance_weights),
        batch.beta, batch.eps_low, batch.eps_high)
    loss = (loss_t * batch.take(token_scales(batch))).sum()
    return loss, make_stats(batch, logp, kl, low, high, entropy)


def make_stats(batch: TokenBatch, logp, kl, low, high, entropy=None) -> dict:
    """Detached fp32 stats from the kernel tokens' values: per-token logp (shape of targets, 0
    at masked tokens), and the mask-weighted means of kl, the clip flags and entropy."""
    m = batch.take(batch.mask).float()
    denom = m.sum().clamp(min=1.0)

    def mean(x):
        return (x.detach().float() * m).sum() / denom

    if batch.active is None:  # every token computed; masked ones already hold logp 0
        full = logp.detach().float()
    else:
        full = torch.zeros(batch.mask.numel(), dtype=torch.float32, device=batch.mask.device)
        full[batch.active] = logp.detach().float()
    stats = {"logp": full.view(batch.out_shape), "kl": mean(kl),
             "clip_low": mean(low), "clip_high": mean(high)}
    stats["clip_frac"] = stats["clip_low"] + stats["clip_high"]
    if entropy is not None:
        stats["entropy"] = mean(entropy)
    return stats


def reference_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0):
    """log p(target) and the softmax entropy per token, from the full logits. [...], [...]"""
    logits = F.linear(hidden, weight, bias) / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def reference_grpo_loss(hidden, weight, targets, advantages=None, *, bias=None,
                        return_entropy=False, **kwargs):
    """grpo_loss computed plainly from full logits; pass fp64 tensors for the ground truth."""
    batch = prepare_batch(hidden, weight, targets, advantages, bias=bias, **kwargs)
    logp, entropy = reference_token_logprobs(batch.take(batch.hidden), weight,
                                             batch.take(batch.targets), bias=bias,
                                             temperature=batch.temperature)
    return grpo_objective(batch, logp, entropy if return_entropy else None)
