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

from .chunked import ChunkedGRPOLoss, ChunkedTokenLogprobs, closed_form, clipped_objective_grads
from .fused import triton_grpo_loss, triton_token_logprobs, unavailable_reason
from .inputs import TokenBatch, check_linear_inputs, check_linear_values, prepare_batch
from .naive import naive_token_logprobs
from .options import OPTION_NAMES, LossOptions
from .reference import KernelTokens, grpo_objective, make_stats, objective

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
    return_entropy=True also the per-token softmax entropy (nats, fp32, differentiable),
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
                                             return_entropy, entropy_grad=True)
    else:
        d = hidden.shape[-1]
        logp, entropy = _flat_logprobs(impl, hidden.reshape(-1, d), weight,
                                       targets.reshape(-1).long(), bias, temperature)
        logp, entropy = logp.view(targets.shape), entropy.view(targets.shape)
    return (logp, entropy) if return_entropy else logp


def split_options(kwargs: dict):
    """(the other kwargs, LossOptions of the option kwargs)."""
    opts = {k: kwargs[k] for k in OPTION_NAMES if k in kwargs}
    return {k: v for k, v in kwargs.items() if k not in opts}, LossOptions(**opts)


def _empty_result(batch: TokenBatch, hidden, weight, return_entropy):
    """No kernel token: a zero loss that still back-propagates (zero gradients)."""
    loss = hidden.reshape(-1)[:0].float().sum() + weight.reshape(-1)[:0].float().sum()
    zero = torch.zeros(0, device=hidden.device)
    parts = {"kl": zero, "low": zero.bool(), "high": zero.bool(), "phi": None}
    return loss, make_stats(batch, KernelTokens(batch), zero, parts,
                            zero if return_entropy else None)


def _wants_entropy(options: LossOptions, return_entropy: bool) -> bool:
    return return_entropy or options.entropy_coef != 0.0 or options.top_entropy_quantile < 1.0


def _torch_grpo_loss(batch: TokenBatch, weight, bias, return_entropy):
    kt = KernelTokens(batch)
    out = {}
    want = _wants_entropy(batch.options, return_entropy)
    loss, logp, ent = ChunkedGRPOLoss.apply(
        batch.take(batch.hidden), weight, bias, batch.take(batch.targets), batch.temperature,
        lambda sl, lp, en: objective(batch, kt[sl], lp, en),
        (lambda sl, lp: clipped_objective_grads(batch, kt[sl], lp))
        if closed_form(batch.options) else None, batch.options, want,
        torch.is_grad_enabled(), out)
    return loss, make_stats(batch, kt, logp, out["parts"], ent if return_entropy else None)


