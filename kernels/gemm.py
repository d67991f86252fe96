"""The dense half of the fused backward: GEMMs with fp32 accumulation (cuBLAS on CUDA).

Kept free of Triton so the torch implementation of the loss library (mr1fast.loss.chunked)
shares it without importing Triton.
"""
from __future__ import annotations

import torch


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def matmul_acc(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b accumulated and returned in fp32 (fp64 for fp64). On CUDA, half inputs stay half
    for the tensor cores with an fp32 output; elsewhere they are upcast first."""
    if a.is_cuda and a.dtype in (torch.float16, torch.bfloat16):
        try:
            return torch.mm(a, b, out_dtype=torch.float32)
        except (TypeError, RuntimeError):  # torch without mm(out_dtype=): upcast instead
            pass
    dt = acc_dtype(a.dtype)
    return torch.mm(a.to(dt), b.to(dt))
