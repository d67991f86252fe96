"""Fused LM-head log-probs in Triton: log p(target) and entropy of softmax(hidden @ weight.T / T)
without ever writing the N x V logits.

Forward: `_token_logprobs_fwd_kernel` computes logit tiles (hidden tile x weight tile, fp32
accumulation) and keeps an online (max, sum-exp, entropy) per token over the vocabulary tiles of
one vocabulary split; the grid covers token tiles x vocabulary splits so a short batch still
fills the GPU. `_token_logprobs_merge_kernel` folds the splits into lse, logp and entropy.

Backward: `_token_logprobs_bwd_kernel` recomputes logit tiles and writes
dlogits = (g * (onehot - p) - g_H * p * (log p + H)) / T (g and g_H: the incoming gradients of
the token's log-prob and entropy H, p = softmax) into a bounded scratch chunk (SCRATCH_BYTES,
256 MiB by default, never N x V), which cuBLAS turns into dH and dW (fp32 accumulation, fp32
output).
Chunks run over the vocabulary first, so at the Qwen2-VL-2B shape one chunk holds every token
and dW needs no cross-chunk accumulation. No atomics anywhere: the result is bitwise
deterministic. Nothing accumulates across launches, so no output needs resetting.

An absent bias is passed as None: Triton specialises on it (the `if b_ptr is not None` branch is
resolved at compile time). temperature is a runtime argument, never tl.constexpr: a new value
never recompiles. Nothing here reads a device value on the host: the launchers never sync.
"""
from __future__ import annotations

import contextlib
import os
from typing import Optional

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - platforms without triton keep the torch paths
    triton = None

from .gemm import matmul_acc

