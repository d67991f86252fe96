"""Packed forwards: no padding, and (shared_prefix) each prompt computed once per group.

The completions of a micro-batch are laid out in one of three ways (model.packing):
- padded:        each completion after its own left-padded prompt, one row each, as generate
                 laid them out (model.completion_hidden): the reference the others are tested
                 against;
- packed:        one row, each completion after its own copy of its prompt, back to back;
- shared_prefix: one row of groups [prompt, c_1, ..., c_k]: the prompt once, each completion
                 attending to its prompt and causally to itself, never to another completion;
                 groups never see each other.
Positions are the prompt's 3-D mRoPE position ids (image tokens on their t/h/w grid, exactly as
transformers' get_rope_index computes them) and, for each completion, the prompt's next
position onwards: the positions of the padded forward, so the hidden states are the same. The
hidden state that predicts a completion's first token is its prompt's last (shared by a group).

The per-step data path runs on the host: `PromptLayout` (each prompt's unpadded length and
mRoPE positions, once per step) and `pack` (one micro-batch's layout: where each position's
token comes from, its positions, its segment and kind, the positions that predict each
completion token, the sequence boundaries). Both have a native implementation in csrc/ (the
mr1fast.trainer._native extension, built by setup.sh where a compiler exists) and the Python
reference below, with identical results; MR1FAST_NATIVE=0 forces the reference.

Attention: the masks come from the segments, passed to transformers' model as prepared masks
(the public way its forward takes one) and run by the attention function of attention.py:
a dense boolean mask for SDPA (CPU: torch's FlexAttention has no CPU backward), a FlexAttention
block mask (CUDA), or, for plain packing, flash-attn's varlen kernels with the sequence
boundaries (CUDA with flash-attn installed).
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..rollout.sampler import PromptBatch
from .attention import has_flash_attn

BACKENDS = ("sdpa", "flex", "varlen")


# ---------------------------------------------------------------------------------------------
# The data path: the Python reference and the native dispatch.

@functools.lru_cache(maxsize=None)
def native():
    """The mr1fast.trainer._native module (csrc/packing.cpp), or None where it was not built or
    MR1FAST_NATIVE=0."""
    if os.environ.get("MR1FAST_NATIVE", "1") == "0":
        return None
    try:
        from . import _native
    except ImportError:
        return None
    return _native


def rope_positions_reference(input_ids: torch.Tensor, attention_mask: torch.Tensor,
                             image_grid_thw: torch.Tensor, image_token_id: int,
                             spatial_merge: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(positions [3, P, L], next position [P]) of left-padded prompts (CPU int64): text tokens
    advance one position on all three axes; a run of image tokens takes the next grid and lays
    its tokens on it from the current position, which then advances by max(h, w) / merge.
    Padding gets position 0. As transformers' Qwen2-VL / Qwen2.5-VL get_rope_index (images)."""
    P, L = input_ids.shape
    positions = torch.zeros(3, P, L, dtype=torch.long)
    next_pos = torch.zeros(P, dtype=torch.long)
    grids = iter(image_grid_thw.tolist())
    for p in range(P):
        valid = attention_mask[p].bool()
        ids = input_ids[p][valid].tolist()
        out, current, i = [], 0, 0
        while i < len(ids):
            if ids[i] != image_token_id:
                out.append((current, current, current))
                current, i = current + 1, i + 1
                continue
            j = i
            while j < len(ids) and ids[j] == image_token_id:
                j += 1
            grid = next(grids, None)
            if grid is None:
                raise ValueError(f"image_grid_thw: prompt {p} has more image runs than grids")
            t, h, w = grid[0], grid[1] // spatial_merge, grid[2] // spatial_merge
            if min(t, h, w) < 1:
                raise ValueError("image_grid_thw: a grid has an axis below 1 after the spatial "
                                 "merge")
            if j - i != t * h * w:
                raise ValueError(f"prompt {p}: an image run of {j - i} tokens, its grid has "
                                 f"{t * h * w}")
            out += [(current + a, current + b, current + c)
                    for a in range(t) for b in range(h) for c in range(w)]
            current, i = current + max(h, w), j
        if out:
            placed = torch.tensor(out, dtype=torch.long).T
            positions[:, p, valid] = placed
            next_pos[p] = int(placed.max()) + 1
    if next(grids, None) is not None:
        raise ValueError(f"image_grid_thw: {len(image_grid_thw)} grids for fewer image runs")
    return positions, next_pos


