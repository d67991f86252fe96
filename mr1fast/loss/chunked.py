"""The torch implementation (the CPU path and fallback): token_logprobs and grpo_loss, chunked.

No [N, V] tensor is ever built, and nothing reads a device value on the host (no sync).

Both work on chunks of R rows over the whole vocabulary (R = _rows(V, d)), the logits' GEMM
followed by the softmax rows of the [R, V] chunk (row max, then exp and row sum:
mr1fast.kernels.cpu_rows, native on the CPU; _Chunk) instead of an online log-sum-exp over
vocabulary tiles. The temperature scales the rows of h, the bias rides in the GEMM, and the
softmax's normalisation is folded into the gradient GEMMs' row scales.

token_logprobs (ChunkedTokenLogprobs): the forward computes log-probs and entropies; the
backward recomputes each chunk's logits and turns them into dH and dW (8NdV in all, since the
caller's gradient is unknown until the backward).

grpo_loss (ChunkedGRPOLoss): the loss is known inside the op, so when gradients are needed it
forms dH, dW and db during the forward, one chunk of rows at a time over the whole vocabulary:
logits (2NdV), then the chunk's d loss / d logp and d loss / d entropy from the objective
(reference.objective, differentiated by autograd on the chunk's [R] values; for the clipped
loss types without entropy terms in closed form, clipped_objective_grads, held to the autograd
by the tests), then the two gradient GEMMs on the softmax chunk with its targets' entries
shifted (4NdV): 6NdV, the minimum. The backward only scales the stored gradients
by the incoming one. Objectives that couple tokens (LossOptions.token_separable is False:
sequence-level ratios, VESPO, the off-policy and top-entropy masks) need every token's log-prob
before any gradient: a first pass computes the log-probs and entropies (2NdV), autograd gives
all d loss / d logp at once, and a second pass recomputes each chunk's logits for the gradients
(6NdV): 8NdV, as before. Peak extra memory: one [R, V] fp32 logits chunk and its softmax (R =
_rows(V, d)), the fp32 dH and dW buffers (which become the gradients) and O(N) vectors.
"""
from __future__ import annotations

import contextlib
import threading

import torch

from mr1fast.kernels.cpu_rows import exp_rows
from mr1fast.kernels.gemm import acc_dtype, matmul_acc

# The chunk: R = min(max(MIN_ROWS, ROW_BUDGET // V, d), ROW_CAP // V) rows. An empirical fit
# on 2 cores (MKL, fp32; 7-8 interleaved rounds, 2026-12-07): the three GEMMs alone are fastest
# at R = 128 for V = 16384 (67.6 ms vs 76.1 at 256, N = 1024), at R >= 512 for V = 4096 and for
# d = 512 (the dW GEMM's K = R amortises its [V, d] read-modify-write); below 128 rows the
# per-chunk costs (about 0.8 ms of Python and autograd for the objective) weigh. At V = 65536,
# 256 rows would be faster (309 vs 361 ms) but take more extra memory than Liger's loss (181 vs
# 153 MiB). ROW_CAP bounds the chunk at 64 MiB of fp32 (at V = 151936: 110 rows).
ROW_BUDGET = 1 << 21   # elements of one [R, V] logits chunk (8 MiB in fp32) ...
MIN_ROWS = 128         # ... but at least this many rows
ROW_CAP = 1 << 24      # ... and at most this many elements


