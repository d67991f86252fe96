"""The softmax rows of the torch implementation's chunks (mr1fast.loss.chunked) on the CPU.

exp_rows(z, keep_logits, want_dot) takes a chunk of logits z [R, V] and returns (e, m, s, t):
e = exp(z - m) with m the row max, s = sum_v e and, with want_dot, t = sum_v e * (z - m) (else
None); the entropy is log s - t / s. With keep_logits z is left as it was and e is a new tensor,
else e is z, overwritten. The native kernel (csrc/cpu_rows.cpp, mr1fast.kernels._cpu: one pass
for the max and one for exp and the sums, per row in cache) runs for contiguous fp32 CPU chunks
where it was built for this machine's SIMD capability; everything else, and MR1FAST_NATIVE=0,
runs exp_rows_reference, torch's ops, which is its specification (tests/test_cpu_rows.py).
"""
from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=None)
def native():
    """The mr1fast.kernels._cpu module, or None: not built, MR1FAST_NATIVE=0, or built for
    SIMD instructions this CPU lacks."""
    if os.environ.get("MR1FAST_NATIVE", "1") == "0":
        return None
    try:
        from . import _cpu
    except ImportError:
        return None
    have = torch.backends.cpu.get_cpu_capability()
    built = _cpu.capability()
    ok = built == "DEFAULT" or have.startswith(built) or (built == "AVX2"
                                                          and have.startswith("AVX512"))
    return _cpu if ok else None


def exp_rows_reference(z: torch.Tensor, keep_logits: bool, want_dot: bool):
    m = z.amax(1)
    zc = z - m[:, None] if keep_logits else z.sub_(m[:, None])   # z - m in place unless kept
    e = torch.exp(zc) if want_dot or keep_logits else zc.exp_()
    s = e.sum(1)
    t = torch.linalg.vecdot(e, zc) if want_dot else None
    return e, m, s, t


def exp_rows(z: torch.Tensor, keep_logits: bool = False, want_dot: bool = False,
             use_native: bool | None = None, out: torch.Tensor | None = None):
    """(e, m, s, t) for a chunk of logits z [R, V]; see the module doc. use_native None: the
    native kernel where it applies; True: it or an error; False: the reference. out: where the
    native kernel writes e when keep_logits (a contiguous tensor shaped like z; the reference
    allocates its own)."""
    ext = native() if use_native is not False else None
    applies = (ext is not None and z.dtype == torch.float32 and z.device.type == "cpu"
               and z.dim() == 2 and z.is_contiguous() and z.shape[1] > 0)
    if use_native and not applies:
        raise RuntimeError("exp_rows: the native kernel mr1fast.kernels._cpu is not built for "
                           "this machine (run `bash setup.sh`) or does not take this chunk "
                           f"({z.dtype}, {z.device}, contiguous={z.is_contiguous()})")
    if not applies:
        return exp_rows_reference(z, keep_logits, want_dot)
    if not keep_logits:
        e = z
    elif out is not None and out.shape == z.shape and out.dtype == z.dtype and \
            out.is_contiguous():
        e = out
    else:
        e = torch.empty_like(z)
    m, s, t = ext.exp_rows(z, e, want_dot)
    return e, m, s, (t if want_dot else None)