def pack_layout_reference(rows, prompt_of, lengths, prompt_len, prompt_pos, next_pos, C: int,
                          shared: bool) -> list[torch.Tensor]:
    """The layout of one packed row (CPU int64 tensors): completions `rows` (of the rollout's
    B), each of lengths[r] tokens, after their prompts (prompt_of[r]; prompt_len[p] valid
    tokens at the right of its padded row of prompt_pos's width L). shared: one prompt for each
    run of adjacent completions of the same prompt; else one per completion. Returns
    [source, position_ids, segment, kind, predictors, token_index, cu_seqlens, seq_cu,
    seq_prompt] (see Packing)."""
    rows, of, length = rows.tolist(), prompt_of.tolist(), lengths.tolist()
    plen, nxt = prompt_len.tolist(), next_pos.tolist()
    P, L = prompt_pos.shape[1], prompt_pos.shape[2]
    source, pos, segment, kind, predictors, token_index = [], [], [], [], [], []
    cu, seq_cu, seq_prompt = [0], [], []
    t, j = 0, 0
    while j < len(rows):
        p = of[rows[j]]
        end = j + 1
        while shared and end < len(rows) and of[rows[end]] == p:
            end += 1
        s = len(seq_prompt)
        seq_prompt.append(p)
        seq_cu.append(t)
        first = L - plen[p]
        source += range(p * L + first, p * L + L)
        pos.append(prompt_pos[:, p, first:])
        segment += [s] * plen[p]
        kind += [-1] * plen[p]
        t += plen[p]
        last = t - 1
        for k, r in enumerate(rows[j:end]):
            n = length[r]
            source += range(P * L + r * C, P * L + r * C + n)
            pos.append(torch.arange(nxt[p], nxt[p] + n).expand(3, -1))
            segment += [s] * n
            kind += [k] * n
            predictors += [last, *range(t, t + n - 1)]
            token_index += range(r * C, r * C + n)
            t += n
            cu.append(cu[-1] + n)
        j = end
    seq_cu.append(t)
    as_long = functools.partial(torch.tensor, dtype=torch.long)
    return [as_long(source), torch.cat(pos, 1), as_long(segment), as_long(kind),
            as_long(predictors), as_long(token_index), as_long(cu), as_long(seq_cu),
            as_long(seq_prompt)]


def _extension(use_native: Optional[bool]):
    """The native module to run (None: the Python reference). use_native None: the extension
    where built; True: it, or an error; False: the reference."""
    ext = native() if use_native is not False else None
    if use_native and ext is None:
        raise RuntimeError("the native extension mr1fast.trainer._native is not built "
                           "(bash setup.sh builds it)")
    return ext


def rope_positions(input_ids, attention_mask, image_grid_thw, image_token_id: int,
                   spatial_merge: int, *, use_native: Optional[bool] = None):
    """rope_positions_reference, natively where the extension is built."""
    ext = _extension(use_native)
    args = (input_ids.long().contiguous(), attention_mask.long().contiguous(),
            image_grid_thw.long().reshape(-1, 3).contiguous(), int(image_token_id),
            int(spatial_merge))
    return ext.rope_positions(*args) if ext is not None else rope_positions_reference(*args)


def pack_layout(rows, prompt_of, lengths, prompt_len, prompt_pos, next_pos, C: int,
                shared: bool, *, use_native: Optional[bool] = None) -> list[torch.Tensor]:
    """pack_layout_reference, natively where the extension is built."""
    ext = _extension(use_native)
    args = [torch.as_tensor(x, dtype=torch.long).contiguous()
            for x in (rows, prompt_of, lengths, prompt_len, prompt_pos, next_pos)]
    if ext is not None:
        return list(ext.pack_layout(*args, int(C), bool(shared)))
    return pack_layout_reference(*args, int(C), bool(shared))


# ---------------------------------------------------------------------------------------------
# One step's prompts, one micro-batch's layout.

@dataclass
class PromptLayout:
    """What packing needs of a step's prompts, on the host: token ids [P, L], each prompt's
    valid length [P], its mRoPE positions [3, P, L] and next position [P]."""
    input_ids: torch.Tensor
    lengths: torch.Tensor
    positions: torch.Tensor
    next_pos: torch.Tensor

    @classmethod
    def of(cls, prompts: PromptBatch, spatial_merge: int) -> "PromptLayout":
        ids, mask = prompts.input_ids.cpu(), prompts.attention_mask.cpu()  # one copy per step
        grid = prompts.image_grid_thw.cpu() if prompts.num_images else \
            torch.zeros(0, 3, dtype=torch.long)
        positions, next_pos = rope_positions(ids, mask, grid, prompts.image_token_id,
                                             spatial_merge)
        return cls(ids, mask.sum(1), positions, next_pos)