def _rows(V: int, d: int) -> int:
    return max(1, min(max(MIN_ROWS, ROW_BUDGET // V, d), ROW_CAP // V))


class _Head:
    """The LM head for the chunks: weight (and bias / temperature) in the accumulation dtype
    where the matmuls need it (upcast once, not per chunk; on CUDA half weights stay half)."""

    def __init__(self, weight, bias, temperature):
        dt = acc_dtype(weight.dtype)
        self.w = weight if weight.is_cuda or weight.dtype == dt else weight.to(dt)
        self.temperature = temperature
        # z = (h W^T + b) / T = (h / T) W^T + b / T: the temperature scales the chunk's rows
        # of h and the bias, never the [R, V] logits.
        self.bias = None if bias is None else bias.to(dt) / temperature

    def logits(self, h, out=None):
        """z [R, V] for a chunk of rows h [R, d] (accumulation dtype), written into `out` (a
        CPU buffer of at least R rows, see _workspace) when given."""
        if self.temperature != 1.0:
            h = h * (1.0 / self.temperature)
        if out is not None:
            out = out[:h.shape[0]]
            if self.bias is not None:
                return torch.addmm(self.bias, h, self.w.t(), out=out)
            return torch.mm(h, self.w.t(), out=out)
        if self.bias is not None and not h.is_cuda:
            return torch.addmm(self.bias, h, self.w.t())   # the bias in the GEMM's epilogue
        z = matmul_acc(h, self.w.t())
        if self.bias is not None:
            z += self.bias
        return z


_LOCAL = threading.local()


@contextlib.contextmanager
def _workspace(n, V, rows, dtype, device, k=1):
    """The [R, V] buffer that every chunk's logits reuse, on the CPU (None elsewhere: CUDA's
    caching allocator reuses the chunks' memory already). A fresh 8-64 MiB tensor costs page
    faults on the CPU, since glibc hands large freed blocks back to the OS: 6-12 thousand per
    call at N = 1024, V = 16384 with a tensor per chunk (measured; about 1-2 ms per 8 MiB). So
    one buffer per thread is kept between calls (at most ROW_CAP elements: 64 MiB in fp32;
    release_workspace() frees it); a nested call gets its own. Yields [k, R, V]: k = 2 where the
    softmax chunk e is kept beside the logits (entropy gradients)."""
    if device.type != "cpu":
        yield None
        return
    size = k * min(rows, n) * V
    buf = getattr(_LOCAL, "buf", None)
    if getattr(_LOCAL, "busy", False):
        buf = torch.empty(size, dtype=dtype)
    elif buf is None or buf.dtype != dtype or buf.numel() < size:
        buf = _LOCAL.buf = None   # the old one first: never two at once
        buf = _LOCAL.buf = torch.empty(size, dtype=dtype)
    busy, _LOCAL.busy = getattr(_LOCAL, "busy", False), True
    try:
        yield buf[:size].view(k, min(rows, n), V)
    finally:
        _LOCAL.busy = busy


def release_workspace() -> None:
    """Frees this thread's chunk buffer of the torch implementation (_workspace)."""
    _LOCAL.buf = None


class _Chunk:
    """One chunk of rows over the whole vocabulary: e = exp(z - m) [R, V] with m the row max
    (unnormalised probabilities: p = e / s), m, 1 / s, the targets' log-probs and, with
    want_entropy, the entropies; with keep_logits also the logits z (for the entropy's
    gradient). The passes over [R, V] are mr1fast.kernels.cpu_rows.exp_rows (one native pass
    for the max and one for exp and the sums on the CPU, torch's ops elsewhere); the
    normalisation by s is folded into the GEMMs' row scales. ws: the call's [k, R, V] buffers
    (_workspace; None: fresh tensors): the logits go into ws[0], a kept logits' e into ws[1]."""

    def __init__(self, head, h, y, want_entropy, keep_logits=False, ws=None):
        z = head.logits(h, None if ws is None else ws[0])
        logit_y = z.gather(1, y[:, None]).squeeze(1)
        e_out = ws[1][:h.shape[0]] if keep_logits and ws is not None and len(ws) > 1 else None
        self.e, self.m, s, dot = exp_rows(z, keep_logits, want_entropy, out=e_out)
        self.s, self.inv_s, self.log_s = s, 1.0 / s, torch.log(s)
        self.logp = (logit_y - self.m - self.log_s).clamp(max=0.0)
        self.z = z if keep_logits else None
        self.entropy = self.log_s - dot * self.inv_s if want_entropy else None


class _Grads:
    """fp32 (fp64) accumulators of dH, dW and db, filled chunk by chunk (every row of dH is
    written once, so it starts empty; on the CPU the first chunk writes dW instead of adding
    to a zero-filled one: result() zeroes it if no chunk came)."""

    def __init__(self, hidden, weight, bias, need):
        dt = acc_dtype(hidden.dtype)
        dev = hidden.device
        self.dh = torch.empty(hidden.shape, dtype=dt, device=dev) if need[0] else None
        self.dw = None if not need[1] else torch.zeros(weight.shape, dtype=dt, device=dev) \
            if dev.type != "cpu" else torch.empty(weight.shape, dtype=dt, device=dev)
        self.dw_written = dev.type != "cpu"
        self.db = torch.zeros(weight.shape[0], dtype=dt, device=dev) \
            if bias is not None and need[2] else None

    def _add_dw(self, a, b):
        """dW += a @ b ([V, R] @ [R, d])."""
        if a.is_cuda:
            self.dw += matmul_acc(a, b)
        elif self.dw_written:
            self.dw.addmm_(a, b)
        else:
            torch.mm(a, b, out=self.dw)
            self.dw_written = True

    def result(self):
        """(dH, dW, db) in the accumulation dtype."""
        if self.dw is not None and not self.dw_written:
            self.dw.zero_()
        return self.dh, self.dw, self.db

    def add(self, n0, n1, h, y, c: _Chunk, g, g_ent, head):
        """Adds chunk c's gradients (rows n0:n1, raw rows h, targets y), dlogits = (g *
        (onehot(y) - p) - g_ent * p * (log p + H)) / temperature for d loss / d logp g and
        d loss / d entropy g_ent [R] (None: 0). Without an entropy gradient, dlogits is never
        formed: g * (onehot(y) - p) = r * (e - s onehot(y)) with r = -g / s, so the targets'
        entries of e drop by s (R values) and r enters the GEMMs as a row scale: dH = (e' @ W)
        * r, dW = e'^T (r * h), db = e'^T r. Consumes c."""
        if head.temperature != 1.0:
            g = g / head.temperature
            g_ent = None if g_ent is None else g_ent / head.temperature
        if g_ent is None:
            r = -g * c.inv_s
            e = c.e.scatter_add_(1, y[:, None], -c.s[:, None].to(c.e.dtype))
            if self.dh is not None:
                self.dh[n0:n1] = matmul_acc(e, head.w).mul_(r[:, None])
            if self.dw is not None:
                self._add_dw(e.t(), r[:, None] * h)
            if self.db is not None:
                self.db += e.t() @ r
            return
        # log p = z - m - log s: dlogits = -(e / s) (g + g_ent (z - m - log s + H)) + g onehot
        q = c.z.add_((c.entropy - c.log_s - c.m)[:, None]).mul_(g_ent[:, None]).add_(g[:, None])
        dz = c.e.mul_(q).mul_(-c.inv_s[:, None])
        dz.scatter_add_(1, y[:, None], g[:, None].to(dz.dtype))
        if self.dh is not None:
            self.dh[n0:n1] = matmul_acc(dz, head.w)
        if self.dw is not None:
            self._add_dw(dz.t(), h)
        if self.db is not None:
            self.db += dz.sum(0)


def _objective_grads(fn, logp, ent, need_ent_grad):
    """(loss, parts, g, g_ent) of fn(logp, entropy) with its gradient w.r.t. both."""
    lp = logp.detach().requires_grad_()
    en = None if ent is None else ent.detach().requires_grad_(need_ent_grad)
    with torch.enable_grad():
        loss, parts = fn(lp, en)
        wrt = [lp] + ([en] if need_ent_grad else [])
        grads = torch.autograd.grad(loss, wrt, allow_unused=True) if loss.requires_grad \
            else [None] * len(wrt)
    grads = [torch.zeros_like(x) if gr is None else gr for x, gr in zip(wrt, grads)]
    return loss.detach(), parts, grads[0], grads[1] if need_ent_grad else None


def closed_form(options) -> bool:
    """Whether clipped_objective_grads covers `options`: the clipped-ratio loss types at token
    level (grpo, bnpo, dr_grpo, dapo, luspo: they differ only in their token scales) without
    delta, dual clip, KL bias correction or entropy terms; any KL estimator."""
    return (options.loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
            and options.token_separable and options.delta is None
            and options.dual_clip is None and not options.use_bias_correction_kl
            and options.entropy_coef == 0.0)


def clipped_objective_grads(batch, kt, logp):
    """(loss, parts, g) of reference.objective on a chunk kt with log-probs logp [R], with g =
    d loss / d logp in closed form: the per-chunk autograd of the objective (about 100 small
    ops) is most of a small chunk's fixed cost. Only for options with closed_form(); every
    derivative follows torch's own (clamp passes the gradient on its closed interval), and
    tests/test_grpo_loss.py holds loss, parts and g to the specification's autograd."""
    o = batch.options
    m, adv, C = kt.mask, kt.adv, o.log_ratio_clamp
    live = m != 0
    if kt.has_mask:
        logp = torch.where(live, logp, torch.zeros((), dtype=logp.dtype, device=logp.device))
    if kt.old is None:          # on-policy: ratio exp(logp - sg(logp)) = 1, d ratio / d logp = 1
        ratio = torch.ones_like(logp)
        dratio = ratio
    else:
        raw = logp - kt.old
        ratio = torch.exp(raw.clamp(-C, C))
        dratio = ratio * ((raw >= -C) & (raw <= C))
    lo, hi = 1.0 - o.eps_low, 1.0 + o.eps_high
    a, b = ratio * adv, torch.clamp(ratio, lo, hi) * adv
    pg = -torch.minimum(a, b)
    # d min(a, b) / d ratio = adv where a is the min, or b inside the clip (torch splits a tie
    # half and half, but a tie means a = b inside the clip, or adv = 0: the same sum).
    g_pg = -adv * ((a <= b) | ((ratio >= lo) & (ratio <= hi))) * dratio
    low = (ratio < lo) & (adv < 0)
    high = (ratio > hi) & (adv > 0)
    if kt.iw is not None:
        pg, g_pg = pg * kt.iw, g_pg * kt.iw
    if kt.ref is not None:
        raw_d = kt.ref - logp
        d = raw_d.clamp(-C, C)
        inside = (raw_d >= -C) & (raw_d <= C)
        if o.kl_estimator == "k3":
            ed = torch.exp(d)
            kl, g_kl = ed - d - 1.0, (1.0 - ed) * inside
        elif o.kl_estimator == "k2":
            kl, g_kl = 0.5 * d * d, -d * inside
        else:
            kl, g_kl = -d, inside.to(d.dtype)
        per_token, g = pg + batch.beta * kl, g_pg + batch.beta * g_kl
    else:
        kl, per_token, g = torch.zeros_like(logp), pg, g_pg
    g = g * kt.scale
    if kt.has_mask:
        g = torch.where(live, g, torch.zeros((), dtype=g.dtype, device=g.device))
    return (per_token * kt.scale).sum(), {"kl": kl, "low": low, "high": high, "phi": None}, g


class ChunkedGRPOLoss(torch.autograd.Function):
    """(hidden [n, d], weight [V, d], bias [V] or None, targets [n] int64, temperature,
    objective, fast, options, want_entropy, grad_enabled, out) -> (loss, logp [n], entropy [n]
    or empty); grad_enabled: torch.is_grad_enabled() at the call (inside forward it is off).
    The objective's per-token parts go to out["parts"]. objective(sl, logp, entropy) is
    reference.objective on the kernel tokens sl (a slice); fast(sl, logp) -> (loss, parts,
    d loss / d logp) the same in closed form (clipped_objective_grads) or None; entropy is
    computed when `want_entropy`. Module doc: how the gradients are formed during the forward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, objective, fast, options,
                want_entropy, grad_enabled, out):
        n, V = hidden.shape[0], weight.shape[0]
        # needs_input_grad is True under no_grad too: no gradient work unless one is wanted.
        need = tuple(x and grad_enabled for x in ctx.needs_input_grad[:3])
        grad = any(need)
        head = _Head(weight, bias, temperature)
        rows = _rows(V, hidden.shape[1])
        dt = acc_dtype(hidden.dtype)
        h_all = hidden if hidden.dtype == dt else hidden.to(dt)
        # Masked tokens (check_values=False) may hold any id; their gradient is 0 anyway.
        targets = targets.clamp(0, V - 1)
        logp = torch.empty(n, dtype=dt, device=hidden.device)
        ent = torch.empty(n, dtype=dt, device=hidden.device) if want_entropy else None
        grads = _Grads(hidden, weight, bias, need) if grad else None
        with _workspace(n, V, rows, dt, hidden.device,
                        2 if grad and options.needs_entropy_grad else 1) as ws:
            one_pass = grad and options.token_separable
            fast = fast if one_pass else None
            need_ent_grad = options.needs_entropy_grad
            losses, parts = [], []
            for n0 in range(0, n, rows):
                n1 = min(n0 + rows, n)
                h, y = h_all[n0:n1], targets[n0:n1]
                c = _Chunk(head, h, y, want_entropy, one_pass and need_ent_grad, ws)
                logp[n0:n1] = c.logp
                if want_entropy:
                    ent[n0:n1] = c.entropy
                if one_pass:
                    sl = slice(n0, n1)
                    if fast is not None:
                        loss, part, g = fast(sl, logp[n0:n1])
                        g_ent = None
                    else:
                        loss, part, g, g_ent = _objective_grads(
                            lambda lp, en: objective(sl, lp, en), logp[n0:n1],
                            None if ent is None else ent[n0:n1], need_ent_grad)
                    losses.append(loss)
                    parts.append(part)
                    grads.add(n0, n1, h, y, c, g, g_ent, head)
            if one_pass:
                loss = torch.stack(losses).sum()
                parts = {k: None if parts[0][k] is None else torch.cat([p[k] for p in parts])
                         for k in parts[0]}
            else:
                loss, parts, g, g_ent = _objective_grads(
                    lambda lp, en: objective(slice(None), lp, en), logp, ent,
                    need_ent_grad and grad)
                if grad:  # the second pass: the logits again, now with every token's gradient
                    for n0 in range(0, n, rows):
                        n1 = min(n0 + rows, n)
                        h, y = h_all[n0:n1], targets[n0:n1]
                        ent_grad = g_ent is not None
                        grads.add(n0, n1, h, y, _Chunk(head, h, y, ent_grad, ent_grad, ws),
                                  g[n0:n1], None if g_ent is None else g_ent[n0:n1], head)
        ctx.grads = (None, None, None)
        if grad:
            dh, dw, db = grads.result()
            ctx.grads = (None if dh is None else dh.to(hidden.dtype),
                         None if dw is None else dw.to(weight.dtype),
                         None if db is None else db.to(bias.dtype))
        out["parts"] = parts
        ent = ent if ent is not None else logp.new_zeros(0)
        ctx.mark_non_differentiable(logp, ent)
        return loss, logp, ent

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss, *_):
        if ctx.grads is None:
            raise RuntimeError("grpo_loss (impl='torch') forms its gradients during the "
                               "forward and hands them over at the first backward: a second "
                               "backward through the same graph (retain_graph=True) is not "
                               "supported; compute the loss again")
        dh, dw, db = ctx.grads
        ctx.grads = None  # scaled in place: no second [V, d] buffer
        scale = (lambda x: None if x is None else x.mul_(grad_loss.to(x.dtype)))
        return scale(dh), scale(dw), scale(db), None, None, None, None, None, None, None, None


class ChunkedTokenLogprobs(torch.autograd.Function):
    """(hidden [n, d], weight [V, d], bias [V] or None, targets [n] int64, temperature) ->
    (logp [n], entropy [n]) in fp32 (fp64 for fp64), both differentiable w.r.t. hidden, weight
    and bias."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature):
        n, V = hidden.shape[0], weight.shape[0]
        head = _Head(weight, bias, temperature)
        dt = acc_dtype(hidden.dtype)
        h_all = hidden if hidden.dtype == dt else hidden.to(dt)
        logp = torch.empty(n, dtype=dt, device=hidden.device)
        entropy = torch.empty(n, dtype=dt, device=hidden.device)
        rows = _rows(V, hidden.shape[1])
        with _workspace(n, V, rows, dt, hidden.device) as ws:
            for n0 in range(0, n, rows):
                n1 = min(n0 + rows, n)
                c = _Chunk(head, h_all[n0:n1], targets[n0:n1], True, ws=ws)
                logp[n0:n1], entropy[n0:n1] = c.logp, c.entropy
        ctx.save_for_backward(hidden, weight, bias, targets)
        ctx.temperature = temperature
        return logp, entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, targets = ctx.saved_tensors
        n, V = hidden.shape[0], weight.shape[0]
        need = ctx.needs_input_grad[:3]
        head = _Head(weight, bias, ctx.temperature)
        grads = _Grads(hidden, weight, bias, need)
        dt = acc_dtype(hidden.dtype)
        h_all = hidden if hidden.dtype == dt else hidden.to(dt)
        g_all = torch.zeros(n, dtype=dt, device=hidden.device) if grad_logp is None \
            else grad_logp.to(dt)
        rows = _rows(V, hidden.shape[1])
        ent_grad = grad_entropy is not None
        with _workspace(n, V, rows, dt, hidden.device, 2 if ent_grad else 1) as ws:
            for n0 in range(0, n, rows):
                n1 = min(n0 + rows, n)
                h, y = h_all[n0:n1], targets[n0:n1]
                grads.add(n0, n1, h, y, _Chunk(head, h, y, ent_grad, ent_grad, ws), g_all[n0:n1],
                          None if grad_entropy is None else grad_entropy[n0:n1].to(dt), head)
        cast = (lambda x, like: None if x is None else x.to(like.dtype))
        dh, dw, db = grads.result()
        return (cast(dh, hidden), cast(dw, weight),
                None if bias is None else cast(db, bias), None, None)
