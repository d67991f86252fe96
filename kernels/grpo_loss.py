"""The GRPO family's loss in Triton, on top of the fused log-probs of token_logprobs.py.

Forward: the log-prob kernels give each token's log-prob and entropy (never the logits); then
`_grpo_loss_fwd_kernel`, an O(N) epilogue with one program per sequence, computes per token the
loss contribution, d loss / d logp and d loss / d entropy. Backward feeds both gradients (times
the incoming one) to the dlogits kernel of token_logprobs.py.

The epilogue covers every objective of mr1fast.loss.reference.objective (the specification,
which the tests hold it to): every loss type (the normaliser comes from the caller as a per-token
scale), token or sequence (GSPO) ratios, delta and dual clipping, KL estimators k1/k2/k3 with
or without the bias correction, the log-ratio clamp, importance weights per token or per
sequence, the off-policy sequence mask, VESPO's sequence weight, the entropy bonus. Objectives
that couple a sequence's tokens read per-sequence sums, so each program makes up to three
passes over its sequence's tokens, each O(its length):
  1. sums (sequence-level ratio, VESPO, off-policy mask only): the masked means of the clamped
     log-ratio and of sampled - logp, VESPO's log-weight;
  2. (sequence-level ratio only) the sum over the sequence's tokens of d loss / d (the
     sequence's log-ratio), which every token's gradient needs;
  3. the per-token outputs.
Only the top-entropy selection stays in torch: its threshold is a quantile over every token's
entropy, computed by the caller's function (grpo_loss_forward's top_entropy) between the
log-prob kernels and the epilogue; it reaches the kernel as a per-token 0/1 mask.

Runtime values (never tl.constexpr, so a new value never recompiles): every coefficient (beta,
eps, delta, dual clip, log-ratio clamp, entropy_coef, the off-policy threshold, SAPO's and
VESPO's parameters, the advantage epsilon, temperature) and the modes (policy family, KL
estimator, ratio level, bias correction, per-sequence weights), the modes as ints excluded from
Triton's integer specialisation. An absent option is +inf (delta, dual clip, off-policy
threshold); an absent optional input is None (Triton specialises on it). beta may be a device
tensor, read on the device. Nothing here reads a device value on the host.
"""
from __future__ import annotations

import torch

from .token_logprobs import (on_device, token_logprobs_backward, token_logprobs_forward,
                             triton)

# The policy term's families by kernel code: every loss type not named here uses the clipped
# ratio (grpo, bnpo, dr_grpo, dapo, luspo); they differ in their normaliser only.
POLICIES = {"cispo": 1, "sapo": 2, "vespo": 3}
KL_ESTIMATORS = {"k1": 1, "k2": 2, "k3": 3}
BLOCK_T = 256  # tokens per step of a program's passes

