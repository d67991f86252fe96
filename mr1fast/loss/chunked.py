"""token_logprobs in plain torch, chunked over tokens and vocabulary: the CPU path and fallback.

No [N, V] tensor is ever built: the forward keeps an online log-sum-exp (and entropy) across
vocabulary chunks; the backward recomputes each logit chunk and turns it into dH and dW at once.
Peak extra memory is a few [TOKEN_CHUNK, VOCAB_CHUNK] fp32 tiles plus fp32 gradient buffers.
Nothing reads a device value on the host (no sync), on CUDA as on the CPU.
"""
from __future__ import annotations

import torch

from mr1fast.kernels.gemm import acc_dtype, matmul_acc

TOKEN_CHUNK = 1024
VOCAB_CHUNK = 8192


def _logits(h, weight, bias, v0, v1, temperature):
    z = matmul_acc(h, weight[v0:v1].t())
    if bias is not None:
        z += bias[v0:v1]
    return z / temperature if temperature != 1.0 else z


def chunked_forward(hidden, weight, bias, targets, temperature):
    """hidden [n, d], weight [V, d], targets [n] -> logp, lse, entropy, each [n] fp32."""
    n, V = hidden.shape[0], weight.shape[0]
    dt = acc_dtype(hidden.dtype)
    logp = torch.empty(n, dtype=dt, device=hidden.device)
    lse = torch.empty_like(logp)
    entropy = torch.empty_like(logp)
    for n0 in range(0, n, TOKEN_CHUNK):
        n1 = min(n0 + TOKEN_CHUNK, n)
        h, y = hidden[n0:n1], targets[n0:n1]
        m = torch.full((n1 - n0,), float("-inf"), dtype=dt, device=hidden.device)
        s = torch.zeros_like(m)   # sum exp(z - m)
        e = torch.zeros_like(m)   # sum exp(z - m) * (z - m), for the entropy
        tgt = torch.zeros_like(m)
        for v0 in range(0, V, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, V)
            z = _logits(h, weight, bias, v0, v1, temperature)
            m_new = torch.maximum(m, z.amax(dim=1))
            alpha = torch.exp(m - m_new)
            zc = z - m_new[:, None]
            p = torch.exp(zc)
            shift = torch.where(s > 0, m - m_new, torch.zeros_like(s)) * s
            e = alpha * (e + shift) + (p * zc).sum(1)
            s = alpha * s + p.sum(1)
            m = m_new
            here = (y >= v0) & (y < v1)
            picked = z.gather(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None]).squeeze(1)
            tgt = torch.where(here, picked, tgt)
        lse[n0:n1] = m + torch.log(s)
        logp[n0:n1] = torch.clamp(tgt - lse[n0:n1], max=0.0)
        entropy[n0:n1] = torch.log(s) - e / s
    return logp, lse, entropy


def chunked_backward(hidden, weight, bias, targets, lse, grad_logp, temperature,
                     need_hidden=True, need_weight=True):
    """d(sum grad_logp * logp) w.r.t. hidden, weight, bias, with dlogits =
    grad_logp * (onehot - softmax) / temperature formed one chunk at a time."""
    n, V = hidden.shape[0], weight.shape[0]
    dt = acc_dtype(hidden.dtype)
    g = grad_logp.to(dt)
    dh = torch.zeros(n, hidden.shape[1], dtype=dt, device=hidden.device) if need_hidden else None
    dw = torch.zeros(V, weight.shape[1], dtype=dt, device=hidden.device) if need_weight else None
    db = torch.zeros(V, dtype=dt, device=hidden.device) if bias is not None else None
    for n0 in range(0, n, TOKEN_CHUNK):
        n1 = min(n0 + TOKEN_CHUNK, n)
        h, y = hidden[n0:n1], targets[n0:n1]
        for v0 in range(0, V, VOCAB_CHUNK):
            v1 = min(v0 + VOCAB_CHUNK, V)
            z = _logits(h, weight, bias, v0, v1, temperature)
            dz = torch.exp(z - lse[n0:n1, None]).mul_(-g[n0:n1, None])
            here = (y >= v0) & (y < v1)
            # + g at each row's target column, when it lies in this chunk (one column per row:
            # deterministic, and no nonzero(), which would sync).
            dz.scatter_add_(1, (y - v0).clamp(0, v1 - v0 - 1)[:, None],
                            torch.where(here, g[n0:n1], 0.0)[:, None])
            if temperature != 1.0:
                dz /= temperature
            if dh is not None:
                dh[n0:n1] += matmul_acc(dz, weight[v0:v1])
            if dw is not None:
                dw[v0:v1] += matmul_acc(dz.t(), h)
            if db is not None:
                db[v0:v1] += dz.sum(0)
    return (None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


class ChunkedTokenLogprobs(torch.autograd.Function):
    """(hidden [n, d], weight [V, d], bias [V] or None, targets [n] int64, temperature) ->
    (logp [n], entropy [n]) in fp32 (fp64 for fp64). Differentiable w.r.t. hidden, weight and
    bias through logp; the entropy is not differentiable."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        logp, lse, entropy = chunked_forward(hidden, weight, bias, targets, temperature)
        ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.temperature = temperature
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp, _grad_entropy):
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        dh, dw, db = chunked_backward(hidden, weight, bias, targets, lse, grad_logp,
                                      ctx.temperature, ctx.needs_input_grad[0],
                                      ctx.needs_input_grad[1])
        return dh, dw, db, None, None
