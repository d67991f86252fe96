"""Fused GRPO-D loss in Triton, on top of the fused log-probs of token_logprobs.py.

Forward: the log-prob kernel's vocabulary-split partials go straight into
`_grpo_loss_fwd_kernel`, an O(N) epilogue that merges them and computes, per token, the group
advantage (from rewards, when given), ratio, clipping, k3 KL with the scheduled beta, the
normalized loss contribution and the gradient scale w_t = d loss / d logp. Backward feeds w_t
(times the incoming gradient) to the shared dlogits kernel of token_logprobs.py.

Every optional input (advantages or rewards, old and reference log-probs, importance weights,
a token mask, a beta tensor) is passed as None when absent, and Triton specialises on it.
beta (a float, or a device tensor read on the device), eps and the advantage epsilon are
runtime arguments: a new value never recompiles and never syncs. The per-token normaliser
`scale` comes from the caller (mr1fast.loss owns the loss types). The math is the same as
mr1fast.loss.reference.per_token_grpo, which the tests hold it to.
"""
from __future__ import annotations

import torch

from .token_logprobs import lse_partials, on_device, token_logprobs_backward, triton

if triton is not None:
    import triton.language as tl

    from .token_logprobs import _merge_partials

    @triton.jit
    def _grpo_loss_fwd_kernel(
            pmax_ptr, psum_ptr, pent_ptr, tgt_ptr, n_tokens, n_splits, scale_ptr, mask_ptr,
            adv_ptr, rewards_ptr, seq_ptr, group_size, adv_eps, old_ptr, ref_ptr, iw_ptr,
            beta_ptr, beta, eps_low, eps_high, log_ratio_clamp,
            lse_ptr, logp_ptr, ent_ptr, loss_ptr, dlogp_ptr, kl_ptr, low_ptr, high_ptr,
            BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_tokens
        lse, logp, entropy = _merge_partials(pmax_ptr, psum_ptr, pent_ptr, tgt_ptr, rows, row_ok,
                                             n_tokens, n_splits, BLOCK_N)
        live = row_ok
        if mask_ptr is not None:
            # Masked tokens (weight 0) were not dropped by the caller: every input of theirs is
            # read as 0, so they contribute an exact 0 and nothing there can overflow.
            live = row_ok & (tl.load(mask_ptr + rows, mask=row_ok, other=0.0) != 0.0)
            logp = tl.where(live, logp, 0.0)
        if rewards_ptr is not None:
            # Group advantage of the token's sequence: (r - group mean) / (unbiased std + eps).
            seq = tl.load(seq_ptr + rows, mask=row_ok, other=0)
            first = (seq // group_size) * group_size
            gi = tl.arange(0, BLOCK_G)
            g_ok = row_ok[:, None] & (gi < group_size)[None, :]
            r = tl.load(rewards_ptr + first[:, None] + gi[None, :], mask=g_ok, other=0.0)
            mean = tl.sum(r, axis=1) / group_size
            dev = tl.where(g_ok, r - mean[:, None], 0.0)
            std = tl.sqrt(tl.sum(dev * dev, axis=1) / (group_size - 1))
            own = tl.load(rewards_ptr + seq, mask=row_ok, other=0.0)
            adv = tl.where(live, (own - mean) / (std + adv_eps), 0.0)
        else:
            adv = tl.load(adv_ptr + rows, mask=live, other=0.0)
        if old_ptr is not None:
            old = tl.load(old_ptr + rows, mask=live, other=0.0)
        else:
            old = logp  # on-policy: ratio 1, d ratio / d logp = 1
        # The log-ratio clamped to +-log_ratio_clamp (no gradient outside), as the reference.
        log_ratio = logp - old
        inside = (log_ratio >= -log_ratio_clamp) & (log_ratio <= log_ratio_clamp)
        ratio = tl.exp(tl.minimum(tl.maximum(log_ratio, -log_ratio_clamp), log_ratio_clamp))
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        unclipped = ratio * adv
        clipped = tl.minimum(tl.maximum(ratio, lo), hi) * adv
        pg = -tl.minimum(unclipped, clipped)
        # Gradient flows through ratio unless the clipped branch is taken outside [lo, hi].
        through = (unclipped <= clipped) | ((ratio >= lo) & (ratio <= hi))
        dpg = tl.where(through & inside, -adv * ratio, 0.0)
        if iw_ptr is not None:
            iw = tl.load(iw_ptr + rows, mask=live, other=0.0)
            pg = pg * iw
            dpg = dpg * iw
        if ref_ptr is not None:
            if beta_ptr is not None:
                beta = tl.load(beta_ptr).to(tl.float32)
            ref = tl.load(ref_ptr + rows, mask=live, other=0.0)
            raw = ref - logp
            delta = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
            e_delta = tl.exp(delta)
            kl = e_delta - delta - 1.0
            loss = pg + beta * kl
            d_inside = (raw >= -log_ratio_clamp) & (raw <= log_ratio_clamp)
            dloss = dpg + tl.where(d_inside, beta * (1.0 - e_delta), 0.0)
        else:
            kl = tl.zeros([BLOCK_N], dtype=tl.float32)
            loss = pg
            dloss = dpg
        scale = tl.load(scale_ptr + rows, mask=live, other=0.0)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(logp_ptr + rows, logp, mask=row_ok)
        tl.store(ent_ptr + rows, entropy, mask=row_ok)
        tl.store(loss_ptr + rows, loss * scale, mask=row_ok)
        tl.store(dlogp_ptr + rows, dloss * scale, mask=row_ok)
        tl.store(kl_ptr + rows, kl, mask=row_ok)
        tl.store(low_ptr + rows, ((ratio < lo) & (adv < 0)).to(tl.float32), mask=row_ok)
        tl.store(high_ptr + rows, ((ratio > hi) & (adv > 0)).to(tl.float32), mask=row_ok)


def grpo_loss_forward(hidden, weight, bias, targets, scale, *, advantages=None, rewards=None,
                      seq_id=None, group_size=0, adv_eps=1e-4, old_logp=None, ref_logp=None,
                      importance_weights=None, mask=None, beta=0.0, eps_low=0.2, eps_high=0.2,
                      log_ratio_clamp=20.0, temperature=1.0):
    """The epilogue's outputs for n tokens: (loss_t, logp, kl, low, high, entropy, lse, dlogp),
    each [n] fp32.

    hidden [n, d], weight [V, d], bias [V] or None, targets [n] int64 in [0, V), scale [n] fp32
    (loss = sum scale_t * loss_t). Exactly one of advantages [n] (per token) or rewards [S] with
    seq_id [n] and group_size (group advantages, epsilon adv_eps). old_logp, ref_logp,
    importance_weights, mask: [n] fp32 or None (mask None: every token counts; else tokens
    with mask 0 give 0 everywhere). beta: float or a 1-element fp32 device tensor. All
    tensors contiguous on one device."""
    n = hidden.shape[0]
    pmax, psum, pent, tgt, n_splits = lse_partials(hidden, weight, bias, targets, temperature)
    out = torch.empty(8, n, dtype=torch.float32, device=hidden.device)
    lse, logp, ent, loss_t, dlogp, kl, low, high = out
    beta_ptr = beta if isinstance(beta, torch.Tensor) else None
    block = 256
    with on_device(hidden.device):
        _grpo_loss_fwd_kernel[(triton.cdiv(n, block),)](
            pmax, psum, pent, tgt, n, n_splits, scale, mask, advantages, rewards, seq_id,
            group_size, adv_eps, old_logp, ref_logp, importance_weights, beta_ptr,
            0.0 if beta_ptr is not None else float(beta), eps_low, eps_high, log_ratio_clamp,
            lse, logp, ent, loss_t, dlogp, kl, low, high,
            BLOCK_N=block, BLOCK_G=max(2, 1 << max(0, (group_size - 1).bit_length())))
    return loss_t, logp, kl, low, high, ent, lse, dlogp


class GRPOLossFunction(torch.autograd.Function):
    """The scalar loss sum_t scale_t * loss_t, differentiable w.r.t. hidden, weight and bias;
    also returns the detached per-token logp, kl, clip flags (low, high) and entropy. Arguments
    as grpo_loss_forward's, in its order."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, scale, advantages, rewards, seq_id,
                group_size, adv_eps, old_logp, ref_logp, importance_weights, mask, beta, eps_low,
                eps_high, log_ratio_clamp, temperature):
        loss_t, logp, kl, low, high, ent, lse, dlogp = grpo_loss_forward(
            hidden, weight, bias, targets, scale, advantages=advantages, rewards=rewards,
            seq_id=seq_id, group_size=group_size, adv_eps=adv_eps, old_logp=old_logp,
            ref_logp=ref_logp, importance_weights=importance_weights, mask=mask, beta=beta,
            eps_low=eps_low, eps_high=eps_high, log_ratio_clamp=log_ratio_clamp,
            temperature=temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, dlogp)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(logp, kl, low, high, ent)
        return loss_t.sum(), logp, kl, low, high, ent

    @staticmethod
    def backward(ctx, grad_loss, *_):
        hidden, weight, bias, targets, lse, dlogp = ctx.saved_tensors
        dh, dw, db = token_logprobs_backward(hidden, weight, bias, targets, lse,
                                             dlogp * grad_loss, ctx.temperature,
                                             ctx.needs_input_grad[0], ctx.needs_input_grad[1])
        return (dh, dw, db) + (None,) * 16
