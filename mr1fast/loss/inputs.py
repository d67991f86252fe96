"""Input validation and the flat token layout shared by every loss implementation.

Two layouts reach the loss:
- padded: hidden [B, T, d], targets/mask/old_logp/ref_logp/sampling_logp [B, T],
  importance_weights [B, T] or per sequence [B] / [B, 1];
- packed: hidden [1, T_total, d] holding S concatenated sequences, with cu_seqlens [S + 1]
  (0, end of sequence 1, ..., T_total).
Both become one flat token axis with a sequence id per token; "B" in the loss normalisers is the
number of sequences (B, or S when packed).

Value checks (check_values=True, the default). Checks that read tensor values on the host
(NaN/inf in hidden and the per-token inputs, token ids in [0, V), mask >= 0, cu_seqlens
monotone) synchronise a GPU with the host. They are on by default for direct callers; a trainer
that checks once per step passes check_values=False, and then nothing here reads a device value
on the host (the shape, dtype and device checks stay: they need no sync). With the checks on,
the tokens with mask 0 are also dropped before any kernel runs (finding them is itself a sync);
with the checks off every token is computed and a masked one contributes an exact 0, so the
results are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Union

import torch

from .options import LossOptions


def _err(name: str, expected: str, got) -> ValueError:
    if isinstance(got, torch.Tensor):
        got = f"tensor of shape {tuple(got.shape)} and dtype {got.dtype}"
    return ValueError(f"{name}: expected {expected}, got {got}")


def check_linear_inputs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        bias: Optional[torch.Tensor], temperature: float) -> None:
    """Validates the LM-head inputs' types, shapes, dtypes and devices (no sync): hidden [..., d]
    float, weight [V, d] same dtype and device, targets [...] integer, bias [V],
    temperature > 0."""
    if not isinstance(hidden, torch.Tensor) or not hidden.is_floating_point() or hidden.dim() < 1:
        raise _err("hidden", "a float tensor [..., d]", hidden)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or \
            weight.shape[1] != hidden.shape[-1]:
        raise _err("weight", f"a tensor [V, d] with d = hidden.shape[-1] = {hidden.shape[-1]}",
                   weight)
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise _err("weight", f"dtype {hidden.dtype} on {hidden.device} (as hidden)", weight)
    if weight.shape[0] < 1:
        raise _err("weight", "at least one vocabulary row", weight)
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        raise _err("targets", "an int64 (or int32) tensor of token ids", targets)
    if targets.shape != hidden.shape[:-1]:
        raise _err("targets", f"shape {tuple(hidden.shape[:-1])} (hidden without its last dim)",
                   targets)
    if targets.device != hidden.device:
        raise _err("targets", f"a tensor on {hidden.device}", targets)
    if bias is not None and (not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],)
                             or bias.dtype != weight.dtype or bias.device != weight.device):
        raise _err("bias", f"a [{weight.shape[0]}] tensor of dtype {weight.dtype}", bias)
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or \
            not (math.isfinite(temperature) and temperature > 0):
        raise _err("temperature", "a finite float > 0", temperature)


def check_linear_values(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                        active: Optional[torch.Tensor] = None,
                        bias: Optional[torch.Tensor] = None) -> None:
    """The value checks (they sync): token ids in [0, V) at the active tokens (all when
    `active` is None), hidden finite there, the LM head's weight (and bias) finite."""
    t = targets.reshape(-1) if active is None else targets.reshape(-1)[active]
    if t.numel():
        lo, hi = torch.stack([t.min(), t.max()]).tolist()
        if lo < 0 or hi >= weight.shape[0]:
            raise ValueError(f"targets: token ids must lie in [0, V = {weight.shape[0]}), got "
                             f"ids in [{lo}, {hi}]")
    h = hidden.reshape(-1, hidden.shape[-1]) if active is None else \
        hidden.reshape(-1, hidden.shape[-1])[active]
    if not bool(torch.isfinite(h).all()):
        raise ValueError("hidden: contains NaN or inf" +
                         ("" if active is None else " at unmasked tokens"))
    for name, x in (("weight", weight), ("bias", bias)):
        if x is not None and not bool(torch.isfinite(x).all()):
            raise ValueError(f"{name}: the LM head's {name} contains NaN or inf")


