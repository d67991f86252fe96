"""token_logprobs: every impl against the fp64 reference, values and gradients; the Triton
launchers' grid and scratch arithmetic."""
import pytest
import torch
from helpers import TOLERANCES, assert_close, assert_no_worse_than_torch, max_err

from mr1fast import token_logprobs
from mr1fast.loss.reference import reference_token_logprobs

IMPLS = ["naive", "torch", "triton"]


def make_inputs(shape=(3, 5), d=80, V=1000, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, d, generator=g, dtype=torch.float64)
    weight = torch.randn(V, d, generator=g, dtype=torch.float64) * 2 / d ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) if bias else None
    targets = torch.randint(0, V, shape, generator=g)
    upstream = torch.randn(shape, generator=g, dtype=torch.float64)
    return hidden, weight, b, targets, upstream


def run(impl, hidden, weight, bias, targets, upstream, dtype, temperature):
    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    b = bias.to(dtype).requires_grad_() if bias is not None else None
    if impl == "reference":
        logp, ent = reference_token_logprobs(h, w, targets, bias=b, temperature=temperature)
    else:
        logp, ent = token_logprobs(h, w, targets, bias=b, temperature=temperature,
                                   return_entropy=True, impl=impl)
    (logp * upstream.to(logp.dtype)).sum().backward()
    grads = {"dH": h.grad, "dW": w.grad}
    if b is not None:
        grads["db"] = b.grad
    return logp, ent, grads


def reference_at(dtype, hidden, weight, bias, targets, upstream, temperature):
    r = (lambda x: None if x is None else x.to(dtype).double())
    return run("reference", r(hidden), r(weight), r(bias), targets, upstream, torch.float64,
               temperature)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("shape,d,V,bias,temperature", [
    ((3, 5), 80, 1000, True, 1.0),     # d = 80, V not a multiple of 128
    ((7,), 64, 4099, False, 0.6),      # 1-D tokens, V prime-ish and > one tile
    ((2, 1), 16, 17, True, 2.0),       # T = 1, tiny V
])
def test_matches_reference_fp32(impl, shape, d, V, bias, temperature):
    inputs = make_inputs(shape, d, V, bias)
    want = reference_at(torch.float32, *inputs, temperature)
    got = run(impl, *inputs, torch.float32, temperature)
    atol, rtol = TOLERANCES[torch.float32]
    assert got[0].dtype == torch.float32 and got[0].shape == shape
    assert (got[0] <= 0).all(), "log-probs must never be positive"
    assert_close("logp", got[0], want[0], atol, rtol)
    assert_close("entropy", got[1], want[1], atol * 10, rtol)
    for k in want[2]:
        assert_close(k, got[2][k], want[2][k], atol, rtol)


