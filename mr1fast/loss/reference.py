"""The specification: the GRPO family's loss in plain torch.

These definitions are the single source of the loss math. The fp64 reference (full logits) is
what every implementation is tested against; the "torch" and "naive" implementations reuse
`objective` (and the normalisers of normalizers.py) on their log-probs and entropies, so the
math exists once in torch (the Triton epilogue is the only other copy, and the tests hold it to
this one).

Per token t of sequence i, with r the importance ratio (module options: mr1fast.loss.options):
  log_ratio = clamp(logp - old, +-log_ratio_clamp)     (old = logp.detach() when on-policy)
  r         = exp(log_ratio) (token level) or exp(masked mean of log_ratio over i) (sequence,
              GSPO), with gradient through every logp
  grpo, bnpo, dr_grpo, dapo, luspo:
            l = -min(min(r, delta) * A, clip(r, 1 - eps_low, 1 + eps_high) * A),
                then, with dual_clip c: l = min(l, -c * A) where A < 0
  cispo:    l = -sg(min(r, eps_high)) * A * logp
  sapo:     l = -(4 / tau) * sigmoid(tau * (r - 1)) * A,  tau = tau_pos if A > 0 else tau_neg
  vespo:    l = -sg(phi) * A * logp, phi = exp(lam + k log w - lam w), log w = clamp(sum over i
            of clamp(logp - old, +-20) (+ log importance weights), [log 1e-8, 20]),
            (k, lam) = (k_pos, lam_pos) if A >= 0 else (k_neg, lam_neg)
  l *= off-policy mask (OPSM) * top-entropy mask * importance weight (vespo: folded into w)
  l += beta * kl,  kl = k1: logp - ref | k2: (ref - logp)^2 / 2 | k3: exp(ref - logp) -
       (ref - logp) - 1, with (ref - logp) clamped to +-log_ratio_clamp, times r when
       use_bias_correction_kl
  loss = sum_t scale_t * l_t - entropy_coef * sum_t H_t m'_t / max(sum_t m'_t, 1)
(scale_t: the loss type's normaliser, normalizers.token_scales; m' = the mask times the
top-entropy mask). This is TRL 1.16's GRPOTrainer._compute_loss, per call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .advantages import group_advantages
from .inputs import TokenBatch, prepare_batch
from .options import VESPO_LOG_MAX, VESPO_LOG_MIN
from .normalizers import token_scales


class KernelTokens:
    """The per-token inputs at the kernel tokens ([n] tensors, 0 where the mask is 0), and what
    depends on all of them (the entropy bonus's token count); slicing one gives a chunk's."""
    FIELDS = ("mask", "adv", "old", "ref", "iw", "sampling", "scale", "seq")

    def __init__(self, batch: Optional[TokenBatch] = None, per_token_inputs: bool = True,
                 **fields):
        if batch is None:
            self.__dict__.update(fields)
            return
        self.n_seqs = batch.n_seqs
        self.has_mask = batch.has_mask
        self.mask = batch.take(batch.mask)
        self.scale = batch.take(token_scales(batch))
        self.seq = batch.take(batch.seq_id)
        self.mask_total = self.mask.sum().clamp(min=1.0)
        if not per_token_inputs:  # what the stats need (the Triton path reads the raw inputs)
            return
        self.adv = sequence_advantages(batch)
        self.old = batch.at_kernel_tokens(batch.old_logp)
        self.ref = batch.at_kernel_tokens(batch.ref_logp)
        self.iw = batch.at_kernel_tokens(batch.importance_weights)
        self.sampling = batch.at_kernel_tokens(batch.sampling_logp)

    def __getitem__(self, sl: slice) -> "KernelTokens":
        out = dict(self.__dict__)
        for name in self.FIELDS:
            x = out[name]
            out[name] = None if x is None else x[sl]
        return KernelTokens(**out)

    def seq_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sequence sums [S] of x [n] (whole batch only)."""
        return torch.zeros(self.n_seqs, dtype=x.dtype, device=x.device).index_add(0, self.seq, x)

    def seq_mean(self, x: torch.Tensor) -> torch.Tensor:
        """The mask-weighted mean of x over each token's sequence, at every token [n]."""
        return (self.seq_sum(x * self.mask) / self.seq_sum(self.mask).clamp(min=1.0))[self.seq]


def sequence_advantages(batch: TokenBatch) -> torch.Tensor:
    """Advantages of the kernel tokens [n]: given, or from rewards by group_advantages."""
    if batch.advantages is not None:
        return batch.at_kernel_tokens(batch.advantages)
    adv = group_advantages(batch.rewards, batch.group_size, eps=batch.options.advantage_eps)
    return batch.at_kernel_tokens(adv[batch.seq_id])


def masked_quantile(x: torch.Tensor, valid: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile(x[valid], q) (linear interpolation) without reading the count on the
    host (no sync); +inf when nothing is valid."""
    k = valid.sum()
    s = torch.sort(torch.where(valid, x, torch.full_like(x, float("inf")))).values
    pos = (k - 1).clamp(min=0).to(x.dtype) * q
    lo, hi = pos.floor().long().view(1), pos.ceil().long().view(1)
    a, b = s.gather(0, lo), s.gather(0, hi)
    value = (a + (b - a) * (pos - lo.to(x.dtype))).view(())
    return torch.where((k > 0) & torch.isfinite(value), value, torch.full_like(value, float("inf")))


def top_entropy_mask(entropy: torch.Tensor, mask: torch.Tensor, quantile: float) -> torch.Tensor:
    """The live tokens (mask != 0) whose entropy * mask reaches the (1 - quantile) quantile of
    the live tokens' entropies (TRL's get_high_entropy_mask, per call), in the entropy's own
    precision (fp32, or fp64 for fp64), without a host sync. bool [n]."""
    h = entropy.detach()
    h = h if h.dtype == torch.float64 else h.float()
    live = mask != 0
    return (h * mask >= masked_quantile(h, live, 1.0 - quantile)) & live


def _vespo_phi(o, kt: KernelTokens, logp, old, adv, iw_per_sequence):
    """VESPO's sequence weight phi at every token (no gradient)."""
    with torch.no_grad():
        lr = (logp - old).clamp(-VESPO_LOG_MAX, VESPO_LOG_MAX)
        seq_log = kt.seq_sum(lr * kt.mask)
        if kt.iw is not None:
            log_is = torch.log(kt.iw).clamp(VESPO_LOG_MIN, VESPO_LOG_MAX) * (kt.mask != 0)
            # A per-sequence weight counts once per sequence, a per-token one once per token.
            seq_log = seq_log + (kt.seq_sum(log_is) / kt.seq_sum((kt.mask != 0).to(lr.dtype))
                                 .clamp(min=1.0) if iw_per_sequence else kt.seq_sum(log_is))
        log_w = seq_log.clamp(VESPO_LOG_MIN, VESPO_LOG_MAX)[kt.seq]
        pos = adv >= 0
        k = torch.where(pos, o.vespo_k_pos, o.vespo_k_neg)
        lam = torch.where(pos, o.vespo_lambda_pos, o.vespo_lambda_neg)
        return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(0.0, 0.0, 0.0)


def objective(batch: TokenBatch, kt: KernelTokens, logp: torch.Tensor,
              entropy: Optional[torch.Tensor]):
    """(loss, parts) of the kernel tokens kt from their log-probs logp [n] and entropies [n]
    (both differentiable; entropy may be None when no option reads it). A chunk kt[sl] of a
    token-separable objective (LossOptions.token_separable) gives that chunk's share of the
    loss. parts: detached per-token "kl", "low", "high" (clip flags), "phi" (vespo)."""
    o = batch.options
    if kt.has_mask:  # masked tokens: logp and every input 0, an exact 0 that cannot overflow
        logp = torch.where(kt.mask != 0, logp, torch.zeros((), dtype=logp.dtype,
                                                           device=logp.device))
    m, adv, C = kt.mask, kt.adv, o.log_ratio_clamp
    old = logp.detach() if kt.old is None else kt.old
    log_ratio = (logp - old).clamp(-C, C)
    if o.sequence_level:
        log_ratio = kt.seq_mean(log_ratio)
    ratio = torch.exp(log_ratio)
    no = torch.zeros_like(m, dtype=torch.bool)
    low = high = no
    phi = None
    if o.loss_type == "cispo":
        pg = -torch.clamp(ratio, max=o.eps_high).detach() * adv * logp
        high = (ratio > o.eps_high) & (adv > 0)
    elif o.loss_type == "sapo":
        tau = torch.where(adv > 0, o.sapo_temperature_pos, o.sapo_temperature_neg)
        pg = -torch.sigmoid(tau * (ratio - 1.0)) * (4.0 / tau) * adv
    elif o.loss_type == "vespo":
        phi = _vespo_phi(o, kt, logp, old, adv, batch.iw_per_sequence)
        pg = -phi * adv * logp
    else:
        clipped = torch.clamp(ratio, 1.0 - o.eps_low, 1.0 + o.eps_high)
        capped = ratio if o.delta is None else torch.clamp(ratio, max=o.delta)
        pg = -torch.min(capped * adv, clipped * adv)
        if o.dual_clip is not None:
            pg = torch.where(adv < 0, torch.min(pg, -o.dual_clip * adv), pg)
        low = (capped < 1.0 - o.eps_low) & (adv < 0)
        high = (capped > 1.0 + o.eps_high) & (adv > 0)
    if o.off_policy_mask_threshold is not None:
        sampled = kt.sampling if kt.sampling is not None else \
            (kt.old if kt.old is not None else logp.detach())
        seq_kl = kt.seq_mean(torch.nan_to_num(sampled - logp.detach(), nan=0.0))
        pg = pg * ((adv >= 0) | (seq_kl <= o.off_policy_mask_threshold))
    bonus_mask, bonus_total = m, kt.mask_total
    if o.top_entropy_quantile < 1.0:
        top = top_entropy_mask(entropy, m, o.top_entropy_quantile)
        pg = pg * top
        bonus_mask = m * top
        bonus_total = bonus_mask.sum().clamp(min=1.0)
    if kt.iw is not None and o.loss_type != "vespo":
        pg = pg * kt.iw
    if kt.ref is not None:
        d = (kt.ref - logp).clamp(-C, C)
        if o.kl_estimator == "k3":
            kl = torch.exp(d) - d - 1.0
        elif o.kl_estimator == "k2":
            kl = 0.5 * d * d
        else:
            kl = -d
        if o.use_bias_correction_kl:
            kl = kl * ratio
        per_token = pg + batch.beta * kl
    else:
        kl = torch.zeros_like(logp)
        per_token = pg
    loss = (per_token * kt.scale).sum()
    if o.entropy_coef != 0.0:
        loss = loss - o.entropy_coef * (entropy * bonus_mask).sum() / bonus_total
    return loss, {"kl": kl.detach(), "low": low, "high": high,
                  "phi": None if phi is None else phi.detach()}


def make_stats(batch: TokenBatch, kt: KernelTokens, logp, parts: dict, entropy=None) -> dict:
    """Detached fp32 stats from the kernel tokens' values: per-token logp (shape of targets, 0
    at masked tokens) and the mask-weighted means of kl and entropy. The clip shares are token
    means (token-level ratios) or, for sequence-level ratios, means over the S sequences (as TRL
    logs them); "phi_mean" (vespo) is a mean over sequences too."""
    m = kt.mask.float()
    denom = m.sum().clamp(min=1.0)

    def mean(x):
        return (x.detach().float() * m).sum() / denom

    def seq_mean(x):  # a value >= 0 per sequence (the same at each of its unmasked tokens;
        # 0 for a sequence without any), mean over the S sequences
        per_seq = torch.zeros(kt.n_seqs, dtype=torch.float32, device=m.device)
        per_seq = per_seq.scatter_reduce(0, kt.seq, x.detach().float() * (m != 0), "amax")
        return per_seq.sum() / max(kt.n_seqs, 1)

    if batch.active is None:  # every token computed; masked ones already hold logp 0
        full = logp.detach().float()
        if kt.has_mask:
            full = torch.where(kt.mask != 0, full, 0.0)
    else:
        full = torch.zeros(batch.mask.numel(), dtype=torch.float32, device=batch.mask.device)
        full[batch.active] = logp.detach().float()
    per_seq = batch.options.sequence_level
    stats = {"logp": full.view(batch.out_shape), "kl": mean(parts["kl"]),
             "clip_low": seq_mean(parts["low"]) if per_seq else mean(parts["low"]),
             "clip_high": seq_mean(parts["high"]) if per_seq else mean(parts["high"])}
    stats["clip_frac"] = stats["clip_low"] + stats["clip_high"]
    if parts.get("phi") is not None:
        stats["phi_mean"] = seq_mean(parts["phi"])
    if entropy is not None:
        stats["entropy"] = mean(entropy)
    return stats


def grpo_objective(batch: TokenBatch, logp: torch.Tensor, entropy: Optional[torch.Tensor] = None,
                   return_entropy: bool = False):
    """The loss and stats from all kernel tokens' log-probs logp [n] and entropies [n]."""
    kt = KernelTokens(batch)
    loss, parts = objective(batch, kt, logp, entropy)
    return loss, make_stats(batch, kt, logp, parts, entropy if return_entropy else None)


def reference_token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0):
    """log p(target) and the softmax entropy per token (both differentiable), from the full
    logits. [...], [...]"""
    logits = F.linear(hidden, weight, bias) / temperature
    logsm = torch.log_softmax(logits, dim=-1)
    logp = logsm.gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    entropy = -(logsm.exp() * logsm).sum(-1)
    return logp, entropy


def reference_grpo_loss(hidden, weight, targets, advantages=None, *, bias=None,
                        return_entropy=False, **kwargs):
    """grpo_loss computed plainly from full logits; pass fp64 tensors for the ground truth.
    kwargs: grpo_loss's inputs and options."""
    from .api import split_options
    inputs, options = split_options(kwargs)
    batch = prepare_batch(hidden, weight, targets, advantages, bias=bias, options=options,
                          **inputs)
    logp, entropy = reference_token_logprobs(batch.take(batch.hidden), weight,
                                             batch.take(batch.targets), bias=bias,
                                             temperature=batch.temperature)
    return grpo_objective(batch, logp, entropy, return_entropy)
