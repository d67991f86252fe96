"""Fused GRPO-D loss, forward + backward: mr1fast's impls against naive (TRL's path), Liger's
LigerFusedLinearGRPOLoss and, on a GPU, the same-run cuBLAS GEMM floor (logits, dH, dW: 6NdV).

    pytest bench/bench_grpo_loss.py --benchmark-only [--save-results]

Records time (median ms), TFLOP/s (counting 6NdV and 8NdV) and extra peak memory: on CPU the
peak RSS of a child process that runs one fwd+bwd, minus its RSS before; on CUDA the max
allocated minus inputs minus the returned gradients. The last test checks the targets as
ratios against naive measured in this same run.
"""
import gc
import multiprocessing as mp
import resource

import pytest
import torch
from results import record

import mr1fast

ON_GPU = torch.cuda.is_available()
BETA = 0.04

CPU_SHAPES = {"cpu": dict(B=8, T=512, d=256, V=65536, dtype=torch.float32)}
GPU_SHAPES = {
    "qwen2vl-2b": dict(B=16, T=1024, d=1536, V=151936, dtype=torch.bfloat16),
    "qwen25vl-7b": dict(B=8, T=1024, d=3584, V=152064, dtype=torch.bfloat16),
}
SHAPES = GPU_SHAPES if ON_GPU else CPU_SHAPES
PROVIDERS = (["triton", "torch", "naive", "liger", "cublas_floor"] if ON_GPU
             else ["torch", "naive", "liger"])


def make_inputs(B, T, d, V, dtype, device):
    g = torch.Generator(device="cpu").manual_seed(0)
    h = (torch.randn(B, T, d, generator=g) * 0.5).to(device, dtype).requires_grad_()
    w = (torch.randn(V, d, generator=g) / d ** 0.5).to(device, dtype).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g).to(device)
    adv = torch.randn(B, generator=g).to(device)
    old = (torch.randn(B, T, generator=g) * 0.1 - torch.log(torch.tensor(float(V)))).to(device)
    ref = old + 0.05
    mask = torch.ones(B, T, device=device)
    return dict(h=h, w=w, y=y, adv=adv, old=old, ref=ref, mask=mask)


