"""The trainer's forward passes over one step's sequences, in the layout model.packing names.

`StepBatch` holds a step's prompts and completions (a GRPO rollout, or SFT targets) and hands
the loops what they need per micro-batch, whatever the layout:
- `split(size)`: the micro-batches (padded: `size` completions each, as slices; packed modes:
  whole groups within a budget of `size` packed positions), the same number on every process
  of a sharded model;
- `hidden(model, mb)`: the final hidden states that predict the micro-batch's completion tokens
  ([b, C, d] padded; [1, n, d] packed, no padding), each prompt's image features encoded once;
- `take(x, mb)`: a per-token [B, C] tensor in the same layout ([b, C] or [1, n]);
  `rows(x, mb)`: a per-completion [B] tensor; `cu_seqlens(mb)`: the packed layout's sequence
  boundaries for the loss (None padded); `put(out, mb, values)` writes per-token results back;
- `positions`: the positions the language model computed in the last split's passes (padding
  included: the cost the layouts differ in), `pack_s`: host seconds spent on the layouts.
The canonical per-token tensors (log-probs, masks, advantages) stay [B, C] / [B] on the device;
a packed micro-batch gathers from them with its token index.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Union

import time

import torch

from ..rollout.sampler import PromptBatch, Rollout
from .distributed import World
from .model import completion_hidden, encode_images, vision_keepalive
from .packing import (Packing, PromptLayout, equalize, pack, packed_hidden,
                      plan_micro_batches)


@dataclass
class MicroBatch:
    """Completions `rows` of the step (a slice when padded). real=False: a copy that runs only
    so that every process runs the same passes (its loss is weighted 0, its results unused)."""
    rows: Union[slice, list]
    real: bool = True
    packing: Optional[Packing] = None
    index: Optional[torch.Tensor] = None  # rows on the device (packed modes)

    @property
    def count(self) -> int:
        r = self.rows
        return r.stop - r.start if isinstance(r, slice) else len(r)


@dataclass
class StepBatch:
    """One step's prompts and completions; `features`: the frozen vision tower's output per
    image (None: the tower trains and each pass encodes the images again)."""
    prompts: PromptBatch
    rollout: Rollout
    features: Optional[tuple]
    mode: str = "padded"          # model.packing
    backend: str = "sdpa"         # packed modes: the attention backend (packing.BACKENDS)
    spatial_merge: int = 2
    world: World = field(default_factory=World)

    @staticmethod
    def features_of(policy, prompts: PromptBatch, world: World) -> tuple:
        """The frozen vision tower's output for the step's prompts (no_grad), each image once.
        Under FSDP a process without images still runs the tower (vision_keepalive), as the
        others do."""
        with torch.no_grad():
            if world.distributed and prompts.num_images == 0:
                policy(vision_keepalive)
                return ()
            return policy(encode_images, prompts)

    def __post_init__(self):
        self.layout, self.positions, self.pack_s = None, 0, 0.0
        self._splits: dict = {}
        if self.mode != "padded":
            t0 = time.perf_counter()
            # Host bookkeeping, once per step (the step's one sync for it): each completion's
            # length, and whether every mask is a prefix (1s, then 0s), which the packed
            # layouts take a completion to be.
            mask = self.rollout.completion_mask > 0
            lengths = mask.sum(1)
            prefix = torch.arange(mask.shape[1], device=mask.device)[None] < lengths[:, None]
            counts = torch.cat([lengths, (mask != prefix).any()[None]]).long().cpu()
            if counts[-1]:
                raise RuntimeError("model.packing=" + self.mode + ": a completion mask has a "
                                   "0 before a 1; the packed layouts take each completion's "
                                   "tokens to be a prefix of its row (model.packing=padded "
                                   "takes any mask)")
            self.lengths = counts[:-1]
            self.layout = PromptLayout.of(self.prompts, self.spatial_merge)
            self.pack_s += time.perf_counter() - t0

    @property
    def shared(self) -> bool:
        return self.mode == "shared_prefix"

    def units(self) -> int:
        """The step's size in the unit `split` takes: completions (padded) or packed
        positions (all in one micro-batch)."""
        B = self.rollout.completion_ids.shape[0]
        if self.mode == "padded":
            return B
        prompts = self.layout.lengths[self.rollout.prompt_index]
        if self.shared:  # each group's prompt once
            first = torch.ones(B, dtype=torch.bool)
            first[1:] = self.rollout.prompt_index[1:] != self.rollout.prompt_index[:-1]
            prompts = prompts[first]
        return int(prompts.sum() + self.lengths.sum())

    def split(self, size: int) -> list[MicroBatch]:
        """The micro-batches of at most `size` units each (size <= 0: one); the same list for
        every pass of the step that asks for this size (built once: the plan, the layouts,
        World.max and, on CUDA, the block masks)."""
        if size not in self._splits:
            self._splits[size] = self._split(size)
        out = self._splits[size]
        self.positions = sum(self._positions(mb) for mb in out if mb.real)
        return out

    def _split(self, size: int) -> list[MicroBatch]:
        B = self.rollout.completion_ids.shape[0]
        if self.mode == "padded":
            size = B if size <= 0 else min(size, B)
            out = [MicroBatch(slice(i, min(i + size, B))) for i in range(0, B, size)]
        else:
            t0 = time.perf_counter()
            # A completion without tokens (all masked) has nothing to compute.
            rows = [r for r, n in enumerate(self.lengths.tolist()) if n > 0]
            micro = plan_micro_batches(rows, self.rollout.prompt_index.tolist(),
                                       self.lengths.tolist(), self.layout.lengths.tolist(), size,
                                       self.shared)
            count = self.world.max(len(micro))  # every process the same number of passes
            micro, real = equalize(micro, count)
            device = self.rollout.completion_ids.device
            out = []
            for i, rows in enumerate(micro):
                packing = pack(self.prompts, self.layout, self.rollout.completion_ids,
                               self.rollout.prompt_index, self.lengths, rows, self.shared)
                out.append(MicroBatch(rows, i < real, packing,
                                      torch.tensor(rows).to(device, non_blocking=True)))
            self.pack_s += time.perf_counter() - t0
        return out

    def _positions(self, mb: MicroBatch) -> int:
        """The positions the language model's forward computes for `mb`."""
        if mb.packing is None:  # left-padded prompts + right-padded completions
            return mb.count * (self.prompts.input_ids.shape[1]
                               + self.rollout.completion_ids.shape[1])
        if self.backend == "sdpa":  # packing.SegmentRows: S rows of the longest segment
            return (mb.packing.seq_cu.shape[0] - 1) * mb.packing.max_seqlen
        return mb.packing.length

    def hidden(self, model, mb: MicroBatch) -> torch.Tensor:
        """Final hidden states that predict the completion tokens of `mb` under `model`."""
        if mb.packing is not None:
            prompts = mb.packing.prompts
        else:
            unique, local = torch.unique(self.rollout.prompt_index[mb.rows], return_inverse=True)
            prompts = unique.tolist()
        keepalive = None
        if self.features is None and self.world.distributed and \
                not any(self.prompts.image_counts[p] for p in set(prompts)):
            # The other processes run the sharded vision tower first in this pass: so does
            # this one (its backward then runs last, after the language model's, as theirs).
            keepalive = vision_keepalive(model)
        if mb.packing is not None:
            h = packed_hidden(model, self.prompts, self.features, mb.packing, self.backend)
        else:
            r = self.rollout
            sub = self.prompts.select(unique)
            feats = [self.features[i] for i in self.prompts.image_rows(prompts)] \
                if self.features is not None else encode_images(model, sub)
            h = completion_hidden(model, sub, feats, local, r.completion_ids[mb.rows],
                                  r.completion_mask[mb.rows])
        return h if keepalive is None else h + keepalive

    def take(self, x: Optional[torch.Tensor], mb: MicroBatch) -> Optional[torch.Tensor]:
        """A per-token [B, C] tensor in the micro-batch's layout ([b, C] or [1, n])."""
        if x is None:
            return None
        if mb.packing is None:
            return x[mb.rows]
        return x.reshape(-1)[mb.packing.token_index][None]

    def rows(self, x: Optional[torch.Tensor], mb: MicroBatch) -> Optional[torch.Tensor]:
        """A per-completion [B] tensor's entries for the micro-batch."""
        if x is None:
            return None
        return x[mb.rows] if mb.packing is None else x[mb.index]

    def cu_seqlens(self, mb: MicroBatch) -> Optional[torch.Tensor]:
        return None if mb.packing is None else mb.packing.cu_seqlens

    def put(self, out: torch.Tensor, mb: MicroBatch, values: torch.Tensor) -> None:
        """Write per-token `values` (the micro-batch's layout) into out [B, C], 0 where the
        completion mask is 0."""
        if mb.packing is None:
            mask = self.rollout.completion_mask[mb.rows]
            out[mb.rows] = torch.where(mask > 0, values, 0.0)
        else:
            out.view(-1)[mb.packing.token_index] = values.reshape(-1).to(out.dtype)
