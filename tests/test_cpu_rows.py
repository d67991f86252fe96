"""mr1fast.kernels.cpu_rows: the native softmax rows (csrc/cpu_rows.cpp) against their torch
reference, and the torch impl of the loss with the native rows against it without them."""
import functools
import os
import shutil

import pytest
import torch

import mr1fast
from mr1fast.kernels import cpu_rows
from mr1fast.loss import chunked

NATIVE = cpu_rows.native() is not None
needs_native = pytest.mark.skipif(not NATIVE, reason="mr1fast.kernels._cpu is not built")


def test_native_rows_are_built_where_a_compiler_exists():
    """setup.sh builds csrc/ wherever a C++ compiler exists (CI has one): not skipped there."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: torch's ops run")
    if os.environ.get("MR1FAST_NATIVE") == "0":
        pytest.skip("MR1FAST_NATIVE=0: the native extensions are switched off")
    assert NATIVE, "mr1fast.kernels._cpu is not built (or not for this CPU): run `bash setup.sh`"
    assert cpu_rows.native().capability() in ("AVX512", "AVX2", "DEFAULT")


@needs_native
@pytest.mark.parametrize("R,V", [(1, 1), (3, 15), (7, 16), (5, 33), (64, 1000), (130, 4099)])
@pytest.mark.parametrize("keep_logits,want_dot", [(False, False), (False, True), (True, True),
                                                  (True, False)])
def test_native_rows_equal_the_reference(R, V, keep_logits, want_dot):
    g = torch.Generator().manual_seed(R * 7919 + V)
    z = torch.randn(R, V, generator=g) * 4 + torch.randn(R, 1, generator=g) * 30
    z[0, V // 2] = 60.0          # a large logit: the max shift matters
    if V > 3 and not want_dot:  # a masked vocabulary entry (a -inf bias): exp 0. (The
        z[-1, 1] = float("-inf")  # entropy is NaN there, in the specification too: 0 * -inf.)
    z64 = z.double()
    m64 = z64.amax(1)
    e64 = torch.exp(z64 - m64[:, None])
    s64 = e64.sum(1)
    t64 = (e64 * (z64 - m64[:, None])).sum(1)
    for native in (True, False):
        zz = z.clone()
        e, m, s, t = cpu_rows.exp_rows(zz, keep_logits, want_dot, use_native=native)
        assert torch.equal(m, z.amax(1))
        torch.testing.assert_close(e.double(), e64, rtol=3e-6, atol=1e-7)
        torch.testing.assert_close(s.double(), s64, rtol=3e-6, atol=0)
        if want_dot:
            torch.testing.assert_close(t.double(), t64, rtol=1e-5, atol=1e-5)
        else:
            assert t is None
        if keep_logits:
            assert torch.equal(zz, z) and e.data_ptr() != zz.data_ptr()
        elif native:
            assert e.data_ptr() == zz.data_ptr()  # in place: no second [R, V] buffer


@needs_native
@needs_native
def test_native_rows_write_a_kept_chunk_into_the_given_buffer():
    z = torch.randn(5, 33)
    want = cpu_rows.exp_rows(z.clone(), True, True, use_native=True)
    buf = torch.full((5, 33), float("nan"))
    got = cpu_rows.exp_rows(z, True, True, use_native=True, out=buf)
    assert got[0].data_ptr() == buf.data_ptr()
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    wrong = torch.empty(4, 33)    # not shaped like z: a fresh tensor instead
    assert cpu_rows.exp_rows(z, True, False, use_native=True, out=wrong)[0].data_ptr() != \
        wrong.data_ptr()


def test_native_rows_propagate_nan():
    z = torch.randn(2, 40)
    z[1, 5] = float("nan")
    e, m, s, t = cpu_rows.exp_rows(z, False, True, use_native=True)
    assert torch.isfinite(s[0]) and torch.isnan(s[1]) and torch.isnan(t[1])


def test_other_chunks_take_the_reference():
    """fp64, non-contiguous or (forced) unavailable: torch's ops; use_native=True says why."""
    z = torch.randn(4, 9, dtype=torch.float64)
    e, m, s, _ = cpu_rows.exp_rows(z.clone(), False, False)
    torch.testing.assert_close(s, torch.exp(z - z.amax(1, keepdim=True)).sum(1))
    with pytest.raises(RuntimeError, match="does not take this chunk|not built"):
        cpu_rows.exp_rows(torch.randn(9, 4).t(), False, False, use_native=True)


def test_native_switch(monkeypatch):
    monkeypatch.setenv("MR1FAST_NATIVE", "0")
    cpu_rows.native.cache_clear()
    try:
        assert cpu_rows.native() is None
        with pytest.raises(RuntimeError, match="not built"):
            cpu_rows.exp_rows(torch.randn(2, 3), False, False, use_native=True)
    finally:
        monkeypatch.delenv("MR1FAST_NATIVE")
        cpu_rows.native.cache_clear()


@needs_native
@pytest.mark.parametrize("opts", [dict(), dict(entropy_coef=0.01), dict(loss_type="dapo",
                                  importance_sampling_level="sequence", top_entropy_quantile=0.5)])
def test_loss_with_native_rows_equals_it_without(monkeypatch, opts):
    """The torch impl (fp32, several chunks) with the native rows: the same loss, gradients,
    log-probs and entropies as with torch's ops, to fp32 rounding."""
    monkeypatch.setattr(chunked, "_rows", lambda V, d: 7)   # 7 rows per chunk
    g = torch.Generator().manual_seed(3)
    B, T, d, V = 4, 9, 16, 300
    h = torch.randn(B, T, d, generator=g)
    w = torch.randn(V, d, generator=g) * 0.3
    y = torch.randint(0, V, (B, T), generator=g)
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.1 - 5.7
    out = {}
    for native in (True, False):
        monkeypatch.setattr(chunked, "exp_rows",
                            functools.partial(cpu_rows.exp_rows, use_native=native))
        hh, ww = h.clone().requires_grad_(), w.clone().requires_grad_()
        loss, stats = mr1fast.grpo_loss(hh, ww, y, adv, old_logp=old, ref_logp=old + 0.05,
                                        beta=0.04, impl="torch", return_entropy=True, **opts)
        loss.backward()
        out[native] = (loss, hh.grad, ww.grad, stats["logp"], stats["entropy"])
    for a, b in zip(out[True], out[False]):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


def test_chunk_rows():
    """The torch impl's chunk rows (chunked._rows): the measured best of the CPU shapes, never
    past ROW_CAP elements, at least one row."""
    assert [chunked._rows(V, d) for V, d in [(16384, 128), (65536, 128), (4096, 128),
                                             (16384, 512)]] == [128, 128, 512, 512]
    for V in (2, 300, 4096, 32000, 151936, 10 ** 7, 10 ** 8):
        for d in (8, 128, 1536, 8192):
            r = chunked._rows(V, d)
            assert r >= 1 and (r == 1 or r * V <= chunked.ROW_CAP)
