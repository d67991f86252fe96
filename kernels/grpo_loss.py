"""Fused GRPO-D loss in Triton, on top of the fused log-probs of token_logprobs.py.

Forward: the log-prob kernel's vocabulary-split partials go straight into
`_grpo_loss_fwd_kernel`, an O(N) epilogue that merges them and computes, per token, the group
advantage (from rewards, when given), ratio, clipping, k3 KL with the scheduled beta, the
normalized loss contribution and the gradient scale w_t = d loss / d logp. Backward feeds w_t
(times the incoming gradient) to the shared dlogits kernel. beta is read from a device tensor,
eps and the advantage eps are runtime floats: a new beta never recompiles and never syncs.
The math is the same as mr1fast.reference.per_token_grpo, which the tests hold it to.
"""
from __future__ import annotations

import torch

from mr1fast.batch import TokenBatch
from mr1fast.reference import make_stats, token_scales

from .token_logprobs import lse_partials, on_device, token_logprobs_backward, triton

if triton is not None:
    import triton.language as tl

    from .token_logprobs import _merge_partials

    @triton.jit
    def _grpo_loss_fwd_kernel(
            pmax_ptr, psum_ptr, pent_ptr, tgt_ptr, n_tokens, n_splits,
            adv_ptr, rewards_ptr, seq_ptr, group_size, adv_eps,
            old_ptr, ref_ptr, iw_ptr, scale_ptr, beta_ptr, eps_low, eps_high,
            lse_ptr, logp_ptr, ent_ptr, loss_ptr, dlogp_ptr, kl_ptr, low_ptr, high_ptr,
            HAS_OLD: tl.constexpr, HAS_REF: tl.constexpr, HAS_IW: tl.constexpr,
            FROM_REWARDS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_G: tl.constexpr):
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_tokens
        lse, logp, entropy = _merge_partials(pmax_ptr, psum_ptr, pent_ptr, tgt_ptr, rows, row_ok,
                                             n_tokens, n_splits, BLOCK_N)
        if FROM_REWARDS:
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
            adv = (own - mean) / (std + adv_eps)
        else:
            adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0)
        if HAS_OLD:
            old = tl.load(old_ptr + rows, mask=row_ok, other=0.0)
        else:
            old = logp  # on-policy: ratio 1, d ratio / d logp = 1
        ratio = tl.exp(logp - old)
        lo = 1.0 - eps_low
        hi = 1.0 + eps_high
        unclipped = ratio * adv
        clipped = tl.minimum(tl.maximum(ratio, lo), hi) * adv
        pg = -tl.minimum(unclipped, clipped)
        # Gradient flows through ratio unless the clipped branch is taken outside [lo, hi].
        live = (unclipped <= clipped) | ((ratio >= lo) & (ratio <= hi))
        dpg = tl.where(live, -adv * ratio, 0.0)
        if HAS_IW:
            iw = tl.load(iw_ptr + rows, mask=row_ok, other=0.0)
            pg = pg * iw
            dpg = dpg * iw
        if HAS_REF:
            beta = tl.load(beta_ptr).to(tl.float32)
            ref = tl.load(ref_ptr + rows, mask=row_ok, other=0.0)
            delta = ref - logp
            e_delta = tl.exp(delta)
            kl = e_delta - delta - 1.0
            loss = pg + beta * kl
            dloss = dpg + beta * (1.0 - e_delta)
        else:
            kl = tl.zeros([BLOCK_N], dtype=tl.float32)
            loss = pg
            dloss = dpg
        scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(logp_ptr + rows, logp, mask=row_ok)
        tl.store(ent_ptr + rows, entropy, mask=row_ok)
        tl.store(loss_ptr + rows, loss * scale, mask=row_ok)
        tl.store(dlogp_ptr + rows, dloss * scale, mask=row_ok)
        tl.store(kl_ptr + rows, kl, mask=row_ok)
        tl.store(low_ptr + rows, ((ratio < lo) & (adv < 0)).to(tl.float32), mask=row_ok)
        tl.store(high_ptr + rows, ((ratio > hi) & (adv > 0)).to(tl.float32), mask=row_ok)


ADVANTAGE_EPS = 1e-4  # R1-V / TRL; group_advantages' default


def _f32(x):
    return None if x is None else x.float().contiguous()


class TritonGRPOLoss(torch.autograd.Function):
    """Scalar loss of the active tokens; also returns detached per-token logp, kl, clip flags
    and entropy."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, adv, rewards, seq, group_size, old, ref, iw,
                scale, beta, eps_low, eps_high, temperature):
        n = hidden.shape[0]
        pmax, psum, pent, tgt, n_splits = lse_partials(hidden, weight, bias, targets,
                                                       temperature)
        out = torch.empty(8, n, dtype=torch.float32, device=hidden.device)
        lse, logp, ent, loss_t, dlogp, kl, low, high = out
        block = 256
        dummy = out[0]
        with on_device(hidden.device):
            _grpo_loss_fwd_kernel[(triton.cdiv(n, block),)](
                pmax, psum, pent, tgt, n, n_splits,
                adv if adv is not None else dummy, rewards if rewards is not None else dummy,
                seq if seq is not None else targets, group_size or 2, ADVANTAGE_EPS,
                old if old is not None else dummy, ref if ref is not None else dummy,
                iw if iw is not None else dummy, scale, beta, eps_low, eps_high,
                lse, logp, ent, loss_t, dlogp, kl, low, high,
                HAS_OLD=old is not None, HAS_REF=ref is not None, HAS_IW=iw is not None,
                FROM_REWARDS=rewards is not None, BLOCK_N=block,
                BLOCK_G=max(2, 1 << max(0, ((group_size or 2) - 1).bit_length())))
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
        return (dh, dw, db) + (None,) * 13


def triton_grpo_loss(batch: TokenBatch, weight, bias, return_entropy: bool):
    """grpo_loss on the active tokens of a validated batch through the fused kernels."""
    hidden = batch.take(batch.hidden).contiguous()
    dev = hidden.device
    beta = batch.beta if isinstance(batch.beta, torch.Tensor) else \
        torch.tensor(float(batch.beta), dtype=torch.float32, device=dev)
    at = (lambda x: _f32(batch.take(x)))
    loss, logp, kl, low, high, ent = TritonGRPOLoss.apply(
        hidden, weight.contiguous(), None if bias is None else bias.contiguous(),
        batch.take(batch.targets).contiguous(),
        at(batch.advantages), _f32(batch.rewards),
        batch.take(batch.seq_id).contiguous() if batch.rewards is not None else None,
        batch.group_size,
        at(batch.old_logp), at(batch.ref_logp), at(batch.importance_weights),
        at(token_scales(batch)), beta.reshape(1).float(), batch.eps_low, batch.eps_high,
        batch.temperature)
    return loss, make_stats(batch, logp, kl, low.bool(), high.bool(),
                            ent if return_entropy else None)
