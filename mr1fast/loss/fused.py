"""impl="triton": the loss library's side of the fused kernels (mr1fast.kernels).

The kernels take plain tensors and the options; this module turns a validated TokenBatch into
them (the kernel tokens and where each sequence starts, fp32 per-token inputs, the
normalisers) and their per-token outputs into the stats. Every objective runs in the kernels'
epilogue, the top-entropy threshold in torch (top_entropy_selection). Nothing here reads a
device value on the host.
"""
from __future__ import annotations

import torch

from .inputs import TokenBatch
from .options import VESPO_LOG_MAX, VESPO_LOG_MIN
from .reference import KernelTokens, make_stats, top_entropy_mask


def unavailable_reason(device: torch.device, dtype: torch.dtype):
    """Why impl='triton' cannot run on these inputs, or None when it can."""
    try:
        from mr1fast.kernels.token_logprobs import unavailable_reason as why
    except ImportError as e:  # pragma: no cover
        return f"mr1fast.kernels cannot be imported ({e})"
    return why(device, dtype)


def triton_token_logprobs(hidden, weight, bias, targets, temperature):
    """(logp, entropy) [n] fp32 of hidden [n, d] through the fused kernels, both
    differentiable."""
    from mr1fast.kernels.token_logprobs import TokenLogprobsFunction

    return TokenLogprobsFunction.apply(hidden.contiguous(), weight.contiguous(),
                                       None if bias is None else bias.contiguous(),
                                       targets.contiguous(), temperature)


def _f32(x):
    return None if x is None else x.float().contiguous()


def _kernel_cu_seqlens(batch: TokenBatch, kt: KernelTokens) -> torch.Tensor:
    """[S + 1] int64: where each sequence's tokens start on the kernel-token axis (the kept
    tokens stay in order, so each sequence's are contiguous; no host sync)."""
    if batch.active is None:
        return batch.cu_seqlens
    return torch.searchsorted(kt.seq, torch.arange(batch.n_seqs + 1, device=kt.seq.device))


def top_entropy_selection(quantile: float):
    """reference.objective's top-entropy selection as the kernels take it: (entropy [n], mask
    [n]) -> fp32 0/1 [n], the live tokens whose entropy * mask reaches the (1 - quantile)
    quantile of the live tokens' entropies (no host sync)."""
    return lambda entropy, mask: top_entropy_mask(entropy, mask, quantile).float()


def triton_grpo_loss(batch: TokenBatch, weight, bias, return_entropy: bool):
    """grpo_loss on the kernel tokens of a validated batch through the fused kernels: every
    objective of reference.objective runs in the epilogue (mr1fast.kernels.grpo_loss)."""
    from mr1fast.kernels.grpo_loss import GRPOLossFunction

    o = batch.options
    kt = KernelTokens(batch, per_token_inputs=False)
    from_rewards = batch.rewards is not None
    inputs = dict(
        scale=_f32(kt.scale), cu_seqlens=_kernel_cu_seqlens(batch, kt),
        mask=_f32(kt.mask), vespo_log_range=(VESPO_LOG_MIN, VESPO_LOG_MAX),
        advantages=None if from_rewards else _f32(batch.take(batch.advantages)),
        rewards=_f32(batch.rewards), group_size=batch.group_size if from_rewards else 0,
        old_logp=_f32(batch.take(batch.old_logp)), ref_logp=_f32(batch.take(batch.ref_logp)),
        importance_weights=_f32(batch.take(batch.importance_weights)),
        iw_per_sequence=batch.iw_per_sequence,
        sampling_logp=_f32(batch.take(batch.sampling_logp)),
        top_entropy=top_entropy_selection(o.top_entropy_quantile)
        if o.top_entropy_quantile < 1.0 else None,
        beta=batch.beta.reshape(1).float() if isinstance(batch.beta, torch.Tensor)
        else float(batch.beta))
    loss, logp, ent, kl, low, high, phi = GRPOLossFunction.apply(
        batch.take(batch.hidden).contiguous(), weight.contiguous(),
        None if bias is None else bias.contiguous(), batch.take(batch.targets).contiguous(),
        batch.temperature, o, inputs)
    parts = {"kl": kl, "low": low.bool(), "high": high.bool(),
             "phi": phi if o.loss_type == "vespo" else None}
    return loss, make_stats(batch, kt, logp, parts, ent if return_entropy else None)