@dataclass
class Packing:
    """One packed row: T positions, n completion tokens, R completions in S segments.

    input_ids [1, T], position_ids [3, 1, T] (t, h, w), segment [T] (the group, shared_prefix;
    the sequence, packed), kind [T] (-1 prompt, k: the segment's k-th completion), predictors
    [n] (the position whose hidden state predicts each completion token), token_index [n] (each
    token's place in the rollout's flattened [B, C] tensors) on the device; cu_seqlens [R + 1]
    (the completions' token boundaries, for the loss) on the host; seq_cu [S + 1] (segment
    boundaries in the row, int32, for varlen attention) on the device; prompts: each segment's
    prompt."""
    input_ids: torch.Tensor
    position_ids: torch.Tensor
    segment: torch.Tensor
    kind: torch.Tensor
    predictors: torch.Tensor
    token_index: torch.Tensor
    cu_seqlens: torch.Tensor
    seq_cu: torch.Tensor
    max_seqlen: int
    prompts: list
    shared: bool

    @property
    def length(self) -> int:
        return self.input_ids.shape[1]

    @property
    def num_tokens(self) -> int:
        return self.predictors.shape[0]


def _to(x: torch.Tensor, device) -> torch.Tensor:
    if device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x.to(device)


def pack(prompts: PromptBatch, layout: PromptLayout, completion_ids: torch.Tensor,
         prompt_of: torch.Tensor, lengths: torch.Tensor, rows: Sequence[int],
         shared: bool) -> Packing:
    """The packed row of completions `rows` (completion_ids [B, C] on the device; prompt_of
    and lengths [B] on the host) with their prompts; shared: one prompt per group of adjacent
    rows of the same prompt. Builds the token ids on the device with one gather (an image
    token inside a completion becomes padding, as in the padded forward)."""
    device = completion_ids.device
    B, C = completion_ids.shape
    (source, positions, segment, kind, predictors, token_index, cu, seq_cu,
     seq_prompt) = pack_layout(torch.as_tensor(list(rows), dtype=torch.long), prompt_of,
                               lengths, layout.lengths, layout.positions, layout.next_pos, C,
                               shared)
    completions = completion_ids.masked_fill(completion_ids == prompts.image_token_id,
                                             prompts.pad_token_id)
    flat = torch.cat([prompts.input_ids.reshape(-1), completions.reshape(-1)])
    ids = flat[_to(source, device)][None]
    spans = seq_cu[1:] - seq_cu[:-1]
    return Packing(input_ids=ids, position_ids=_to(positions, device)[:, None],
                   segment=_to(segment, device), kind=_to(kind, device),
                   predictors=_to(predictors, device), token_index=_to(token_index, device),
                   cu_seqlens=cu, seq_cu=_to(seq_cu.int(), device),
                   max_seqlen=int(spans.max()) if len(spans) else 0,
                   prompts=seq_prompt.tolist(), shared=shared)


# ---------------------------------------------------------------------------------------------
# Masks and the forward.

def dense_mask(packing: Packing) -> torch.Tensor:
    """[1, 1, T, T] bool over the packed row, True where a query (row) may attend to a key
    (column): the same segment, not later, and a prompt key or a key of the query's own
    completion."""
    q = torch.arange(packing.length, device=packing.segment.device)
    seg, kind = packing.segment, packing.kind
    allowed = (seg[:, None] == seg[None, :]) & (q[None, :] <= q[:, None]) & \
        ((kind[None, :] == -1) | (kind[None, :] == kind[:, None]))
    return allowed[None, None]


@dataclass
class SegmentRows:
    """The packed row cut at its segment boundaries into S rows of the longest segment's
    length (the SDPA layout: attention costs sum over rows of T_row^2, not T^2; no padding
    inside a segment). gather [S, W]: each cell's position in the packed row (0 in padding);
    valid [S, W]; pick [n]: each predictor's cell in the flattened [S * W]."""
    gather: torch.Tensor
    valid: torch.Tensor
    pick: torch.Tensor

    @classmethod
    def of(cls, packing: Packing) -> "SegmentRows":
        starts = packing.seq_cu[:-1].long()
        width = packing.max_seqlen
        cells = starts[:, None] + torch.arange(width, device=starts.device)[None]
        valid = cells < packing.seq_cu[1:].long()[:, None]
        offset = torch.arange(packing.length, device=starts.device) - starts[packing.segment]
        cell_of = packing.segment * width + offset
        return cls(torch.where(valid, cells, 0), valid, cell_of[packing.predictors])

    def mask(self, packing: Packing) -> torch.Tensor:
        """[S, 1, W, W] bool: the dense rule within each row; a padding cell attends to
        itself only (no empty softmax row)."""
        kind = torch.where(self.valid, packing.kind[self.gather], -2)
        W = kind.shape[1]
        q = torch.arange(W, device=kind.device)
        causal = q[None, :] <= q[:, None]
        allowed = causal & self.valid[:, None, :] & \
            ((kind[:, None, :] == -1) | (kind[:, None, :] == kind[:, :, None]))
        allowed = allowed | (~self.valid[:, :, None] & torch.eye(W, dtype=torch.bool,
                                                                  device=kind.device))
        return allowed[:, None]