if triton is not None:
    import triton.language as tl

    _CISPO = tl.constexpr(1)
    _SAPO = tl.constexpr(2)
    _VESPO = tl.constexpr(3)
    _K2 = tl.constexpr(2)
    _K3 = tl.constexpr(3)

    @triton.jit
    def _group_advantage(rewards_ptr, s, group_size, adv_eps, BLOCK_G: tl.constexpr):
        """Sequence s's group advantage: (r - group mean) / (unbiased group std + eps)."""
        gi = tl.arange(0, BLOCK_G)
        g_ok = gi < group_size
        r = tl.load(rewards_ptr + (s // group_size) * group_size + gi, mask=g_ok, other=0.0)
        mean = tl.sum(r, axis=0) / group_size
        dev = tl.where(g_ok, r - mean, 0.0)
        std = tl.sqrt(tl.sum(dev * dev, axis=0) / (group_size - 1))
        return (tl.load(rewards_ptr + s) - mean) / (std + adv_eps)

    @triton.jit
    def _load_tokens(t, end, logp_ptr, mask_ptr, old_ptr):
        """(ok, live, m, logp, old) of the tokens t of a sequence ending at `end`: m the token
        weight (0 past the end), live = m != 0; a token that is not live reads logp = old = 0
        (its inputs are ignored, as in the reference), and on-policy old = logp."""
        ok = t < end
        m = tl.load(mask_ptr + t, mask=ok, other=0.0)
        live = m != 0.0
        logp = tl.load(logp_ptr + t, mask=live, other=0.0)
        if old_ptr is not None:
            old = tl.load(old_ptr + t, mask=live, other=0.0)
        else:
            old = logp
        return ok, live, m, logp, old

    @triton.jit
    def _policy_term(policy, ratio, logp, adv, phi, eps_low, eps_high, delta, dual_clip,
                     sapo_tau_pos, sapo_tau_neg):
        """The policy-gradient term pg per token, with d pg / d logp directly (g_logp, CISPO's
        and VESPO's detached weights times logp) and through the log-ratio (g_lr, i.e.
        d pg / d ratio * ratio), and the clip flags (0/1)."""
        zero = tl.zeros_like(ratio)
        g_logp = zero
        g_lr = zero
        low = zero
        high = zero
        if policy == _CISPO:
            w = tl.minimum(ratio, eps_high)
            pg = -w * adv * logp
            g_logp = -w * adv
            high = tl.where((ratio > eps_high) & (adv > 0), 1.0, 0.0)
        elif policy == _SAPO:
            tau = tl.where(adv > 0, sapo_tau_pos, sapo_tau_neg)
            gate = tl.sigmoid(tau * (ratio - 1.0))
            pg = -gate * (4.0 / tau) * adv
            g_lr = -4.0 * adv * gate * (1.0 - gate) * ratio
        elif policy == _VESPO:
            pg = -phi * adv * logp
            g_logp = -phi * adv
        else:
            lo = 1.0 - eps_low
            hi = 1.0 + eps_high
            capped = tl.minimum(ratio, delta)
            a = capped * adv
            b = tl.minimum(tl.maximum(ratio, lo), hi) * adv
            pg = -tl.minimum(a, b)
            # The gradient of the smaller side (on a tie both sides have the same derivative);
            # each clamp passes it on inside its closed range, as torch.clamp does.
            g_ratio = -adv * tl.where(a <= b, tl.where(ratio <= delta, 1.0, 0.0),
                                      tl.where((ratio >= lo) & (ratio <= hi), 1.0, 0.0))
            if dual_clip < float("inf"):  # pg <= -dual_clip * A where A < 0
                bound = -dual_clip * adv
                dual_clipped = (adv < 0) & (pg > bound)
                g_ratio = tl.where(dual_clipped, 0.0, g_ratio)
                pg = tl.where(dual_clipped, bound, pg)
            g_lr = g_ratio * ratio
            low = tl.where((capped < lo) & (adv < 0), 1.0, 0.0)
            high = tl.where((capped > hi) & (adv > 0), 1.0, 0.0)
        return pg, g_logp, g_lr, low, high

    @triton.jit
    def _kl_term(estimator, ref, logp, log_ratio_clamp):
        """The KL estimate per token from d = ref - logp (clamped to +-log_ratio_clamp, no
        gradient outside) and d kl / d logp: k1 = -d, k2 = d^2 / 2, k3 = e^d - d - 1."""
        raw = ref - logp
        d = tl.minimum(tl.maximum(raw, -log_ratio_clamp), log_ratio_clamp)
        inside = (raw >= -log_ratio_clamp) & (raw <= log_ratio_clamp)
        if estimator == _K3:
            e = tl.exp(d)
            kl = e - d - 1.0
            g = 1.0 - e
        elif estimator == _K2:
            kl = 0.5 * d * d
            g = -d
        else:
            kl = -d
            g = tl.zeros_like(d) + 1.0
        return kl, tl.where(inside, g, 0.0)

    @triton.jit(do_not_specialize=["policy", "kl_estimator", "sequence_ratio",
                                   "bias_correction_kl", "iw_per_sequence"])
    def _grpo_loss_fwd_kernel(
            # per token [n] fp32 (mask: the token weights); None when absent
            logp_ptr, ent_ptr, scale_ptr, mask_ptr, adv_ptr, old_ptr, ref_ptr, iw_ptr,
            sampling_ptr, top_ptr,
            # per sequence: kernel-token offsets [S + 1] int64, rewards [S] (group advantages)
            cu_ptr, rewards_ptr, group_size, adv_eps,
            # coefficients and modes (runtime; sequence_ratio, bias_correction_kl and
            # iw_per_sequence are 0 or 1)
            beta_ptr, beta, bonus_total_ptr, entropy_coef, policy, kl_estimator, sequence_ratio,
            bias_correction_kl, iw_per_sequence, eps_low, eps_high, delta, dual_clip,
            log_ratio_clamp, off_policy_threshold, sapo_tau_pos, sapo_tau_neg, vespo_k_pos,
            vespo_lambda_pos, vespo_k_neg, vespo_lambda_neg, vespo_log_min, vespo_log_max,
            # outputs [n] fp32
            loss_ptr, dlogp_ptr, dent_ptr, kl_ptr, low_ptr, high_ptr, phi_ptr,
            BLOCK_T: tl.constexpr, BLOCK_G: tl.constexpr):
        s = tl.program_id(0)
        start = tl.load(cu_ptr + s)
        end = tl.load(cu_ptr + s + 1)
        seq_adv = 0.0
        if rewards_ptr is not None:
            seq_adv = _group_advantage(rewards_ptr, s, group_size, adv_eps, BLOCK_G)
        if beta_ptr is not None:
            beta = tl.load(beta_ptr).to(tl.float32)
        bonus_norm = 0.0
        if bonus_total_ptr is not None:
            bonus_norm = entropy_coef / tl.load(bonus_total_ptr)

        # Pass 1: the sequence's sums.
        acc_m = tl.zeros([BLOCK_T], dtype=tl.float32)     # sum m
        acc_lr = tl.zeros([BLOCK_T], dtype=tl.float32)    # sum m * clamp(logp - old)
        acc_off = tl.zeros([BLOCK_T], dtype=tl.float32)   # sum m * (sampled - logp)
        acc_vlr = tl.zeros([BLOCK_T], dtype=tl.float32)   # sum m * VESPO's clamp(logp - old)
        acc_liw = tl.zeros([BLOCK_T], dtype=tl.float32)   # sum of VESPO's clamped log iw
        acc_live = tl.zeros([BLOCK_T], dtype=tl.float32)  # live tokens
        if (sequence_ratio != 0) | (policy == _VESPO) | (off_policy_threshold < float("inf")):
            for t0 in range(start, end, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                ok, live, m, logp, old = _load_tokens(t, end, logp_ptr, mask_ptr, old_ptr)
                acc_m += m
                acc_live += tl.where(live, 1.0, 0.0)
                acc_lr += m * tl.minimum(tl.maximum(logp - old, -log_ratio_clamp),
                                         log_ratio_clamp)
                acc_vlr += m * tl.minimum(tl.maximum(logp - old, -vespo_log_max), vespo_log_max)
                if sampling_ptr is not None:  # the sampler's log-probs, else old, else logp
                    gap = tl.load(sampling_ptr + t, mask=live, other=0.0) - logp
                    acc_off += m * tl.where(gap == gap, gap, 0.0)  # NaN (unscored) -> 0
                else:
                    acc_off += m * (old - logp)
                if iw_ptr is not None:
                    log_iw = tl.log(tl.load(iw_ptr + t, mask=live, other=1.0))
                    acc_liw += tl.where(live, tl.minimum(tl.maximum(log_iw, vespo_log_min),
                                                         vespo_log_max), 0.0)
        count = tl.maximum(tl.sum(acc_m, axis=0), 1.0)
        seq_lr = tl.sum(acc_lr, axis=0) / count
        seq_off_policy_kl = tl.sum(acc_off, axis=0) / count
        # VESPO's log-weight: a per-sequence importance weight counts once, a per-token one
        # once per token.
        seq_log_w = tl.sum(acc_vlr, axis=0) + tl.where(
            iw_per_sequence != 0, tl.sum(acc_liw, axis=0) / tl.maximum(tl.sum(acc_live, axis=0),
                                                                       1.0),
            tl.sum(acc_liw, axis=0))
        log_w = tl.minimum(tl.maximum(seq_log_w, vespo_log_min), vespo_log_max)

        # Passes 2 and 3: the per-token terms; a sequence-level ratio first sums
        # d loss / d (the sequence's log-ratio) over the sequence (sweep 0).
        acc_g = tl.zeros([BLOCK_T], dtype=tl.float32)
        for sweep in range(1 - sequence_ratio, 2):
            # d loss / d logp_u through the sequence's log-ratio: seq_g * m_u (0 where u's
            # log-ratio is clamped)
            seq_g = tl.sum(acc_g, axis=0) / count
            for t0 in range(start, end, BLOCK_T):
                t = t0 + tl.arange(0, BLOCK_T)
                ok, live, m, logp, old = _load_tokens(t, end, logp_ptr, mask_ptr, old_ptr)
                if rewards_ptr is not None:
                    adv = tl.where(live, seq_adv, 0.0)
                else:
                    adv = tl.load(adv_ptr + t, mask=live, other=0.0)
                raw_lr = logp - old
                inside = (raw_lr >= -log_ratio_clamp) & (raw_lr <= log_ratio_clamp)
                log_ratio = tl.minimum(tl.maximum(raw_lr, -log_ratio_clamp), log_ratio_clamp)
                log_ratio = tl.where(sequence_ratio != 0, seq_lr, log_ratio)
                ratio = tl.exp(log_ratio)
                phi = tl.zeros_like(ratio)
                if policy == _VESPO:
                    pos = adv >= 0
                    k = tl.where(pos, vespo_k_pos, vespo_k_neg)
                    lam = tl.where(pos, vespo_lambda_pos, vespo_lambda_neg)
                    phi = tl.exp(lam + k * log_w - lam * tl.exp(log_w))
                    phi = tl.where(phi < float("inf"), phi, 0.0)  # overflow counts 0
                pg, g_logp, g_lr, low, high = _policy_term(
                    policy, ratio, logp, adv, phi, eps_low, eps_high, delta, dual_clip,
                    sapo_tau_pos, sapo_tau_neg)
                # The masks and weights of pg: off-policy sequences with A < 0 (inf: off), the
                # top-entropy tokens, the importance weights (VESPO has them in phi).
                keep = tl.where(adv >= 0, 1.0,
                                tl.where(seq_off_policy_kl <= off_policy_threshold, 1.0, 0.0))
                top = tl.zeros_like(ratio) + 1.0
                if top_ptr is not None:
                    top = tl.load(top_ptr + t, mask=ok, other=0.0)
                keep *= top
                if iw_ptr is not None:
                    iw = tl.load(iw_ptr + t, mask=live, other=0.0)
                    keep *= tl.where(policy == _VESPO, 1.0, iw)
                pg *= keep
                g_logp *= keep
                g_lr *= keep
                kl = tl.zeros_like(ratio)
                if ref_ptr is not None:
                    ref = tl.load(ref_ptr + t, mask=live, other=0.0)
                    kl, g_kl = _kl_term(kl_estimator, ref, logp, log_ratio_clamp)
                    if bias_correction_kl != 0:  # kl * ratio, ratio with its gradient
                        g_lr += beta * kl * ratio
                        g_kl *= ratio
                        kl *= ratio
                    g_logp += beta * g_kl
                scale = tl.load(scale_ptr + t, mask=live, other=0.0)
                if sweep == 0:
                    acc_g += scale * g_lr
                else:
                    loss = scale * (pg + beta * kl)
                    if sequence_ratio != 0:
                        dlogp = scale * g_logp + tl.where(inside, m * seq_g, 0.0)
                    else:
                        dlogp = scale * (g_logp + tl.where(inside, g_lr, 0.0))
                    if bonus_total_ptr is not None:  # - entropy_coef * mean of H over m * top
                        dent = tl.where(live, -bonus_norm * m * top, 0.0)
                        loss += dent * tl.load(ent_ptr + t, mask=live, other=0.0)
                        tl.store(dent_ptr + t, dent, mask=ok)
                    tl.store(loss_ptr + t, loss, mask=ok)
                    tl.store(dlogp_ptr + t, tl.where(live, dlogp, 0.0), mask=ok)
                    tl.store(kl_ptr + t, kl, mask=ok)
                    tl.store(low_ptr + t, low, mask=ok)
                    tl.store(high_ptr + t, high, mask=ok)
                    tl.store(phi_ptr + t, phi, mask=ok)


def grpo_loss_forward(hidden, weight, bias, targets, options, *, scale, mask, cu_seqlens,
                      vespo_log_range, advantages=None, rewards=None, group_size=0,
                      old_logp=None, ref_logp=None, importance_weights=None,
                      iw_per_sequence=False, sampling_logp=None, top_entropy=None, beta=0.0,
                      temperature=1.0):
    """The loss's per-token values for n tokens, as a dict of [n] fp32 tensors: "loss" (the
    loss is their sum), "dlogp" and "dentropy" (d loss / d logp and / d entropy; "dentropy"
    None without an entropy bonus), "logp", "entropy", "lse", "kl", "low", "high" (clip flags
    0/1) and "phi" (VESPO's weight).

    hidden [n, d], weight [V, d], bias [V] or None, targets [n] int64: the LM head's input.
    options: mr1fast.loss.LossOptions (or any object with its attributes). scale [n] fp32: the
    loss type's normaliser (loss = sum_t scale_t * loss_t - the entropy bonus). mask [n] fp32:
    the token weights (0: the token's inputs are ignored; they weigh the sequence means and the
    entropy bonus). cu_seqlens [S + 1] int64: where each sequence's tokens start on the n axis
    (a sequence's tokens are contiguous and in order). vespo_log_range: VESPO's clamp of its
    log-weights (lo, hi).
    Exactly one of advantages [n] or rewards [S] with group_size (group advantages, epsilon
    options.advantage_eps). old_logp, ref_logp, importance_weights (per sequence when
    iw_per_sequence, repeated at each token), sampling_logp (the sampler's log-probs, for the
    off-policy mask): [n] fp32 or None. top_entropy: None (every token trains) or a function
    (entropy [n], mask [n]) -> [n] fp32 0/1, the tokens the policy term trains on (they also
    weigh the entropy bonus). beta: float or a 1-element fp32 device tensor. All tensors
    contiguous on one device.
    """
    n = hidden.shape[0]
    o = options
    logp, lse, ent = token_logprobs_forward(hidden, weight, bias, targets, temperature)
    top = None if top_entropy is None else top_entropy(ent, mask)
    bonus_total = None
    if o.entropy_coef != 0.0:
        bonus_total = (mask if top is None else mask * top).sum().clamp(min=1.0)
    out = torch.empty(7, n, dtype=torch.float32, device=hidden.device)
    loss_t, dlogp, dent, kl, low, high, phi = out
    beta_ptr = beta if isinstance(beta, torch.Tensor) else None
    inf = float("inf")
    with on_device(hidden.device):
        _grpo_loss_fwd_kernel[(cu_seqlens.numel() - 1,)](
            logp, ent, scale, mask, advantages, old_logp, ref_logp, importance_weights,
            sampling_logp, top,
            cu_seqlens, rewards, group_size, o.advantage_eps,
            beta_ptr, 0.0 if beta_ptr is not None else float(beta), bonus_total,
            o.entropy_coef, POLICIES.get(o.loss_type, 0), KL_ESTIMATORS[o.kl_estimator],
            int(o.importance_sampling_level == "sequence"), int(o.use_bias_correction_kl),
            int(iw_per_sequence), o.eps_low, o.eps_high,
            inf if o.delta is None else o.delta, inf if o.dual_clip is None else o.dual_clip,
            o.log_ratio_clamp,
            inf if o.off_policy_mask_threshold is None else o.off_policy_mask_threshold,
            o.sapo_temperature_pos, o.sapo_temperature_neg, o.vespo_k_pos, o.vespo_lambda_pos,
            o.vespo_k_neg, o.vespo_lambda_neg, *vespo_log_range,
            loss_t, dlogp, dent, kl, low, high, phi,
            BLOCK_T=BLOCK_T, BLOCK_G=max(2, 1 << max(0, (group_size - 1).bit_length())))
    return {"loss": loss_t, "dlogp": dlogp, "dentropy": None if bonus_total is None else dent,
            "logp": logp, "entropy": ent, "lse": lse, "kl": kl, "low": low, "high": high,
            "phi": phi}


class GRPOLossFunction(torch.autograd.Function):
    """(hidden, weight, bias, targets, temperature, options, inputs) -> (loss, logp, entropy,
    kl, low, high, phi): the scalar loss, differentiable w.r.t. hidden, weight and bias, and
    the detached per-token values of grpo_loss_forward (inputs: its keyword arguments)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, options, inputs):
        out = grpo_loss_forward(hidden, weight, bias, targets, options,
                                temperature=temperature, **inputs)
        with_entropy = out["dentropy"] is not None
        ctx.save_for_backward(hidden, weight, bias, targets, out["lse"], out["dlogp"],
                              out["entropy"] if with_entropy else None, out["dentropy"])
        ctx.temperature = temperature
        values = [out[k] for k in ("logp", "entropy", "kl", "low", "high", "phi")]
        ctx.mark_non_differentiable(*values)
        return (out["loss"].sum(), *values)

    @staticmethod
    def backward(ctx, grad_loss, *_):
        hidden, weight, bias, targets, lse, dlogp, ent, dent = ctx.saved_tensors
        dh, dw, db = token_logprobs_backward(
            hidden, weight, bias, targets, lse, dlogp * grad_loss, ctx.temperature,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1], entropy=ent,
            grad_entropy=None if dent is None else dent * grad_loss)
        return dh, dw, db, None, None, None, None
