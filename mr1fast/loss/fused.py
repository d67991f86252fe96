"""impl="triton": the loss library's side of the fused kernels (mr1fast.kernels).

The kernels take plain tensors; this module turns a validated TokenBatch into them (the kernel
tokens, fp32 per-token inputs, the normalisers, the advantage epsilon) and their per-token
outputs into the stats. Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch

from .inputs import TokenBatch
from .options import LossOptions
from .reference import KernelTokens, make_stats, objective


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


def fused_epilogue_covers(options: LossOptions) -> bool:
    """Whether the Triton epilogue computes this objective in the kernel; the other objectives
    run the fused log-probs and entropies, then reference.objective's O(n) torch ops."""
    return (options.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo")
            and options.token_separable and options.kl_estimator == "k3"
            and not options.use_bias_correction_kl and options.delta is None
            and options.dual_clip is None and options.entropy_coef == 0.0)


def triton_grpo_loss(batch: TokenBatch, weight, bias, return_entropy: bool):
    """grpo_loss on the kernel tokens of a validated batch through the fused kernels."""
    from mr1fast.kernels.grpo_loss import GRPOLossFunction

    o = batch.options
    kt = KernelTokens(batch)
    if not fused_epilogue_covers(o):
        if o.needs_entropy_grad:
            raise NotImplementedError("entropy_coef != 0 with impl='triton': the entropy's "
                                      "gradient is not in the Triton backward yet; use "
                                      "impl='torch'")
        logp, ent = triton_token_logprobs(batch.take(batch.hidden), weight, bias,
                                          batch.take(batch.targets), batch.temperature)
        loss, parts = objective(batch, kt, logp, ent)
        return loss, make_stats(batch, kt, logp, parts, ent if return_entropy else None)
    from_rewards = batch.rewards is not None
    beta = batch.beta.reshape(1).float() if isinstance(batch.beta, torch.Tensor) \
        else float(batch.beta)
    loss, logp, kl, low, high, ent = GRPOLossFunction.apply(
        batch.take(batch.hidden).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), batch.take(batch.targets).contiguous(),
        _f32(kt.scale), _f32(batch.take(batch.advantages)),
        _f32(batch.rewards), batch.take(batch.seq_id).contiguous() if from_rewards else None,
        batch.group_size if from_rewards else 0, o.advantage_eps,
        _f32(batch.take(batch.old_logp)), _f32(batch.take(batch.ref_logp)),
        _f32(batch.take(batch.importance_weights)), _f32(batch.kernel_mask), beta,
        o.eps_low, o.eps_high, o.log_ratio_clamp, batch.temperature)
    parts = {"kl": kl, "low": low.bool(), "high": high.bool(), "phi": None}
    return loss, make_stats(batch, kt, logp, parts, ent if return_entropy else None)
