"""The hot path never synchronises the GPU with the host: grpo_loss and token_logprobs, forward
and backward, with check_values=False (as the trainer calls them).

On the CPU, the operations that read device values on the host or give data-dependent shapes
are instrumented (a TorchDispatchMode sees every ATen op, in the backward too: the scalar reads
behind item(), bool(), int() and float(), nonzero, unique, boolean-mask indexing,
repeat_interleave without output_size, ...; plus the tolist / numpy / cpu methods), and the calls
made from mr1fast's own code are counted: there must be none. (Triton's CPU interpreter copies tensors to
numpy by design; its calls come from Triton's files and are not counted.) With the checks on the
same instrument counts calls, so it can fail. On CUDA, torch.cuda.set_sync_debug_mode("error")
turns any synchronising call into an error.
"""
import sys
from pathlib import Path

import pytest
import torch
from test_grpo_loss import CASES, make_case
from torch.utils._python_dispatch import TorchDispatchMode

import mr1fast
import mr1fast.kernels.gemm
from mr1fast import grpo_loss, token_logprobs

OWN_CODE = (str(Path(mr1fast.__file__).parent), str(Path(mr1fast.kernels.gemm.__file__).parent))
TORCH = str(Path(torch.__file__).parent)
# ATen ops that read a device value on the host (_local_scalar_dense: item(), bool(), int(),
# float()) or whose output shape depends on values.
SYNCING_OPS = {"_local_scalar_dense", "nonzero", "masked_select", "argwhere", "_unique",
               "_unique2", "unique_dim", "unique_consecutive"}
# Tensor methods that copy to the host without an ATen op on CPU tensors.
HOST_METHODS = ("tolist", "numpy", "cpu")


def _syncs(func, args, kwargs) -> bool:
    name = func.overloadpacket.__name__
    if name in SYNCING_OPS:
        return True
    if name in ("index", "index_put", "index_put_"):  # boolean-mask indexing
        return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] or ())
    if func is torch.ops.aten.repeat_interleave.Tensor:
        return kwargs.get("output_size", args[1] if len(args) > 1 else None) is None
    return False


def _caller(depth: int) -> str:
    """The file of the innermost calling frame outside torch itself."""
    frame = sys._getframe(depth)
    while frame is not None and frame.f_code.co_filename.startswith(TORCH):
        frame = frame.f_back
    return "" if frame is None else f"{frame.f_code.co_filename}:{frame.f_lineno}"


class SyncCounter(TorchDispatchMode):
    """Records the syncing ATen ops called from mr1fast's code (forward and backward)."""

    def __init__(self, calls):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _syncs(func, args, kwargs):
            where = _caller(2)
            if where.startswith(OWN_CODE):
                self.calls.append((func.overloadpacket.__name__, where))
        return func(*args, **kwargs)


@pytest.fixture
def sync_calls(monkeypatch):
    """A list that collects (what, where) of every syncing call from mr1fast's code while the
    test runs."""
    calls = []

    def wrap(name, original):
        def counted(*args, **kwargs):
            where = _caller(2)
            if where.startswith(OWN_CODE):
                calls.append((name, where))
            return original(*args, **kwargs)
        return counted

    for name in HOST_METHODS:  # plain methods (not type slots): safe to patch and restore
        monkeypatch.setattr(torch.Tensor, name, wrap(name, getattr(torch.Tensor, name)))
    with SyncCounter(calls):
        yield calls


def trainer_like_call(case, impl, check_values):
    """grpo_loss forward + backward as the trainer calls it, then token_logprobs (no grad, as
    for the old and reference log-probs) and its backward."""
    hidden, weight, targets, adv, kw = make_case(CASES[case])
    h = hidden.float().requires_grad_()
    w = weight.float().requires_grad_()
    if kw.get("bias") is not None:
        kw["bias"] = kw["bias"].float()
    if "max_completion_length" not in kw and kw["loss_type"] == "dr_grpo":
        kw["max_completion_length"] = targets.shape[1]
    loss, stats = grpo_loss(h, w, targets, adv, return_entropy=True, impl=impl,
                            check_values=check_values, **kw)
    loss.backward()
    logp = token_logprobs(h, w, targets, bias=kw.get("bias"), temperature=kw["temperature"],
                          impl=impl, check_values=check_values)
    logp.sum().backward()
    return loss, stats


@pytest.mark.parametrize("impl", ["torch", "triton", "naive"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_with_checks_off_never_syncs(sync_calls, case, impl):
    trainer_like_call(case, impl, check_values=False)
    assert sync_calls == [], f"syncing calls in the loss with check_values=False: {sync_calls}"


def test_the_instrument_sees_the_checks_syncs(sync_calls):
    trainer_like_call("bnpo_onpolicy_iw_token_adv", "torch", check_values=True)
    names = {name for name, _ in sync_calls}
    assert {"nonzero", "_local_scalar_dense"} <= names, sync_calls


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_micro_step_has_no_host_sync(dtype):
    """A training micro-step's loss (forward and backward) under sync-debug mode "error"."""
    hidden, weight, targets, adv, kw = make_case(CASES["grpo_offpolicy_kl_bias_temp"])
    cuda = (lambda x: x.cuda() if isinstance(x, torch.Tensor) else x)
    kw = {k: cuda(v) for k, v in kw.items()}
    kw["bias"] = kw["bias"].to(dtype)
    h = hidden.to(dtype).cuda().requires_grad_()
    w = weight.to(dtype).cuda().requires_grad_()
    targets, adv = targets.cuda(), adv.cuda()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        loss, _ = grpo_loss(h, w, targets, adv, return_entropy=True, impl="triton",
                            check_values=False, **kw)
        loss.backward()
        token_logprobs(h, w, targets, bias=kw["bias"], temperature=kw["temperature"],
                       impl="triton", check_values=False).sum().backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss).item() and torch.isfinite(w.grad).all().item()


@pytest.mark.parametrize("impl", ["torch", "naive"])
@pytest.mark.parametrize("case", ["gspo_cispo_packed", "vespo_iw_token", "top_entropy",
                                  "off_policy_mask", "delta_dual_clip", "k3_bias_corrected",
                                  "iw_per_sequence", "token_advantages_rewards_eps"])
def test_family_options_with_checks_off_never_sync(sync_calls, case, impl):
    """The family's options (tests/test_grpo_family.py's cases) add no sync either: segment
    sums, the top-entropy quantile and the off-policy mask stay on the device."""
    from test_grpo_family import case_inputs
    h, w, y, adv, kw = case_inputs(case)
    kw = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
          for k, v in kw.items()}
    hh = h.float().requires_grad_()
    ww = w.float().requires_grad_()
    loss, _ = grpo_loss(hh, ww, y, None if adv is None else adv.float(), return_entropy=True,
                        impl=impl, check_values=False, **kw)
    loss.backward()
    assert sync_calls == [], f"syncing calls with check_values=False: {sync_calls}"