# Triton's interpreter runs these kernels on CPU tensors. It must be chosen before triton
# decorates the kernels, i.e. before this module is imported.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SCRATCH_BYTES = int(os.environ.get("MR1FAST_DLOGITS_SCRATCH_MB", "256")) << 20
MAX_GRID_YZ = 65535  # CUDA's limit on grid dimensions 1 and 2; dimension 0 allows 2**31 - 1


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why impl='triton' cannot run on these inputs, or None when it can."""
    if triton is None:
        return "triton is not importable"
    if dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return f"the Triton kernels take fp32, bf16 or fp16 inputs, not {dtype}"
    if device.type == "cuda" or INTERPRET:
        return None
    return (f"inputs are on {device.type}: the Triton kernels need CUDA tensors (or "
            "TRITON_INTERPRET=1 set before mr1fast.kernels is imported, to run them in Triton's "
            "CPU interpreter)")


if triton is not None:

    @triton.jit
    def _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden_dim, stride_h,
                     stride_w, inv_temperature, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """[BLOCK_N, BLOCK_V] fp32 logits / temperature; -inf in columns past the vocabulary."""
        acc = tl.zeros([BLOCK_N, BLOCK_V], dtype=tl.float32)
        ks = tl.arange(0, BLOCK_K)
        for k0 in range(0, hidden_dim, BLOCK_K):
            kk = k0 + ks
            k_ok = kk < hidden_dim
            h = tl.load(h_ptr + rows[:, None] * stride_h + kk[None, :],
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptr + cols[None, :] * stride_w + kk[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:  # the interpreter computes bf16 arithmetic wrongly; loads are exact
                h = h.to(tl.float32)
                w = w.to(tl.float32)
            if FP32_DOT:
                acc = tl.dot(h, w, acc, input_precision="ieee")
            else:
                acc = tl.dot(h, w, acc)
        if b_ptr is not None:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        return tl.where(col_ok[None, :], acc * inv_temperature, float("-inf"))

    @triton.jit
    def _token_logprobs_fwd_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, pmax_ptr, psum_ptr, pent_ptr, tgt_ptr,
            n_tokens, vocab, hidden_dim, stride_h, stride_w, inv_temperature, tiles_per_split,
            UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        pid_n = tl.program_id(0)
        split = tl.program_id(1)
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_tokens
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1)
        m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        s = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m)
        e = tl.zeros([BLOCK_N], dtype=tl.float32)  # sum exp(z - m) * (z - m)
        v_begin = split * tiles_per_split * BLOCK_V
        v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
        for v0 in range(v_begin, v_end, BLOCK_V):
            cols = v0 + tl.arange(0, BLOCK_V).to(tl.int64)
            col_ok = cols < vocab
            z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden_dim,
                             stride_h, stride_w, inv_temperature, UPCAST, FP32_DOT, BLOCK_N,
                             BLOCK_V, BLOCK_K)
            m_new = tl.maximum(m, tl.max(z, axis=1))  # finite: every tile has a real column
            alpha = tl.exp(m - m_new)
            p = tl.exp(z - m_new[:, None])
            zc = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)  # no -inf * 0 = NaN
            shift = tl.where(s > 0, m - m_new, 0.0) * s
            e = alpha * (e + shift) + tl.sum(p * zc, axis=1)
            s = alpha * s + tl.sum(p, axis=1)
            m = m_new
            hit = cols[None, :] == y[:, None]
            tgt = tl.sum(tl.where(hit, z, 0.0), axis=1)
            tl.store(tgt_ptr + rows, tgt, mask=row_ok & (y >= v0) & (y < v0 + BLOCK_V))
        out = split.to(tl.int64) * n_tokens + rows
        tl.store(pmax_ptr + out, m, mask=row_ok)
        tl.store(psum_ptr + out, s, mask=row_ok)
        tl.store(pent_ptr + out, e, mask=row_ok)

    @triton.jit
    def _token_logprobs_merge_kernel(pmax_ptr, psum_ptr, pent_ptr, tgt_ptr, lse_ptr, logp_ptr,
                                     ent_ptr, n_tokens, n_splits, BLOCK_N: tl.constexpr):
        """Folds the vocabulary splits into lse, logp (<= 0) and entropy per token."""
        rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_tokens
        big_m = tl.full([BLOCK_N], float("-inf"), dtype=tl.float32)
        for sp in range(0, n_splits):
            big_m = tl.maximum(big_m, tl.load(pmax_ptr + sp * n_tokens + rows, mask=row_ok,
                                              other=0.0))
        big_s = tl.zeros([BLOCK_N], dtype=tl.float32)
        big_e = tl.zeros([BLOCK_N], dtype=tl.float32)
        for sp in range(0, n_splits):
            at = sp * n_tokens + rows
            m_i = tl.load(pmax_ptr + at, mask=row_ok, other=0.0)
            s_i = tl.load(psum_ptr + at, mask=row_ok, other=1.0)
            e_i = tl.load(pent_ptr + at, mask=row_ok, other=0.0)
            a = tl.exp(m_i - big_m)
            big_s += a * s_i
            big_e += a * (e_i + (m_i - big_m) * s_i)
        log_s = tl.log(big_s)
        lse = big_m + log_s
        tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0.0)
        tl.store(lse_ptr + rows, lse, mask=row_ok)
        tl.store(logp_ptr + rows, tl.minimum(tgt - lse, 0.0), mask=row_ok)  # never log p > 0
        tl.store(ent_ptr + rows, log_s - big_e / big_s, mask=row_ok)

    @triton.jit
    def _token_logprobs_bwd_kernel(
            h_ptr, w_ptr, b_ptr, y_ptr, lse_ptr, g_ptr, ent_ptr, g_ent_ptr, dz_ptr,
            n_tokens, vocab, v_offset, hidden_dim, stride_h, stride_w, stride_dz,
            inv_temperature, UPCAST: tl.constexpr, FP32_DOT: tl.constexpr,
            BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_K: tl.constexpr):
        """dz = (g * (onehot - p) - g_ent * p * (log p + H)) / T for one (token tile, vocabulary
        tile) of a chunk; ent_ptr (H) and g_ent_ptr are None when the entropy has no gradient."""
        pid = tl.program_id(0)
        n_tiles_n = tl.cdiv(n_tokens, BLOCK_N)
        pid_n = pid % n_tiles_n  # token tiles vary fastest: neighbours share the weight tile
        pid_v = pid // n_tiles_n
        rows = pid_n.to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_ok = rows < n_tokens
        cols = pid_v.to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
        col_ok = cols < vocab
        z = _logits_tile(h_ptr, w_ptr, b_ptr, rows, row_ok, cols, col_ok, hidden_dim, stride_h,
                         stride_w, inv_temperature, UPCAST, FP32_DOT, BLOCK_N, BLOCK_V, BLOCK_K)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        y = tl.load(y_ptr + rows, mask=row_ok, other=-1) - v_offset
        p = tl.exp(z - lse[:, None])
        onehot = (cols[None, :] == y[:, None]).to(tl.float32)
        dz = g[:, None] * (onehot - p)
        if g_ent_ptr is not None:
            # d H / d z_j = -p_j (log p_j + H), H = -sum_j p_j log p_j the row's entropy.
            h = tl.load(ent_ptr + rows, mask=row_ok, other=0.0)
            g_ent = tl.load(g_ent_ptr + rows, mask=row_ok, other=0.0)
            log_p = tl.where(col_ok[None, :], z - lse[:, None], 0.0)  # no 0 * -inf past V
            dz -= g_ent[:, None] * p * (log_p + h[:, None])
        dz = dz * inv_temperature
        tl.store(dz_ptr + rows[:, None] * stride_dz + cols[None, :],
                 dz.to(dz_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


# GPU tile sizes, derived (not yet tuned on a GPU: bench/gpu.sh's kernel suite measures them).
# A 128 x 128 (BLOCK_N x BLOCK_V) logit tile is the fp32 accumulator of a tensor-core GEMM: over
# 8 warps (two Hopper warpgroups, one 64-row wgmma each) it is 64 registers per thread, leaving
# room under the 255-register limit for the online-softmax temporaries of the same size.
# BLOCK_K = 64 for bf16/fp16 and 32 for fp32 makes every K step a 128-byte row segment per
# token (coalesced) and puts (128 + 128) x BLOCK_K x 2 or 4 B = 32 KiB in shared memory per
# pipeline stage: 3 stages take 96 KiB, within an A100 SM's 164 KiB and an H100's 228 KiB.
# Each loaded element then feeds 128 multiply-adds, 64 FLOP per byte from shared memory.
GPU_BLOCKS = dict(BLOCK_N=128, BLOCK_V=128, num_warps=8, num_stages=3)


def block_config(n_tokens: int, vocab: int, hidden_dim: int, dtype: torch.dtype) -> dict:
    """Tile sizes. The interpreter's cost grows with the number of block operations, so it gets
    big tiles for the small test shapes; the GPU gets tensor-core-sized tiles (GPU_BLOCKS)."""
    if INTERPRET:
        return dict(BLOCK_N=min(64, max(16, _next_pow2(n_tokens))),
                    BLOCK_V=min(256, max(16, _next_pow2(vocab))),
                    BLOCK_K=min(128, max(16, _next_pow2(hidden_dim))), num_warps=4, num_stages=1)
    return dict(GPU_BLOCKS, BLOCK_K=32 if dtype == torch.float32 else 64)


def dtype_flags(dtype: torch.dtype) -> dict:
    """UPCAST: the interpreter computes bf16 arithmetic wrongly (loads are exact), so it works
    in fp32; FP32_DOT: fp32 inputs take IEEE fp32 dots (no TF32 rounding)."""
    return dict(UPCAST=INTERPRET and dtype == torch.bfloat16, FP32_DOT=dtype == torch.float32)


def forward_grid(n_tokens: int, vocab: int, block_n: int, block_v: int, target_programs: int):
    """(grid, tiles_per_split) of the forward kernel: token tiles on grid axis 0 (up to 2**31 - 1,
    so any N works), vocabulary splits on axis 1. Splits are added until the grid has about
    target_programs programs; no split is empty."""
    n_tiles = triton.cdiv(n_tokens, block_n)
    v_tiles = triton.cdiv(vocab, block_v)
    want = max(1, min(v_tiles, MAX_GRID_YZ, triton.cdiv(target_programs, n_tiles)))
    tiles_per_split = triton.cdiv(v_tiles, want)
    n_splits = triton.cdiv(v_tiles, tiles_per_split)
    return (n_tiles, n_splits), tiles_per_split


def backward_chunks(n_tokens: int, vocab: int, elem_size: int, scratch_bytes: int,
                    block_n: int, block_v: int):
    """(token_chunk, vocab_chunk) of the dlogits scratch, token_chunk * vocab_chunk * elem_size
    <= scratch_bytes (at least one tile). Prefers every token in one chunk and slices the
    vocabulary, so dW rows are finished in one GEMM each."""
    n_pad = triton.cdiv(n_tokens, block_n) * block_n
    v_pad = triton.cdiv(vocab, block_v) * block_v
    cols = scratch_bytes // (elem_size * n_pad) // block_v * block_v
    if cols >= block_v:
        return n_pad, min(v_pad, cols)
    v_chunk = min(v_pad, max(block_v, 4096 // block_v * block_v))
    rows = max(block_n, scratch_bytes // (elem_size * v_chunk) // block_n * block_n)
    return rows, v_chunk


def on_device(device: torch.device):
    """Triton launches on the current CUDA device: make it the tensors' device."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 2  # interpreter: two splits so the merge is always exercised


