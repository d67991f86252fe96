"""The loss types and their normalisers: the one owner of how per-token losses are aggregated.

TRL 1.16's definitions (GRPOTrainer, loss_type=...), on S sequences with token weights m (the
mask):
- grpo, sapo:        per sequence sum(l * m) / max(sum(m), 1), then the mean over all S
                     sequences (fully masked ones count): the paper's Eq. 4;
- bnpo:              sum(l * m) / max(sum(m), 1) over the whole batch;
- dr_grpo:           sum(l * m) / (S * max_completion_length);
- dapo, cispo, vespo: sum(l * m) / num_items_in_batch (default: the batch's sum(m));
- luspo:             per sequence sum(l * m), then the mean over the S sequences.
`token_scales` turns each into per-token factors s_t with loss = sum_t s_t * l_t;
`micro_batch_weight` says how a micro-batch's loss counts in a larger batch's.
"""
from __future__ import annotations

from typing import Optional

import torch

from .options import LOSS_TYPES

# What each loss type's normaliser counts. A micro-batch's share of that count is its weight in
# the whole batch's loss (see micro_batch_weight).
NORMALISED_BY = {"grpo": "sequences", "bnpo": "tokens", "dr_grpo": "sequences",
                 "dapo": "tokens", "cispo": "tokens", "sapo": "sequences", "luspo": "sequences",
                 "vespo": "tokens"}
assert tuple(NORMALISED_BY) == LOSS_TYPES


def token_scales(batch) -> torch.Tensor:
    """s_t [N] with loss = sum_t s_t * loss_t, for a mr1fast.loss.inputs.TokenBatch; 0 where
    the mask is 0."""
    m, S = batch.mask, batch.n_seqs
    loss_type = batch.options.loss_type
    if loss_type in ("grpo", "sapo"):
        # Segment sums by cumsum differences: deterministic, unlike index_add on CUDA.
        csum = torch.cat([m.new_zeros(1), torch.cumsum(m, 0)])
        counts = csum[batch.cu_seqlens[1:]] - csum[batch.cu_seqlens[:-1]]
        return m / (S * counts.clamp(min=1.0))[batch.seq_id]
    if loss_type == "bnpo":
        return m / m.sum().clamp(min=1.0)
    if loss_type == "dr_grpo":
        return m / (S * batch.max_completion_length)
    if loss_type == "luspo":
        return m / S
    return m / batch.num_items


def micro_batch_weight(loss_type: str, micro_mask: torch.Tensor, *, total_sequences: int,
                       total_tokens: torch.Tensor, sequences: Optional[int] = None
                       ) -> torch.Tensor:
    """The weight w of a micro-batch's grpo_loss (computed on its own, with the default
    normalisers) in the loss of the whole batch it belongs to: the sum over micro-batches of
    w * grpo_loss(micro) is grpo_loss(batch). micro_mask [b, T] is the micro-batch's token
    mask (rows = sequences; in the packed layout [1, T_total], with `sequences` the number of
    sequences it holds); total_sequences and total_tokens (a 0-d or 1-element tensor) count
    the whole batch, across accumulation steps and processes. Returns a 0-d fp32 tensor on the
    mask's device (no sync: torch.full launches a fill, it copies nothing from the host)."""
    if loss_type not in NORMALISED_BY:
        raise ValueError(f"loss_type: expected one of {LOSS_TYPES}, got {loss_type!r}")
    if NORMALISED_BY[loss_type] == "sequences":
        count = micro_mask.shape[0] if sequences is None else sequences
        return torch.full((), count / total_sequences, device=micro_mask.device)
    return micro_mask.float().sum() / total_tokens.float().reshape(()).clamp(min=1.0)
