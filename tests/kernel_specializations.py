"""Every kernel specialisation mr1fast's launchers can produce, compiled ahead of time for CUDA
GPUs with Triton's own compiler (no GPU needed). Run as a script by test_kernels_compile.py:

    python tests/kernel_specializations.py sm_90 sm_80 > report.json

It must run without TRITON_INTERPRET (the kernels must be real JIT functions). The launchers
(token_logprobs_forward / _backward, grpo_loss_forward) are called on small CPU tensors for every
combination of their inputs (dtype, bias or not, the entropy gradient or not, each optional input
present or absent, beta a float or a tensor; the epilogue's sampler log-probs, top-entropy mask
and entropy bonus each present on top of every other input) with Triton's launch replaced by a
recorder; each distinct (kernel, signature, constexprs, options) is then compiled down to cubin
for each architecture, and the report says whether it built and whether its matmuls use
tensor-core instructions.
"""
import inspect
import itertools
import json
import multiprocessing
import os
import sys
import time

assert os.environ.get("TRITON_INTERPRET") != "1", "run without TRITON_INTERPRET"

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from mr1fast.kernels import grpo_loss as gk  # noqa: E402
from mr1fast.kernels import token_logprobs as tk  # noqa: E402
from mr1fast.loss import LossOptions  # noqa: E402
from mr1fast.loss.fused import top_entropy_selection  # noqa: E402
from mr1fast.loss.options import VESPO_LOG_MAX, VESPO_LOG_MIN  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32"}
OPTIONS = ("num_warps", "num_stages")


def record_launches():
    """(kernel, bound arguments, options, input dtype) of every launch the launchers make."""
    seen = []
    dtype_now = {}

    def recorder(self, *args, grid, warmup, **kwargs):
        options = {k: kwargs.pop(k) for k in OPTIONS if k in kwargs}
        bound = inspect.signature(self.fn).bind(*args, **kwargs)
        seen.append((self, dict(bound.arguments), options, dtype_now["dtype"]))

    JITFunction.run, original = recorder, JITFunction.run
    try:
        n, d, V = 70, 64, 300
        for dtype, has_bias in itertools.product((torch.float32, torch.bfloat16, torch.float16),
                                                 (False, True)):
            dtype_now["dtype"] = dtype
            h, w = torch.randn(n, d).to(dtype), torch.randn(V, d).to(dtype)
            b = torch.randn(V).to(dtype) if has_bias else None
            y = torch.randint(0, V, (n,))
            lse = torch.zeros(n)
            tk.token_logprobs_forward(h, w, b, y, 1.0)
            tk.token_logprobs_backward(h, w, b, y, lse, torch.ones(n), 1.0)
            tk.token_logprobs_backward(h, w, b, y, lse, torch.ones(n), 1.0, entropy=lse,
                                       grad_entropy=torch.ones(n))
            per_token = torch.zeros(n)
            # The first five optional inputs each present or absent with the last three absent,
            # then each of the last three present on top of all the others.
            combos = [c + (False,) * 3 for c in itertools.product((False, True), repeat=5)]
            combos += [(True,) * 5 + tuple(i == j for j in range(3)) for i in range(3)]
            for from_rewards, old, ref, iw, beta_tensor, sampling, top, bonus in combos:
                gk.grpo_loss_forward(
                    h, w, b, y, LossOptions(entropy_coef=0.01 if bonus else 0.0),
                    scale=per_token, mask=per_token, cu_seqlens=torch.tensor([0, 30, n]),
                    vespo_log_range=(VESPO_LOG_MIN, VESPO_LOG_MAX),
                    advantages=None if from_rewards else per_token,
                    rewards=torch.zeros(2) if from_rewards else None,
                    group_size=2 if from_rewards else 0,
                    old_logp=per_token if old else None, ref_logp=per_token if ref else None,
                    importance_weights=per_token if iw else None,
                    sampling_logp=per_token if sampling else None,
                    top_entropy=top_entropy_selection(0.5) if top else None,
                    beta=torch.zeros(1) if beta_tensor else 0.04)
    finally:
        JITFunction.run = original
    return seen


def ast_source(kernel, arguments):
    """The ASTSource of one recorded launch: tensors as typed pointers, None as a constexpr
    (Triton specialises on it), ints and floats as scalars, constexpr parameters as values."""
    params = inspect.signature(kernel.fn).parameters
    signature, constexprs = {}, {}
    for name, value in arguments.items():
        if "constexpr" in str(params[name].annotation) or value is None:
            signature[name] = "constexpr"
            constexprs[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            signature[name] = "fp32"
    return ASTSource(kernel, signature, constexprs=constexprs), signature, constexprs


def compile_one(job):
    """Compile one recorded specialisation for one architecture; a report entry."""
    arch, (name, signature, constexprs, options, dtype, kernel, src) = job
    t0 = time.perf_counter()
    entry = {"kernel": name, "arch": arch, "dtype": dtype, "signature": signature,
             "constexprs": constexprs, "options": options,
             "dot": name in ("_token_logprobs_fwd_kernel", "_token_logprobs_bwd_kernel")}
    try:
        compiled = triton.compile(src, target=GPUTarget("cuda", int(arch.removeprefix("sm_")), 32),
                                  options=dict(options, enable_fp_fusion=True))
        ptx = compiled.asm["ptx"]
        entry.update(ok=bool(compiled.asm.get("cubin")), wgmma="wgmma.mma_async" in ptx,
                     mma="mma.sync.aligned" in ptx)
    except Exception as e:  # reported, not raised: the test names every failure
        entry.update(ok=False, error=f"{type(e).__name__}: {e}"[:2000])
    entry["seconds"] = round(time.perf_counter() - t0, 3)
    return entry


SPECS = []  # filled before the worker processes fork


def main(archs):
    unique = {}
    for kernel, arguments, options, dtype in record_launches():
        src, signature, constexprs = ast_source(kernel, arguments)
        key = (kernel.__name__, json.dumps(signature), repr(sorted(constexprs.items())),
               json.dumps(options, sort_keys=True))
        unique.setdefault(key, (kernel.__name__, signature, constexprs, options, DTYPES[dtype],
                                kernel, src))
    SPECS.extend(unique.values())
    jobs = [(arch, i) for arch in archs for i in range(len(SPECS))]
    # Compiling is CPU-bound: one process per core (fork: the workers inherit SPECS).
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        report = pool.map(_compile_index, jobs, chunksize=1)
    json.dump(report, sys.stdout, default=str)


def _compile_index(job):
    arch, i = job
    return compile_one((arch, SPECS[i]))


if __name__ == "__main__":
    main(sys.argv[1:] or ["sm_90", "sm_80"])
