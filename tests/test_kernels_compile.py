"""Every kernel specialisation the launchers can produce builds for the GPUs it targets, with no
GPU: Triton's ahead-of-time compiler, down to cubin, for Hopper (sm_90) and Ampere (sm_80), and
the bf16 / fp16 matmuls use tensor-core instructions (wgmma on sm_90, mma.sync on sm_80).
tests/kernel_specializations.py records the launches and compiles them (in a subprocess: the
rest of the tests run Triton's interpreter, whose kernels cannot be compiled)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

HERE = Path(__file__).resolve().parent
ARCHS = ("sm_90", "sm_80")


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, str(HERE / "kernel_specializations.py"), *ARCHS],
                         capture_output=True, text=True, env=env, cwd=HERE.parent, timeout=900)
    assert out.returncode == 0, out.stderr[-4000:]
    return json.loads(out.stdout)


def test_every_specialisation_builds(report):
    failed = [f"{e['arch']} {e['kernel']} {e['dtype']} {e['constexprs']}: {e.get('error')}"
              for e in report if not e["ok"]]
    assert failed == [], "kernels that do not build:\n" + "\n".join(failed)


def test_every_kernel_and_every_optional_input_is_covered(report):
    from mr1fast.kernels import grpo_loss, token_logprobs

    kernels = {name for module in (token_logprobs, grpo_loss) for name in vars(module)
               if name.endswith("_kernel")}
    for arch in ARCHS:
        built = [e for e in report if e["arch"] == arch]
        count = {k: sum(e["kernel"] == k for e in built) for k in kernels}
        # The epilogue: advantages or rewards, and old, ref, importance weights, beta tensor
        # each present or absent (None), then the sampler log-probs, top-entropy mask and
        # entropy bonus each on top of all of them; the matmul kernels: 3 dtypes x bias or not
        # (x the entropy gradient or not, backward).
        assert count == {"_grpo_loss_fwd_kernel": 2 ** 5 + 3, "_token_logprobs_fwd_kernel": 6,
                         "_token_logprobs_bwd_kernel": 12, "_token_logprobs_merge_kernel": 1}


def test_half_precision_matmuls_use_tensor_cores(report):
    for e in report:
        if not e["dot"] or e["dtype"] == "fp32":
            continue
        where = f"{e['arch']} {e['kernel']} {e['dtype']}"
        if e["arch"] == "sm_90":
            assert e["wgmma"], f"{where}: no wgmma in the PTX"
        else:
            assert e["mma"], f"{where}: no mma.sync in the PTX"