def block_mask(packing: Packing):
    """The same rule as a FlexAttention BlockMask, built once per Packing (every pass over
    the micro-batch reuses it). On CUDA the construction is compiled, which fuses the rule's
    evaluation instead of materialising [T, T] intermediates (about 1 GB at 16384 positions
    in eager mode)."""
    cached = getattr(packing, "_block_mask", None)
    if cached is not None:
        return cached
    from torch.nn.attention.flex_attention import create_block_mask

    seg, kind = packing.segment, packing.kind

    def rule(b, h, q, k):
        return (seg[q] == seg[k]) & (k <= q) & ((kind[k] == -1) | (kind[k] == kind[q]))

    T = packing.length
    build = _compiled_block_mask() if packing.segment.device.type == "cuda" else \
        create_block_mask
    mask = build(rule, B=None, H=None, Q_LEN=T, KV_LEN=T, device=packing.segment.device)
    packing._block_mask = mask
    return mask


@functools.lru_cache(maxsize=None)
def _compiled_block_mask():
    """torch.compile(create_block_mask): two compilations (a static, then a dynamic shape),
    then 5-15 ms per mask at 2-4k positions where eager takes 40-120 ms (measured on CPU;
    identical masks)."""
    from torch.nn.attention.flex_attention import create_block_mask

    return torch.compile(create_block_mask)


def default_backend(device: torch.device, shared: bool,
                    dtype: torch.dtype = torch.bfloat16) -> str:
    """flex on CUDA (varlen for plain packing in bf16 where flash-attn is installed), sdpa on
    CPU."""
    if device.type != "cuda":
        return "sdpa"
    if not shared and dtype != torch.float32 and has_flash_attn():  # fp16 / bf16 only
        return "varlen"
    return "flex"


def resolve_backend(attention: str, device: torch.device, mode: str,
                    dtype: torch.dtype = torch.bfloat16) -> str:
    """model.attention as the backend that will run, or a UsageError saying why it cannot.
    The padded layout runs the model's own attention (the setting is unused: sdpa)."""
    from .errors import UsageError

    shared = mode == "shared_prefix"
    if mode == "padded":
        return "sdpa"
    if attention == "auto":
        return default_backend(device, shared, dtype)
    if attention == "flex" and device.type != "cuda":
        raise UsageError("model.attention=flex: torch's FlexAttention has no backward on the "
                         "CPU", fix="use model.attention=auto (sdpa on the CPU)")
    if attention == "varlen":
        if shared:
            raise UsageError("model.attention=varlen runs plain packing only",
                             fix="model.packing=packed, or model.attention=auto")
        if not has_flash_attn():
            raise UsageError("model.attention=varlen needs flash-attn (pip install flash-attn "
                             "on a CUDA machine)", fix="or model.attention=auto")
        if device.type != "cuda":
            raise UsageError("model.attention=varlen needs a CUDA device",
                             fix="model.attention=auto")
        if dtype == torch.float32:
            raise UsageError("model.attention=varlen: flash-attn runs bf16 / fp16, and the "
                             "model computes in fp32", fix="model.dtype=bf16, or "
                             "model.attention=auto (flex)")
    return attention


def attention_inputs(packing: Packing, backend: str) -> dict:
    """The attention arguments of the language model's forward over the packed row (flex,
    varlen; sdpa: over the packed row in one, as a check of the rows layout)."""
    if backend == "sdpa":
        return {"attention_mask": {"full_attention": dense_mask(packing)}}
    if backend == "flex":
        return {"attention_mask": {"full_attention": block_mask(packing)}}
    if backend == "varlen":
        if packing.shared:
            raise ValueError("attention backend varlen: plain packing only (model.packing="
                             "packed); shared_prefix needs a mask (sdpa or flex)")
        return {"attention_mask": {"full_attention": None}, "cu_seq_lens_q": packing.seq_cu,
                "cu_seq_lens_k": packing.seq_cu, "max_length_q": packing.max_seqlen,
                "max_length_k": packing.max_seqlen}
    raise ValueError(f"attention backend: expected one of {BACKENDS}, got {backend!r}")


