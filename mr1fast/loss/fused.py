"""impl="triton": the loss library's side of the fused kernels (mr1fast.kernels).

The kernels take plain tensors; this module turns a validated TokenBatch into them (the kernel
tokens, fp32 per-token inputs, the normalisers, the advantage epsilon) and their per-token
outputs into the stats. Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch

from .advantages import ADVANTAGE_EPS
from .inputs import TokenBatch
from .normalizers import token_scales
from .reference import make_stats


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    """Why impl='triton' cannot run on these inputs, or None when it can."""
    try:
        from mr1fast.kernels.token_logprobs import unavailable_reason as why
    except ImportError as e:  # pragma: no cover
        return f"mr1fast.kernels cannot be imported ({e})"
    return why(device, dtype)


def triton_token_logprobs(hidden, weight, bias, targets, temperature):
    """(logp, entropy) [n] fp32 of hidden [n, d] through the fused kernels."""
    from mr1fast.kernels.token_logprobs import TokenLogprobsFunction

    return TokenLogprobsFunction.apply(hidden.contiguous(), weight.contiguous(),
                                       None if bias is None else bias.contiguous(),
                                       targets.contiguous(), temperature)


def _f32(x):
    return None if x is None else x.float().contiguous()


def triton_grpo_loss(batch: TokenBatch, weight, bias, return_entropy: bool):
    """grpo_loss on the kernel tokens of a validated batch through the fused kernels."""
    from mr1fast.kernels.grpo_loss import GRPOLossFunction

    from_rewards = batch.rewards is not None
    beta = batch.beta.reshape(1).float() if isinstance(batch.beta, torch.Tensor) \
        else float(batch.beta)
    loss, logp, kl, low, high, ent = GRPOLossFunction.apply(
        batch.take(batch.hidden).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), batch.take(batch.targets).contiguous(),
        _f32(batch.take(token_scales(batch))), _f32(batch.take(batch.advantages)),
        _f32(batch.rewards), batch.take(batch.seq_id).contiguous() if from_rewards else None,
        batch.group_size if from_rewards else 0, ADVANTAGE_EPS,
        _f32(batch.take(batch.old_logp)), _f32(batch.take(batch.ref_logp)),
        _f32(batch.take(batch.importance_weights)), _f32(batch.kernel_mask), beta,
        batch.eps_low, batch.eps_high, batch.temperature)
    return loss, make_stats(batch, logp, kl, low.bool(), high.bool(),
                            ent if return_entropy else None)