@pytest.mark.parametrize("impl", ["torch", "triton"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_no_worse_than_torch(impl, dtype):
    inputs = make_inputs((4, 6), 64, 777, True, seed=3)
    want = reference_at(dtype, *inputs, 0.9)
    naive = run("naive", *inputs, dtype, 0.9)
    got = run(impl, *inputs, dtype, 0.9)
    assert got[0].dtype == torch.float32
    names = ["logp", "entropy"] + list(want[2])
    for name, g, n, w in zip(names, [got[0], got[1]] + list(got[2].values()),
                             [naive[0], naive[1]] + list(naive[2].values()),
                             [want[0], want[1]] + list(want[2].values())):
        assert_no_worse_than_torch(name, g, n, w, dtype)


def test_torch_impl_gradcheck_fp64():
    h, w, b, y, _ = make_inputs((2, 3), 8, 37, True)
    fn = (lambda h, w, b: token_logprobs(h, w, y, bias=b, temperature=0.8, impl="torch"))
    assert torch.autograd.gradcheck(fn, (h.requires_grad_(), w.requires_grad_(),
                                         b.requires_grad_()))


def test_torch_impl_chunk_boundaries(monkeypatch):
    """Row chunks that do not divide n give the same result."""
    from mr1fast.loss import chunked
    inputs = make_inputs((5, 7), 32, 301, True)
    want = run("torch", *inputs, torch.float32, 1.0)
    monkeypatch.setattr(chunked, "_rows", lambda V, d: 3)
    got = run("torch", *inputs, torch.float32, 1.0)
    assert_close("logp", got[0], want[0], 1e-6, 1e-6)
    assert_close("entropy", got[1], want[1], 1e-5, 1e-6)
    for k in want[2]:
        assert_close(k, got[2][k], want[2][k], 1e-6, 1e-5)


def test_torch_impl_chunk_buffer_is_reused_and_never_shared():
    """The CPU chunk buffer (chunked._workspace) is kept between calls and grown when a call
    needs more; a nested call and another thread get their own, so no two chunks overlap."""
    import threading
    from mr1fast.loss import chunked
    chunked.release_workspace()
    with chunked._workspace(10, 64, 4, torch.float32, torch.device("cpu")) as a:
        assert a.shape == (1, 4, 64)
        with chunked._workspace(3, 64, 4, torch.float32, torch.device("cpu")) as nested:
            assert nested.shape == (1, 3, 64) and nested.data_ptr() != a.data_ptr()
        seen = {}
        t = threading.Thread(target=lambda: seen.update(ptr=_buffer_ptr(chunked)))
        t.start()
        t.join()
        assert seen["ptr"] != a.data_ptr()
    with chunked._workspace(2, 64, 4, torch.float32, torch.device("cpu")) as b:
        assert b.shape == (1, 2, 64) and b.data_ptr() == a.data_ptr()  # kept, a smaller view
    with chunked._workspace(10, 128, 4, torch.float32, torch.device("cpu"), 2) as c:
        assert c.shape == (2, 4, 128)                                   # grown: logits and e
        assert c[1].data_ptr() - c[0].data_ptr() == 4 * 128 * 4
    with chunked._workspace(10, 128, 4, torch.float64, torch.device("cpu")) as d:
        assert d.dtype == torch.float64
    # results do not depend on what an earlier call left in the buffer
    inputs = make_inputs((5, 7), 32, 301, True)
    want = run("torch", *inputs, torch.float32, 1.0)
    with chunked._workspace(100, 301, 100, torch.float32, torch.device("cpu")) as junk:
        junk.fill_(float("nan"))
    got = run("torch", *inputs, torch.float32, 1.0)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    chunked.release_workspace()


def test_torch_impl_dw_is_written_by_the_first_chunk_else_zero():
    """On the CPU dW starts unfilled and the first chunk writes it; without any chunk it is
    zero, never the memory's old contents."""
    from mr1fast.loss import chunked
    h, w = torch.randn(4, 8), torch.randn(16, 8)
    g = chunked._Grads(h, w, None, (True, True, False))
    assert torch.equal(g.result()[1], torch.zeros(16, 8))
    g = chunked._Grads(h, w, None, (False, True, False))
    a, b = torch.randn(16, 4), torch.randn(4, 8)
    g._add_dw(a, b)
    g._add_dw(a, b)
    assert_close("dW", g.result()[1], 2 * a @ b, 1e-6, 1e-6)


def _buffer_ptr(chunked):
    with chunked._workspace(10, 64, 4, torch.float32, torch.device("cpu")) as ws:
        return ws.data_ptr()


def test_triton_scratch_chunks_and_splits(monkeypatch):
    """A tiny dlogits scratch (many token and vocabulary chunks) and 3 vocabulary splits give
    the same result as the defaults."""
    from mr1fast.kernels import token_logprobs as tk
    inputs = make_inputs((40,), 32, 600, True)
    want = run("triton", *inputs, torch.float32, 1.0)
    monkeypatch.setattr(tk, "SCRATCH_BYTES", 16 * 256 * 4)  # one 16 x 256 fp32 tile
    monkeypatch.setattr(tk, "_sm_count", lambda device: 3)
    got = run("triton", *inputs, torch.float32, 1.0)
    assert_close("logp", got[0], want[0], 1e-6, 1e-6)
    for k in want[2]:
        assert_close(k, got[2][k], want[2][k], 1e-6, 1e-5)


def test_forward_grid_valid_for_huge_token_counts():
    from mr1fast.kernels.token_logprobs import MAX_GRID_YZ, forward_grid
    for n, V, bn, bv, target in [(1 << 20, 151936, 128, 128, 528), (65536, 152064, 64, 128, 528),
                                 (16, 151936, 128, 128, 528), (100, 17, 16, 16, 8),
                                 (3, 10 ** 7, 16, 16, 10 ** 6)]:
        (gx, gy), per_split = forward_grid(n, V, bn, bv, target)
        v_tiles = -(-V // bv)
        assert gx == -(-n // bn) and gx <= 2 ** 31 - 1
        assert 1 <= gy <= MAX_GRID_YZ
        assert gy * per_split >= v_tiles > (gy - 1) * per_split, "every split non-empty, all covered"
        if n >= 65536:
            assert gy == 1 or gx * gy <= 2 * target + gx


def test_backward_chunks_are_bounded():
    from mr1fast.kernels.token_logprobs import backward_chunks
    cap = 256 << 20
    nc, vc = backward_chunks(16384, 151936, 2, cap, 128, 128)
    assert nc == 16384 and vc * nc * 2 <= cap and vc % 128 == 0 and vc >= 4096
    nc, vc = backward_chunks(1 << 22, 152064, 2, cap, 128, 128)  # too many tokens for one chunk
    assert nc < 1 << 22 and nc * vc * 2 <= cap and nc % 128 == 0
    nc, vc = backward_chunks(10, 50, 4, cap, 16, 16)
    assert (nc, vc) == (16, 64)


def test_triton_rejects_cpu_without_interpreter(monkeypatch):
    from mr1fast.kernels import token_logprobs as tk
    monkeypatch.setattr(tk, "INTERPRET", False)
    h, w, b, y, _ = make_inputs()
    with pytest.raises(RuntimeError, match="CUDA"):
        token_logprobs(h.float(), w.float(), y, impl="triton")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_on_gpu_matches_reference(dtype):
    h, w, b, y, up = make_inputs((4, 300), 256, 151936 // 16 + 3, True)
    want = reference_at(dtype, h, w, b, y, up, 1.0)
    cuda = (lambda x: x.cuda() if x is not None else None)
    got = run("triton", cuda(h), cuda(w), cuda(b), y.cuda(), up.cuda(), dtype, 1.0)
    atol, rtol = TOLERANCES[dtype]
    assert_close("logp", got[0].cpu(), want[0], atol, rtol)
    for k in want[2]:
        scale = max(1.0, want[2][k].abs().max().item())
        assert max_err(got[2][k].cpu(), want[2][k]) <= atol * scale


@pytest.mark.parametrize("impl", ["torch", "triton"])
def test_fp16_tiny_gradients_do_not_underflow(impl):
    """Gradient scales of ~1e-4 times near-uniform softmax tails of ~1/V are below fp16's range
    (6e-8); the weight rows of non-target tokens get only such tail terms and must not be 0."""
    h, w, b, y, up = make_inputs((64,), 32, 4099, False, seed=5)
    h, w, up = h.abs() * 50, w * 1e-4, up.abs() * 1e-4  # dW tail ~1e-4, dlogits ~2e-8
    want = reference_at(torch.float16, h, w, b, y, up, 1.0)
    got = run(impl, h, w, b, y, up, torch.float16, 1.0)
    tail = torch.ones(4099, dtype=torch.bool)
    tail[y] = False
    g_tail, w_tail = got[2]["dW"][tail], want[2]["dW"][tail]
    rel = max_err(g_tail, w_tail) / w_tail.abs().max().item()
    assert rel < 5e-2, f"dW of non-target rows: relative error {rel:.3g}"


@pytest.mark.parametrize("impl", IMPLS)
def test_no_tokens(impl):
    h, w, b, y, _ = make_inputs((2, 0), 16, 33, True)
    logp, ent = token_logprobs(h.float().requires_grad_(), w.float(), y, return_entropy=True,
                               impl=impl)
    assert logp.shape == (2, 0) and ent.shape == (2, 0)


def test_strided_bias():
    h, w, _, y, up = make_inputs((6,), 16, 40, False)
    wide = torch.randn(40, 2, dtype=torch.float64)
    bias = wide[:, 0]  # a strided view
    want = reference_at(torch.float32, h, w, bias.contiguous(), y, up, 1.0)
    got = run("triton", h, w, bias, y, up, torch.float32, 1.0)
    assert_close("logp", got[0], want[0], *TOLERANCES[torch.float32])


@pytest.mark.parametrize("impl", ["torch", "naive"])
def test_entropy_is_differentiable(impl):
    """d(sum a * logp + b * entropy) against the fp64 reference (the entropy bonus's path)."""
    hidden, weight, bias, targets, a = make_inputs((2, 4), 16, 53, True)
    b = torch.randn(a.shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64)

    def grads(fn, dtype):
        h = hidden.detach().to(dtype).requires_grad_()
        w = weight.detach().to(dtype).requires_grad_()
        bb = bias.detach().to(dtype).requires_grad_()
        logp, ent = fn(h, w, bb)
        ((logp * a.to(logp.dtype)).sum() + (ent * b.to(ent.dtype)).sum()).backward()
        return h.grad, w.grad, bb.grad

    want = grads(lambda h, w, bb: reference_token_logprobs(h, w, targets, bias=bb,
                                                           temperature=0.7), torch.float64)
    got = grads(lambda h, w, bb: token_logprobs(h, w, targets, bias=bb, temperature=0.7,
                                                return_entropy=True, impl=impl), torch.float32)
    for name, g, wnt in zip(("dH", "dW", "db"), got, want):
        assert_close(name, g, wnt, 2e-5, 1e-4)