@dataclass
class TokenBatch:
    """The loss inputs on one flat token axis. N = all tokens; the "kernel tokens" are those
    sent to the implementations: the tokens with mask != 0 (`active`) when they were found, else
    all N (`active` None; then `dead` marks the ones with mask 0, if any may be)."""
    hidden: torch.Tensor                 # [N, d]
    targets: torch.Tensor                # [N] int64
    mask: torch.Tensor                   # [N] fp32 (fp64 for fp64 hidden) token weights
    seq_id: torch.Tensor                 # [N] int64
    cu_seqlens: torch.Tensor             # [S + 1] int64
    active: Optional[torch.Tensor]       # [n] int64 kernel tokens, or None: all N
    has_mask: bool                       # a mask was given and its zeros were not dropped
    out_shape: tuple                     # shape of targets, for per-token outputs
    advantages: Optional[torch.Tensor]   # [N] per token, or None when rewards are given
    rewards: Optional[torch.Tensor]      # [S] or None
    group_size: Optional[int]
    old_logp: Optional[torch.Tensor]     # [N] or None (on-policy)
    ref_logp: Optional[torch.Tensor]     # [N] or None (no KL term)
    importance_weights: Optional[torch.Tensor]  # [N] or None (a per-sequence weight repeated)
    iw_per_sequence: bool                # importance_weights were given per sequence
    sampling_logp: Optional[torch.Tensor]  # [N] or None: the sampler's log-probs (OPSM)
    beta: Union[float, torch.Tensor]
    options: LossOptions
    temperature: float
    max_completion_length: int
    num_items: Union[float, torch.Tensor]  # dapo normaliser

    @property
    def n_seqs(self) -> int:
        return self.cu_seqlens.numel() - 1

    @property
    def n_kernel_tokens(self) -> int:
        return self.mask.numel() if self.active is None else self.active.numel()

    @property
    def loss_type(self) -> str:
        return self.options.loss_type

    def take(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x [N, ...] at the kernel tokens (no copy when they are all N)."""
        if x is None or self.active is None:
            return x
        return x[self.active]

    def zero_masked(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x (values of the kernel tokens) with 0 where the mask is 0: their inputs are
        ignored."""
        if x is None or not self.has_mask:
            return x
        return torch.where(self.mask != 0, x, torch.zeros((), dtype=x.dtype, device=x.device))

    def at_kernel_tokens(self, x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """x [N] at the kernel tokens, 0 where the mask is 0."""
        return self.zero_masked(self.take(x))


def _per_token_input(name, x, shape, device, active, check_values, non_negative=False):
    if x is None:
        return None
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.shape != shape:
        raise _err(name, f"a float tensor of shape {tuple(shape)} (as targets)", x)
    if x.device != device:
        raise _err(name, f"a tensor on {device}", x)
    flat = x.reshape(-1)
    if check_values:
        at = flat if active is None else flat[active]
        if not bool(torch.isfinite(at).all()):
            raise ValueError(f"{name}: contains NaN or inf at unmasked tokens")
        if non_negative and bool((at < 0).any()):
            raise ValueError(f"{name}: expected values >= 0 at unmasked tokens, got "
                             f"{at.min().item():.4g}")
    return flat


def _packed_layout(cu_seqlens, T: int, dev, check_values: bool):
    """(cu [S + 1] int64 on dev, seq_id [T] int64) of the packed layout."""
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or \
            cu_seqlens.is_floating_point() or cu_seqlens.numel() < 2:
        raise _err("cu_seqlens", "a 1-D integer tensor [S + 1]", cu_seqlens)
    if check_values:
        c = cu_seqlens.tolist()
        if c[0] != 0 or c[-1] != T or any(b < a for a, b in zip(c, c[1:])):
            raise ValueError(f"cu_seqlens: expected 0 = c_0 <= c_1 <= ... <= c_S = T_total = {T},"
                             f" got {c}")
    cu = cu_seqlens.to(device=dev, dtype=torch.int64, non_blocking=True)
    lens = cu[1:] - cu[:-1]
    # output_size: the result's length is known (T), so no sync to find it.
    seq_id = torch.repeat_interleave(torch.arange(lens.numel(), device=dev), lens, output_size=T)
    return cu, seq_id


def _longest_sequence(cu_seqlens, T: int, check_values: bool) -> int:
    """dr_grpo's default max_completion_length: the longest sequence. Read on the host: free for
    a CPU cu_seqlens, a sync for a device one (allowed only with the checks on)."""
    if cu_seqlens is None:
        return T
    if cu_seqlens.device.type != "cpu" and not check_values:
        raise ValueError("max_completion_length: required for loss_type='dr_grpo' with a device "
                         "cu_seqlens and check_values=False (finding the longest sequence would "
                         "sync)")
    c = cu_seqlens.tolist()
    return max(b - a for a, b in zip(c, c[1:]))


def _importance_weights(x, B, T, S, seq_id, dev, active, check_values):
    """importance_weights [S], [S, 1] (per sequence) or [B, T] -> ([N], per_sequence)."""
    if x is None:
        return None, False
    if not isinstance(x, torch.Tensor) or not x.is_floating_point() or \
            x.shape not in ((S,), (S, 1), (B, T)):
        raise _err("importance_weights", f"a float tensor of shape ({S},) or ({S}, 1) (per "
                   f"sequence) or ({B}, {T}) (per token)", x)
    if x.shape == (B, T):  # (when T == 1 and S == B both readings give the same weights)
        return _per_token_input("importance_weights", x, (B, T), dev, active, check_values,
                                non_negative=True), False
    if x.device != dev:
        raise _err("importance_weights", f"a tensor on {dev}", x)
    if check_values and not (bool(torch.isfinite(x).all()) and bool((x >= 0).all())):
        raise ValueError("importance_weights: expected finite values >= 0")
    return x.reshape(-1)[seq_id], True


def prepare_batch(hidden, weight, targets, advantages=None, *, rewards=None, group_size=None,
                  mask=None, old_logp=None, ref_logp=None, importance_weights=None,
                  sampling_logp=None, beta=0.0, options: Optional[LossOptions] = None,
                  temperature=1.0, max_completion_length=None, num_items_in_batch=None,
                  bias=None, cu_seqlens=None, check_values=True) -> TokenBatch:
    """Validates the grpo_loss arguments (ValueError naming the argument) and flattens them.
    check_values=False skips the checks that sync (module doc)."""
    options = LossOptions() if options is None else options
    if not isinstance(options, LossOptions):
        raise _err("options", "a mr1fast.loss.LossOptions", type(options).__name__)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        raise _err("hidden", "a float tensor [B, T, d] (or [1, T_total, d] with cu_seqlens)",
                   hidden)
    B, T, _ = hidden.shape
    dev = hidden.device
    if not isinstance(targets, torch.Tensor) or targets.shape != (B, T):
        raise _err("targets", f"an int64 tensor of shape ({B}, {T})", targets)
    check_linear_inputs(hidden, weight, targets, bias, temperature)
    fdt = torch.float64 if hidden.dtype == torch.float64 else torch.float32
    if mask is None:
        mask_flat = torch.ones(B * T, device=dev, dtype=fdt)
    else:
        if not isinstance(mask, torch.Tensor) or mask.shape != (B, T):
            raise _err("mask", f"a tensor of shape ({B}, {T})", mask)
        if mask.device != dev:
            raise _err("mask", f"a tensor on {dev}", mask)
        mask_flat = mask.reshape(-1).to(fdt)
        if check_values and (not bool(torch.isfinite(mask_flat).all()) or
                             bool((mask_flat < 0).any())):
            raise ValueError("mask: expected finite values >= 0 (1 = train on the token)")
    active = None
    if mask is not None and check_values:
        active = torch.nonzero(mask_flat).view(-1)
        if active.numel() == mask_flat.numel():
            active = None  # nothing masked: no gather copies
    has_mask = mask is not None and not check_values
    if check_values:
        check_linear_values(hidden, weight, targets, active, bias)

    if cu_seqlens is None:
        cu = torch.arange(B + 1, device=dev, dtype=torch.int64) * T
        seq_id = torch.arange(B, device=dev).repeat_interleave(T)
    else:
        if B != 1:
            raise _err("hidden", "shape [1, T_total, d] in the packed layout (cu_seqlens given)",
                       hidden)
        cu, seq_id = _packed_layout(cu_seqlens, T, dev, check_values)
    S = cu.numel() - 1

    if (advantages is None) == (rewards is None):
        raise ValueError("advantages / rewards: give exactly one of advantages ([B] or [B, T]) "
                         "or rewards ([B]) with group_size")
    adv_flat = rew = None
    if advantages is not None:
        if not isinstance(advantages, torch.Tensor) or not advantages.is_floating_point() or \
                advantages.device != dev:
            raise _err("advantages", f"a float tensor on {dev}", advantages)
        if advantages.shape == (S,):
            adv_flat = advantages.to(fdt)[seq_id]
        elif advantages.shape == (B, T):
            adv_flat = advantages.reshape(-1).to(fdt)
        else:
            raise _err("advantages", f"shape ({S},) (per sequence) or ({B}, {T}) (per token)",
                       advantages)
        if check_values and not bool(torch.isfinite(
                adv_flat if active is None else adv_flat[active]).all()):
            raise ValueError("advantages: contains NaN or inf")
        if group_size is not None:
            raise ValueError("group_size: only used with rewards=, not with advantages=")
    else:
        if not isinstance(rewards, torch.Tensor) or rewards.shape != (S,) or \
                not rewards.is_floating_point() or rewards.device != dev:
            raise _err("rewards", f"a float tensor of shape ({S},) on {dev}", rewards)
        if check_values and not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards: contains NaN or inf")
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
            raise _err("group_size", "an int >= 2 with rewards=", group_size)
        if S % group_size:
            raise ValueError(f"group_size: {group_size} does not divide the number of "
                             f"sequences {S}")
        rew = rewards.to(fdt)

    per_tok = {}
    for name, x in (("old_logp", old_logp), ("ref_logp", ref_logp),
                    ("sampling_logp", sampling_logp)):
        flat = _per_token_input(name, x, (B, T), dev, active, check_values)
        per_tok[name] = None if flat is None else flat.to(fdt)
    iw, iw_per_sequence = _importance_weights(importance_weights, B, T, S, seq_id, dev, active,
                                              check_values)
    per_tok["importance_weights"] = None if iw is None else iw.to(fdt)

    if isinstance(beta, torch.Tensor):
        if beta.dim() != 0 or not beta.is_floating_point():
            raise _err("beta", "a float or a 0-d float tensor", beta)
        if beta.device != dev:
            raise _err("beta", f"a tensor on {dev} (read on the device, no host sync)", beta)
        if check_values and not (bool(torch.isfinite(beta)) and bool(beta >= 0)):
            raise ValueError(f"beta: expected a finite value >= 0, got {beta.item()}")
        if check_values and ref_logp is None and bool(beta > 0):
            raise ValueError("ref_logp: required when beta > 0 (the KL term needs the reference "
                             "model's log-probs)")
    elif isinstance(beta, bool) or not isinstance(beta, (int, float)) or \
            not (math.isfinite(beta) and beta >= 0):
        raise _err("beta", "a finite float >= 0 or a 0-d tensor", beta)
    elif beta > 0 and ref_logp is None:
        raise ValueError("ref_logp: required when beta > 0 (the KL term needs the reference "
                         "model's log-probs)")
    if max_completion_length is None:  # only dr_grpo uses it
        max_completion_length = _longest_sequence(cu_seqlens, T, check_values) \
            if options.loss_type == "dr_grpo" else 1
    if isinstance(max_completion_length, bool) or not isinstance(max_completion_length, int) or \
            max_completion_length < 1:
        raise _err("max_completion_length", "an int >= 1", max_completion_length)
    if num_items_in_batch is None:
        num_items = mask_flat.sum().clamp(min=1.0)
    elif isinstance(num_items_in_batch, torch.Tensor):
        if num_items_in_batch.numel() != 1:
            raise _err("num_items_in_batch", "a number or a 1-element tensor", num_items_in_batch)
        num_items = num_items_in_batch.to(device=dev, dtype=mask_flat.dtype,
                                          non_blocking=True).reshape(())
        if check_values and not (bool(torch.isfinite(num_items)) and bool(num_items > 0)):
            raise ValueError(f"num_items_in_batch: expected a finite number > 0 (the tokens "
                             f"that normalise dapo), got {num_items.item()}")
    elif isinstance(num_items_in_batch, (int, float)) and not isinstance(num_items_in_batch, bool) \
            and math.isfinite(num_items_in_batch) and num_items_in_batch > 0:
        num_items = float(num_items_in_batch)
    else:
        raise _err("num_items_in_batch", "a finite number > 0 (masked tokens across "
                   "accumulation steps)", num_items_in_batch)

    return TokenBatch(
        hidden=hidden.reshape(B * T, hidden.shape[-1]), targets=targets.reshape(-1).long(),
        mask=mask_flat,
        seq_id=seq_id, cu_seqlens=cu, active=active, has_mask=has_mask, out_shape=(B, T),
        advantages=adv_flat, rewards=rew, group_size=group_size,
        old_logp=per_tok["old_logp"], ref_logp=per_tok["ref_logp"],
        importance_weights=per_tok["importance_weights"], iw_per_sequence=iw_per_sequence,
        sampling_logp=per_tok["sampling_logp"], beta=beta, options=options,
        temperature=float(temperature), max_completion_length=max_completion_length,
        num_items=num_items)
