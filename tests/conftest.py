"""Test setup: on a machine without CUDA the Triton kernels run in Triton's CPU interpreter,
which must be chosen before mr1fast.kernels (and so triton's decorators) is imported."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """The tiny random-weight Qwen2-VL (tokenizer and image processor included), built once."""
    from mr1fast.trainer.model import init_tiny_model

    return init_tiny_model(tmp_path_factory.mktemp("models") / "tiny", seed=0)


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, tiny_model_dir):
    """An MR1FAST_CACHE for trainer runs: the tiny model pre-placed where `model.name=tiny`
    looks (seed 0), synthetic data generated on first use."""
    import shutil

    root = tmp_path_factory.mktemp("cache")
    shutil.copytree(tiny_model_dir, root / "tiny-qwen2vl-seed0")
    return root