def lse_partials(hidden, weight, bias, targets, temperature, num_splits=None):
    """Runs the forward kernel on hidden [n, d], weight [V, d], bias [V] or None, targets [n]
    (all contiguous). Returns (pmax, psum, pent [n_splits, n], tgt [n], n_splits), fp32."""
    n, d = hidden.shape
    V = weight.shape[0]
    cfg = block_config(n, V, d, hidden.dtype)
    target = 4 * _sm_count(hidden.device) if num_splits is None else \
        num_splits * triton.cdiv(n, cfg["BLOCK_N"])
    grid, tiles_per_split = forward_grid(n, V, cfg["BLOCK_N"], cfg["BLOCK_V"], target)
    n_splits = grid[1]
    part = torch.empty(3, n_splits, n, dtype=torch.float32, device=hidden.device)
    tgt = torch.empty(n, dtype=torch.float32, device=hidden.device)
    with on_device(hidden.device):
        _token_logprobs_fwd_kernel[grid](
            hidden, weight, bias, targets, part[0], part[1], part[2], tgt, n, V, d,
            hidden.stride(0), weight.stride(0), 1.0 / temperature, tiles_per_split,
            **dtype_flags(hidden.dtype), **cfg)
    return part[0], part[1], part[2], tgt, n_splits


