"""The public loss API: token_logprobs, grpo_loss and GRPOLoss, with the impl switch.

impl: "triton" (the fused kernels of mr1fast.kernels, through fused.py), "torch" (chunked.py),
"naive" (TRL's code path: full logits and a selective log-softmax; a baseline only), "auto"
(triton for CUDA inputs when Triton is importable, torch otherwise).

check_values (default True): the value checks that synchronise a GPU with the host (NaN/inf,
token ids in range; see inputs.py). A trainer that checks once per step passes False: then
neither function, forward or backward, reads a device value on the host.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .chunked import ChunkedTokenLogprobs
from .fused import triton_grpo_loss, triton_token_logprobs, unavailable_reason
from .inputs import TokenBatch, check_linear_inputs, check_linear_values, prepare_batch
from .naive import naive_token_logprobs
from .reference import grpo_objective, make_stats

IMPLS = ("auto", "triton", "torch", "naive")


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype) -> str:
    """The implementation that will run; an explicitly requested one that cannot run raises."""
    if impl not in IMPLS:
        raise ValueError(f"impl: expected one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        return "triton" if device.type == "cuda" and unavailable_reason(device, dtype) is None \
            else "torch"
    if impl == "triton":
        why = unavailable_reason(device, dtype)
        if why is not None:
            raise RuntimeError(f"impl='triton' cannot run here: {why}")
    return impl


def _flat_logprobs(impl, hidden, weight, targets, bias, temperature):
    """logp and entropy of hidden [n, d] for the torch and triton impls."""
    if impl == "torch":
        return ChunkedTokenLogprobs.apply(hidden, weight, bias, targets, temperature)
    return triton_token_logprobs(hidden, weight, bias, targets, temperature)


def token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
                   bias: Optional[torch.Tensor] = None, temperature: float = 1.0,
                   return_entropy: bool = False, impl: str = "auto", check_values: bool = True):
    """log p(targets) under softmax((hidden @ weight.T + bias) / temperature), per token.

    hidden [..., d] (fp32, bf16, fp16; fp64 on the torch paths), weight [V, d] (the LM head,
    possibly tied to the input embedding), targets [...] int64 in [0, V). Returns fp32 log-probs
    [...] (fp64 for fp64 inputs), differentiable w.r.t. hidden, weight and bias, and with
    return_entropy=True also the per-token softmax entropy (nats, fp32, not differentiable),
    computed in the same pass. No [..., V] tensor is built except by impl="naive".
    check_values=False skips the checks that sync (then the ids must be in range and hidden
    finite: nothing checks them).
    """
    check_linear_inputs(hidden, weight, targets, bias, temperature)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    temperature = float(temperature)
    if targets.numel() == 0:  # no tokens: empty results that still back-propagate
        logp = hidden.sum(-1).float() * 0.0
        return (logp, torch.zeros_like(logp)) if return_entropy else logp
    if check_values:
        check_linear_values(hidden, weight, targets, bias=bias)
    if impl == "naive":
        logp, entropy = naive_token_logprobs(hidden, weight, targets.long(), bias, temperature,
                                             return_entropy)
    else:
        d = hidden.shape[-1]
        logp, entropy = _flat_logprobs(impl, hidden.reshape(-1, d), weight,
                                       targets.reshape(-1).long(), bias, temperature)
        logp, entropy = logp.view(targets.shape), entropy.view(targets.shape)
    return (logp, entropy) if return_entropy else logp


def _empty_result(batch: TokenBatch, hidden, weight, return_entropy):
    """No kernel token: a zero loss that still back-propagates (zero gradients)."""
    loss = hidden.reshape(-1)[:0].float().sum() + weight.reshape(-1)[:0].float().sum()
    zero = torch.zeros(0, device=hidden.device)
    stats = make_stats(batch, zero, zero, zero.bool(), zero.bool(),
                       zero if return_entropy else None)
    return loss, stats


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              advantages: Optional[torch.Tensor] = None, *,
              rewards: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
              mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
              ref_logp: Optional[torch.Tensor] = None,
              importance_weights: Optional[torch.Tensor] = None,
              beta: Union[float, torch.Tensor] = 0.0, eps_low: float = 0.2,
              eps_high: Optional[float] = None, temperature: float = 1.0,
              loss_type: str = "grpo", max_completion_length: Optional[int] = None,
              num_items_in_batch=None, bias: Optional[torch.Tensor] = None,
              cu_seqlens: Optional[torch.Tensor] = None, return_entropy: bool = False,
              impl: str = "auto", check_values: bool = True):
    """The GRPO-D loss from the LM head's input, without materializing the logits.

    Per token: -min(r*A, clip(r, 1-eps_low, 1+eps_high)*A) * iw + beta * k3_kl, with
    r = exp(logp - old_logp) (on-policy when old_logp is None), k3_kl = exp(ref - logp) -
    (ref - logp) - 1, aggregated by loss_type ("grpo", "bnpo", "dr_grpo", "dapo"; TRL's
    definitions, see mr1fast.loss.normalizers).

    Shapes: hidden [B, T, d]; weight [V, d]; targets [B, T] int64; advantages [B] or [B, T]
    (or rewards [B] with group_size: group advantages computed in the fused pass); mask,
    old_logp, ref_logp, importance_weights [B, T] (fp32, detached). Packed layout: hidden
    [1, T_total, d] and cu_seqlens [S + 1]; then per-sequence tensors are [S].
    beta: float or 0-d tensor (a device tensor is read on the device; no recompilation for a
    new value). The targets and per-token inputs of tokens with mask 0 are ignored.
    check_values (default True) runs the value checks that sync with the GPU and drops the
    masked tokens before any kernel runs; False skips both (every token is computed, a masked
    one contributes an exact 0) so that nothing syncs: then hidden must be finite everywhere
    and the unmasked ids in range, unchecked.

    Returns (loss, stats): loss a 0-d fp32 tensor; stats detached fp32 "logp" [B, T] and the
    mask-weighted means "kl", "clip_low", "clip_high", "clip_frac" (and "entropy" when
    return_entropy). An empty batch (B = 0, T = 0, or every token masked) gives a zero loss
    whose gradients are zero, and zero stats.
    """
    batch = prepare_batch(hidden, weight, targets, advantages, rewards=rewards,
                          group_size=group_size, mask=mask, old_logp=old_logp,
                          ref_logp=ref_logp, importance_weights=importance_weights, beta=beta,
                          eps_low=eps_low, eps_high=eps_high, temperature=temperature,
                          loss_type=loss_type, max_completion_length=max_completion_length,
                          num_items_in_batch=num_items_in_batch, bias=bias,
                          cu_seqlens=cu_seqlens, check_values=check_values)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    if batch.n_kernel_tokens == 0:
        return _empty_result(batch, hidden, weight, return_entropy)
    if impl == "triton":
        return triton_grpo_loss(batch, weight, bias, return_entropy)
    if impl == "naive":
        # TRL computes every position's logits, masked ones included (their targets zeroed).
        safe_targets = torch.where(batch.mask != 0, batch.targets, 0).view(batch.out_shape)
        logp, entropy = naive_token_logprobs(hidden, weight, safe_targets, bias,
                                             batch.temperature, return_entropy)
        logp = batch.take(logp.reshape(-1))
        entropy = None if entropy is None else batch.take(entropy.reshape(-1))
    else:
        logp, entropy = _flat_logprobs(impl, batch.take(batch.hidden), weight,
                                       batch.take(batch.targets), bias, batch.temperature)
    return grpo_objective(batch, logp, entropy if return_entropy else None)


class GRPOLoss(nn.Module):
    """Holds a grpo_loss configuration; forward(hidden, weight, targets, advantages, **inputs).

    Set `.beta` between steps for a scheduled KL coefficient (see mr1fast.loss.schedules).
    """

    def __init__(self, *, beta: Union[float, torch.Tensor] = 0.0, eps_low: float = 0.2,
                 eps_high: Optional[float] = None, temperature: float = 1.0,
                 loss_type: str = "grpo", max_completion_length: Optional[int] = None,
                 return_entropy: bool = False, impl: str = "auto", check_values: bool = True):
        super().__init__()
        self.beta, self.eps_low, self.eps_high = beta, eps_low, eps_high
        self.temperature, self.loss_type, self.impl = temperature, loss_type, impl
        self.max_completion_length, self.return_entropy = max_completion_length, return_entropy
        self.check_values = check_values

    def forward(self, hidden, weight, targets, advantages=None, **inputs):
        return grpo_loss(hidden, weight, targets, advantages, beta=self.beta,
                         eps_low=self.eps_low, eps_high=self.eps_high,
                         temperature=self.temperature, loss_type=self.loss_type,
                         max_completion_length=self.max_completion_length,
                         return_entropy=self.return_entropy, impl=self.impl,
                         check_values=self.check_values, **inputs)