def make_step(provider, x):
    """A closure running one forward + backward of provider on inputs x."""
    if provider in ("triton", "torch", "naive"):
        def step():
            loss, _ = mr1fast.grpo_loss(x["h"], x["w"], x["y"], x["adv"], mask=x["mask"],
                                        old_logp=x["old"], ref_logp=x["ref"], beta=BETA,
                                        impl=provider)
            loss.backward()
        return step
    if provider == "liger":
        from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
        fn = LigerFusedLinearGRPOLoss(beta=BETA, compiled=False, loss_type="grpo")

        def step():
            out = fn(x["h"], x["w"], x["y"], x["mask"], x["adv"], ref_per_token_logps=x["ref"],
                     old_per_token_logps=x["old"])
            (out[0] if isinstance(out, tuple) else out).backward()
        return step
    if provider == "cublas_floor":
        h2 = x["h"].detach().reshape(-1, x["h"].shape[-1])
        w = x["w"].detach()
        n, v = h2.shape[0], w.shape[0]
        chunk = max(1, (1 << 28) // (n * 2))  # bounded logits chunk; the GEMMs are the same

        def step():
            for v0 in range(0, v, chunk):
                logits = h2 @ w[v0:v0 + chunk].t()
                _ = logits @ w[v0:v0 + chunk]        # dH
                _ = logits.t() @ h2                  # dW
        return step
    raise ValueError(provider)


def _available(provider):
    if provider == "liger":
        try:
            import liger_kernel.chunked_loss  # noqa: F401
        except ImportError:
            return False
    return True


def _child_extra_rss(provider, shape, queue):
    x = make_inputs(**shape, device="cpu")
    step = make_step(provider, x)
    gc.collect()
    import psutil
    base = psutil.Process().memory_info().rss
    step()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    queue.put(max(0, peak - base))


def extra_peak_bytes(provider, shape, x=None):
    if ON_GPU:
        step = make_step(provider, x)
        for t in (x["h"], x["w"]):
            t.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        grads = sum(t.grad.numel() * t.grad.element_size() for t in (x["h"], x["w"])
                    if t.grad is not None)
        return torch.cuda.max_memory_allocated() - base - grads
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_extra_rss, args=(provider, shape, q))
    p.start()
    value = q.get(timeout=900)
    p.join()
    return value


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_grpo_loss_fwd_bwd(benchmark, records, shape_name, provider):
    if not _available(provider):
        pytest.skip(f"{provider} not installed")
    shape = SHAPES[shape_name]
    device = "cuda" if ON_GPU else "cpu"
    x = make_inputs(**shape, device=device)
    step = make_step(provider, x)

    def run():
        for t in (x["h"], x["w"]):
            t.grad = None
        step()
        if ON_GPU:
            torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=10 if ON_GPU else 3, warmup_rounds=1)
    median = benchmark.stats.stats.median
    n, d, v = shape["B"] * shape["T"], shape["d"], shape["V"]
    dims = {k: shape[k] for k in ("B", "T", "d", "V")}
    rec = [record("grpo_loss", provider, "fwd_bwd", dims, shape["dtype"], "time", median * 1e3,
                  "ms")]
    for k in (6, 8):
        rec.append(record("grpo_loss", provider, "fwd_bwd", dims, shape["dtype"],
                          f"tflops_{k}ndv", k * n * d * v / median / 1e12, "TFLOP/s"))
    if provider != "cublas_floor":
        extra = extra_peak_bytes(provider, shape, x)
        rec.append(record("grpo_loss", provider, "fwd_bwd", dims, shape["dtype"],
                          "extra_peak_memory", extra / 2 ** 20, "MiB"))
        benchmark.extra_info["extra_peak_MiB"] = extra / 2 ** 20
    records.extend(rec)


def _value(records, shape, impl, metric):
    dims = {k: shape[k] for k in ("B", "T", "d", "V")}
    for r in records:
        if r["impl"] == impl and r["metric"] == metric and r["shape"] == dims:
            return r["value"]
    pytest.skip(f"no {impl} {metric} measured in this run")


@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_targets(benchmark, records, shape_name):
    """Ratios against naive (and the GEMM floor on GPU), all measured in this run. (It takes
    the benchmark fixture only so that --benchmark-only runs it.)"""
    shape = SHAPES[shape_name]
    ours = "triton" if ON_GPU else "torch"
    t_ours, t_naive = _value(records, shape, ours, "time"), _value(records, shape, "naive", "time")
    m_ours = _value(records, shape, ours, "extra_peak_memory")
    m_naive = _value(records, shape, "naive", "extra_peak_memory")
    print(f"\n{shape_name}: {ours}/naive time {t_ours / t_naive:.2f}x, "
          f"extra peak {m_ours:.0f} / {m_naive:.0f} MiB = {m_ours / m_naive:.2f}x")
    if ON_GPU:
        floor = _value(records, shape, "cublas_floor", "time")
        print(f"{shape_name}: triton / cuBLAS floor {t_ours / floor:.2f}x")
        assert t_ours < t_naive
        assert t_ours <= 1.3 * floor, f"triton {t_ours:.1f} ms > 1.3 x floor {floor:.1f} ms"
        if shape_name == "qwen2vl-2b":
            assert m_ours <= 1.2 * 1024, f"extra peak {m_ours:.0f} MiB > 1.2 GiB"
    else:
        assert t_ours <= 1.5 * t_naive, f"torch impl {t_ours / t_naive:.2f}x naive's time"
        assert m_ours < 0.25 * m_naive, f"torch impl extra peak {m_ours / m_naive:.2f}x naive's"
