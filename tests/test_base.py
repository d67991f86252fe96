"""The embedded base (mr1fast/trainer/base.py): built once into the cache by its recipe (here
with 2 SFT steps), deterministic, loaded by name, its failures reported."""
import hashlib
import json

import pytest
import torch

from mr1fast.trainer import base as B
from mr1fast.trainer.config import embedded_default
from mr1fast.trainer.errors import UserError
from mr1fast.trainer.model import PRESETS, load_model, resolve_model


def _digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_base_is_built_once_deterministically_and_resolved_by_name(tmp_path, monkeypatch):
    logs = []
    a = B.build_base("embedded-base", tmp_path / "a", logs.append, steps=2)
    b = B.build_base("embedded-base", tmp_path / "b", logs.append, steps=2)
    assert _digest(a) == _digest(b)                  # same recipe, same weights
    recipe = json.loads((a / "base.json").read_text())
    assert recipe["steps"] == 2 and recipe["preset"] == "tiny-base"
    assert len(logs) == 2 and "building the embedded-base base model" in logs[0]
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    assert B.build_base("embedded-base", tmp_path / "a", logs.append, steps=2) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime and len(logs) == 2
    model = load_model(str(a), device=torch.device("cpu"), dtype=torch.float32, trainable=False)
    assert model.config.text_config.hidden_size == PRESETS["tiny-base"]["hidden_size"]
    assert model.config.vision_config.depth == PRESETS["tiny-base"]["vision_depth"]
    # by name, from the config: the recipe's folder in the cache (built with its real steps;
    # here the 2-step build stands in for it)
    monkeypatch.setitem(B.BASES, "embedded-base", dict(B.BASES["embedded-base"], steps=2))
    cfg = embedded_default()
    cfg.cache_dir = str(tmp_path / "c")
    monkeypatch.delenv("MR1FAST_CACHE", raising=False)
    path = resolve_model("embedded-base", cfg, logs.append)
    assert path == str(B.base_folder("embedded-base", tmp_path / "c"))
    assert _digest(B.base_folder("embedded-base", tmp_path / "c")) == _digest(a)


def test_a_failed_build_says_where_its_log_is(tmp_path, monkeypatch):
    monkeypatch.setitem(B.BASES, "broken", dict(B.BASES["embedded-base"], data="synthetic:ocr"))
    with pytest.raises(UserError, match="building the base model broken-v1 failed") as e:
        B.build_base("broken", tmp_path, lambda m: None)
    log = tmp_path / "broken-v1-build.log"
    assert "ocr" in log.read_text() and str(log) in str(e.value)
    assert not (tmp_path / "broken-v1").exists()