def token_logprobs_forward(hidden, weight, bias, targets, temperature, num_splits=None):
    """hidden [n, d] contiguous -> logp, lse, entropy, each [n] fp32."""
    pmax, psum, pent, tgt, n_splits = lse_partials(hidden, weight, bias, targets, temperature,
                                                   num_splits)
    n = hidden.shape[0]
    out = torch.empty(3, n, dtype=torch.float32, device=hidden.device)
    block = 256
    with on_device(hidden.device):
        _token_logprobs_merge_kernel[(triton.cdiv(n, block),)](
            pmax, psum, pent, tgt, out[0], out[1], out[2], n, n_splits, BLOCK_N=block)
    return out[1], out[0], out[2]


def token_logprobs_backward(hidden, weight, bias, targets, lse, grad_logp, temperature,
                            need_hidden=True, need_weight=True, entropy=None, grad_entropy=None):
    """dH, dW, db of sum(grad_logp * logp + grad_entropy * entropy), through the bounded dlogits
    scratch (module doc). grad_logp [n]; entropy (the forward's) and grad_entropy [n], or both
    None when the entropy has no gradient."""
    n, d = hidden.shape
    V = weight.shape[0]
    cfg = block_config(n, V, d, hidden.dtype)
    # dlogits = g * (onehot - p) is tiny (g ~ 1/tokens, p ~ 1/V): fp16 would flush it to zero,
    # so fp16 inputs get an fp32 scratch; bf16 has fp32's exponent range.
    dz_dtype = torch.float32 if hidden.dtype == torch.float16 else hidden.dtype
    n_chunk, v_chunk = backward_chunks(n, V, dz_dtype.itemsize, SCRATCH_BYTES,
                                       cfg["BLOCK_N"], cfg["BLOCK_V"])
    scratch = torch.empty(min(n_chunk, n) * min(v_chunk, V), dtype=dz_dtype,
                          device=hidden.device)
    g = grad_logp.float().contiguous()
    g_ent = None if grad_entropy is None else grad_entropy.float().contiguous()
    entropy = None if entropy is None else entropy.float().contiguous()
    dh = torch.zeros(n, d, dtype=torch.float32, device=hidden.device) if need_hidden else None
    dw = torch.empty_like(weight) if need_weight else None
    db = torch.zeros(V, dtype=torch.float32, device=hidden.device) if bias is not None else None
    for v0 in range(0, V, v_chunk):
        v1 = min(v0 + v_chunk, V)
        w_c = weight[v0:v1]
        dw_acc = None
        for n0 in range(0, n, n_chunk):
            n1 = min(n0 + n_chunk, n)
            dz = scratch[:(n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0)
            grid = (triton.cdiv(n1 - n0, cfg["BLOCK_N"]) * triton.cdiv(v1 - v0, cfg["BLOCK_V"]),)
            with on_device(hidden.device):
                _token_logprobs_bwd_kernel[grid](
                    hidden[n0:n1], w_c, None if bias is None else bias[v0:v1],
                    targets[n0:n1], lse[n0:n1], g[n0:n1],
                    None if g_ent is None else entropy[n0:n1],
                    None if g_ent is None else g_ent[n0:n1], dz, n1 - n0, v1 - v0, v0, d,
                    hidden.stride(0), weight.stride(0), dz.stride(0), 1.0 / temperature,
                    **dtype_flags(hidden.dtype), **cfg)
            if dh is not None:
                dh[n0:n1] += matmul_acc(dz, w_c)
            if dw is not None:
                part = matmul_acc(dz.t(), hidden[n0:n1])
                dw_acc = part if dw_acc is None else dw_acc.add_(part)
            if db is not None:
                db[v0:v1] += dz.float().sum(0)
        if dw is not None:
            dw[v0:v1] = dw_acc
    return (None if dh is None else dh.to(hidden.dtype), dw,
            None if db is None else db.to(bias.dtype))


class TokenLogprobsFunction(torch.autograd.Function):
    """(hidden [n, d], weight [V, d], bias [V] or None, targets [n] int64, temperature) ->
    (logp [n], entropy [n]), fp32, all inputs contiguous. Both outputs are differentiable w.r.t.
    hidden, weight and bias; the entropy's gradient costs nothing when it is unused."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        logp, lse, entropy = token_logprobs_forward(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature = temperature
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        if grad_logp is None:
            grad_logp = torch.zeros_like(lse)
        dh, dw, db = token_logprobs_backward(
            hidden, weight, bias, targets, lse, grad_logp, ctx.temperature,
            ctx.needs_input_grad[0], ctx.needs_input_grad[1],
            entropy=None if grad_entropy is None else entropy, grad_entropy=grad_entropy)
        return dh, dw, db, None, None