def grpo_loss(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
              advantages: Optional[torch.Tensor] = None, *,
              rewards: Optional[torch.Tensor] = None, group_size: Optional[int] = None,
              mask: Optional[torch.Tensor] = None, old_logp: Optional[torch.Tensor] = None,
              ref_logp: Optional[torch.Tensor] = None,
              importance_weights: Optional[torch.Tensor] = None,
              sampling_logp: Optional[torch.Tensor] = None,
              beta: Union[float, torch.Tensor] = 0.0, loss_type: str = "grpo",
              importance_sampling_level: str = "token", eps_low: float = 0.2,
              eps_high: Optional[float] = None, delta: Optional[float] = None,
              dual_clip: Optional[float] = None, kl_estimator: str = "k3",
              use_bias_correction_kl: bool = False, log_ratio_clamp: float = 20.0,
              entropy_coef: float = 0.0, top_entropy_quantile: float = 1.0,
              off_policy_mask_threshold: Optional[float] = None, advantage_eps: float = 1e-4,
              sapo_temperature_neg: float = 1.05, sapo_temperature_pos: float = 1.0,
              vespo_k_pos: float = 2.0, vespo_lambda_pos: float = 3.0,
              vespo_k_neg: float = 3.0, vespo_lambda_neg: float = 2.0,
              temperature: float = 1.0, max_completion_length: Optional[int] = None,
              num_items_in_batch=None, bias: Optional[torch.Tensor] = None,
              cu_seqlens: Optional[torch.Tensor] = None, return_entropy: bool = False,
              impl: str = "auto", check_values: bool = True):
    """The GRPO family's loss from the LM head's input, without materializing the logits.

    The objective (every loss_type of TRL 1.16, token or sequence (GSPO) ratios, delta and dual
    clipping, KL estimators k1/k2/k3 with TRL's bias correction, entropy bonus, top-entropy
    token selection, off-policy sequence masking) is specified in mr1fast.loss.reference and
    its options in mr1fast.loss.options; docs/API.md describes each. Defaults: the paper's
    GRPO-D (loss_type "grpo", token ratios, k3 KL, no bias correction).

    Shapes: hidden [B, T, d]; weight [V, d]; targets [B, T] int64; advantages [B] or [B, T]
    (or rewards [B] with group_size: group advantages, epsilon advantage_eps, computed in the
    fused pass); mask, old_logp, ref_logp, sampling_logp [B, T]; importance_weights [B, T],
    [B] or [B, 1] (all fp32, detached). Packed layout: hidden [1, T_total, d] and cu_seqlens
    [S + 1]; then per-sequence tensors are [S]. beta: float or 0-d tensor (a device tensor is
    read on the device; no recompilation for a new value, nor for any other option's). The
    targets and per-token inputs of tokens with mask 0 are ignored.
    check_values (default True) runs the value checks that sync with the GPU and drops the
    masked tokens before any kernel runs; False skips both (every token is computed, a masked
    one contributes an exact 0) so that nothing syncs: then hidden must be finite everywhere
    and the unmasked ids in range, unchecked.

    Returns (loss, stats): loss a 0-d fp32 tensor; stats detached fp32 "logp" [B, T] and the
    means "kl", "clip_low", "clip_high", "clip_frac" (and "entropy" when return_entropy,
    "phi_mean" for vespo). An empty batch (B = 0, T = 0, or every token masked) gives a zero
    loss whose gradients are zero, and zero stats.
    """
    options = LossOptions(
        loss_type=loss_type, importance_sampling_level=importance_sampling_level,
        eps_low=eps_low, eps_high=eps_high, delta=delta, dual_clip=dual_clip,
        kl_estimator=kl_estimator, use_bias_correction_kl=use_bias_correction_kl,
        log_ratio_clamp=log_ratio_clamp, entropy_coef=entropy_coef,
        top_entropy_quantile=top_entropy_quantile,
        off_policy_mask_threshold=off_policy_mask_threshold, advantage_eps=advantage_eps,
        sapo_temperature_neg=sapo_temperature_neg, sapo_temperature_pos=sapo_temperature_pos,
        vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
        vespo_lambda_neg=vespo_lambda_neg)
    batch = prepare_batch(hidden, weight, targets, advantages, rewards=rewards,
                          group_size=group_size, mask=mask, old_logp=old_logp,
                          ref_logp=ref_logp, importance_weights=importance_weights,
                          sampling_logp=sampling_logp, beta=beta, options=options,
                          temperature=temperature, max_completion_length=max_completion_length,
                          num_items_in_batch=num_items_in_batch, bias=bias,
                          cu_seqlens=cu_seqlens, check_values=check_values)
    impl = resolve_impl(impl, hidden.device, hidden.dtype)
    if batch.n_kernel_tokens == 0:
        return _empty_result(batch, hidden, weight, return_entropy)
    if impl == "triton":
        return triton_grpo_loss(batch, weight, bias, return_entropy)
    if impl == "torch":
        return _torch_grpo_loss(batch, weight, bias, return_entropy)
    # naive: TRL computes every position's logits, masked ones included (their targets zeroed).
    safe_targets = torch.where(batch.mask != 0, batch.targets, 0).view(batch.out_shape)
    logp, entropy = naive_token_logprobs(hidden, weight, safe_targets, bias, batch.temperature,
                                         _wants_entropy(options, return_entropy),
                                         entropy_grad=options.needs_entropy_grad)
    logp = batch.take(logp.reshape(-1))
    entropy = None if entropy is None else batch.take(entropy.reshape(-1))
    return grpo_objective(batch, logp, entropy, return_entropy)


class GRPOLoss(nn.Module):
    """Holds a grpo_loss configuration (its options, temperature, max_completion_length,
    return_entropy, impl, check_values); forward(hidden, weight, targets, advantages,
    **inputs) takes the per-call tensors (mask, old_logp, ref_logp, rewards, ...).

    Set `.beta` between steps for a scheduled KL coefficient (see mr1fast.loss.schedules).
    The options are validated here, at construction.
    """

    def __init__(self, *, beta: Union[float, torch.Tensor] = 0.0, temperature: float = 1.0,
                 max_completion_length: Optional[int] = None, return_entropy: bool = False,
                 impl: str = "auto", check_values: bool = True, **options):
        super().__init__()
        unknown = set(options) - set(OPTION_NAMES)
        if unknown:
            raise ValueError(f"GRPOLoss: unknown option(s) {sorted(unknown)}; the options are "
                             f"{OPTION_NAMES}")
        LossOptions(**options)  # validates now, not at the first step
        self.beta, self.options = beta, options
        self.temperature, self.impl = temperature, impl
        self.max_completion_length, self.return_entropy = max_completion_length, return_entropy
        self.check_values = check_values

    def forward(self, hidden, weight, targets, advantages=None, **inputs):
        return grpo_loss(hidden, weight, targets, advantages, beta=self.beta,
                         temperature=self.temperature,
                         max_completion_length=self.max_completion_length,
                         return_entropy=self.return_entropy, impl=self.impl,
                         check_values=self.check_values, **self.options, **inputs)