def packed_hidden(model, prompts: PromptBatch, features: Optional[Sequence[torch.Tensor]],
                  packing: Packing, backend: str = "sdpa", rows: bool = True) -> torch.Tensor:
    """Hidden states [1, n, d] that predict the packed completion tokens, from one forward.
    `features`: encode_images' output for `prompts` (None: the segments' images are encoded
    here, each once). sdpa runs the segments as rows (SegmentRows; rows=False: the packed row
    with a [T, T] mask); flex and varlen the packed row."""
    from .model import encode_images, image_inputs

    seg_prompts = packing.prompts
    if features is None:  # encode the images of the distinct prompts only
        distinct = sorted(set(seg_prompts))
        sub = prompts.select(torch.tensor(distinct))
        feats = encode_images(model, sub)
        where = {p: i for i, p in enumerate(distinct)}
        images = image_inputs(sub, feats, [where[p] for p in seg_prompts])
    else:
        images = image_inputs(prompts, features, seg_prompts)
    ids, positions = packing.input_ids[0], packing.position_ids[:, 0]
    in_prompt = packing.kind == -1
    if backend == "sdpa" and rows:
        cut = SegmentRows.of(packing)
        ids = torch.where(cut.valid, ids[cut.gather], prompts.pad_token_id)
        positions = torch.where(cut.valid, positions[:, cut.gather], 0)
        in_prompt = cut.valid & in_prompt[cut.gather]
        attention = {"attention_mask": {"full_attention": cut.mask(packing)}}
        pick = cut.pick
    else:
        ids, positions, in_prompt = ids[None], positions[:, None], in_prompt[None]
        attention = attention_inputs(packing, backend)
        pick = packing.predictors
    out = model.model(input_ids=ids, position_ids=positions,
                      mm_token_type_ids=((ids == prompts.image_token_id) & in_prompt).int(),
                      use_cache=False, **attention, **images)
    d = out.last_hidden_state.shape[-1]
    return out.last_hidden_state.reshape(-1, d)[pick][None]


# ---------------------------------------------------------------------------------------------
# Micro-batches by a token budget.

def plan_micro_batches(rows: Sequence[int], prompt_of: Sequence[int], lengths: Sequence[int],
                       prompt_len: Sequence[int], budget: int, shared: bool) -> list[list[int]]:
    """Completions `rows` (groups adjacent) split into micro-batches of at most `budget` packed
    positions each (budget <= 0: one micro-batch), filled with whole groups in order; a group
    larger than the budget is split (its prompt in each part); a single completion with its
    prompt over the budget is a micro-batch of its own."""
    rows = list(rows)
    if budget <= 0 or not rows:
        return [rows] if rows else []
    groups: list[list[int]] = []
    for r in rows:
        if groups and prompt_of[groups[-1][-1]] == prompt_of[r]:
            groups[-1].append(r)
        else:
            groups.append([r])

    def cost(part):
        p = prompt_len[prompt_of[part[0]]]
        return (p if shared else p * len(part)) + sum(lengths[r] for r in part)

    out: list[list[int]] = []
    used = budget + 1
    for group in groups:
        parts = [group] if cost(group) <= budget else _split(group, cost, budget)
        for part in parts:
            c = cost(part)
            if used + c > budget or not out:
                out.append([])
                used = 0
            out[-1] += part
            used += c
    return out


def _split(group, cost, budget) -> list[list[int]]:
    parts, part = [], []
    for r in group:
        if part and cost(part + [r]) > budget:
            parts.append(part)
            part = []
        part.append(r)
    return parts + [part]


def equalize(micro: list[list[int]], count: int) -> tuple[list[list[int]], int]:
    """`micro` made into exactly `count` micro-batches (count >= len(micro)): the largest split
    in halves while possible, then copies of the first appended. Returns (micro-batches, the
    number of real ones): copies run for their collectives only (their loss weighted 0), so
    every process of a sharded model runs the same number of passes."""
    micro = [list(m) for m in micro]
    while len(micro) < count:
        largest = max(range(len(micro)), key=lambda i: len(micro[i]))
        if len(micro[largest]) < 2:
            break
        half = len(micro[largest]) // 2
        micro[largest:largest + 1] = [micro[largest][:half], micro[largest][half:]]
    real = len(micro)
    return micro + [micro[0]] * (count - real), real
