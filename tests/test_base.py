"""The embedded base (mr1fast/trainer/base.py): shipped with the package and found by name;
rebuilt by its recipe (here with 4 SFT steps and a few validation items) deterministically,
choosing its checkpoint on validation; its failures reported."""
import hashlib
import json

import pytest
import torch

from mr1fast.trainer import base as B
from mr1fast.trainer.config import embedded_default
from mr1fast.trainer.errors import UserError
from mr1fast.trainer.model import PRESETS, load_model, resolve_model

SMALL = {"max_steps": 4, "every": 2, "rows": 64,
         "select": dict(B.BASES["embedded-base"]["select"], items=4, min_accuracy=0.0)}


def _digest(folder):
    return hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()


def test_base_is_built_once_deterministically_choosing_on_validation(tmp_path):
    logs = []
    a = B.build_base("embedded-base", tmp_path / "a", logs.append, recipe=SMALL)
    b = B.build_base("embedded-base", tmp_path / "b", logs.append, recipe=SMALL)
    assert _digest(a) == _digest(b)                  # same recipe, same weights
    made = json.loads((a / "base.json").read_text())
    assert made["max_steps"] == 4 and made["preset"] == "tiny-base"
    # every checkpoint was evaluated on both tasks; the first one at the threshold was taken
    assert set(made["validation_accuracy"]) == {"step-000002", "step-000004"}
    assert set(made["validation_accuracy"]["step-000002"]) == {"counting", "geometry"}
    assert made["chosen"] == "step-000002"
    assert "building the embedded-base base model" in logs[0]
    mtime = (a / "model.safetensors").stat().st_mtime_ns
    n_logs = len(logs)
    assert B.build_base("embedded-base", tmp_path / "a", logs.append, recipe=SMALL) == a
    assert (a / "model.safetensors").stat().st_mtime_ns == mtime and len(logs) == n_logs
    model = load_model(str(a), device=torch.device("cpu"), dtype=torch.float32, trainable=False)
    assert model.config.text_config.hidden_size == PRESETS["tiny-base"]["hidden_size"]
    assert model.config.vision_config.depth == PRESETS["tiny-base"]["vision_depth"]


def test_a_base_below_the_threshold_everywhere_is_an_error(tmp_path):
    recipe = dict(SMALL, max_steps=2, select=dict(SMALL["select"], min_accuracy=101.0))
    with pytest.raises(UserError, match="no checkpoint reached 101.0% on every task") as e:
        B.build_base("embedded-base", tmp_path, lambda m: None, recipe=recipe)
    log = next(tmp_path.glob("*-build.log"))
    assert "step-000002" in json.loads(log.read_text()) and str(log) in str(e.value)
    assert not [p for p in tmp_path.glob("embedded-base*") if p.is_dir()]   # no base left


def test_a_failed_build_says_where_its_log_is(tmp_path, monkeypatch):
    monkeypatch.setitem(B.BASES, "broken", dict(B.BASES["embedded-base"], data="synthetic:ocr"))
    with pytest.raises(UserError, match="building the base model broken-v2 failed") as e:
        B.build_base("broken", tmp_path, lambda m: None)
    log = tmp_path / "broken-v2-build.log"
    assert "ocr" in log.read_text() and str(log) in str(e.value)
    assert not (tmp_path / "broken-v2").exists()


def test_the_shipped_base_is_found_by_name_and_else_built_into_the_cache(tmp_path,
                                                                         monkeypatch):
    cfg = embedded_default()
    cfg.cache_dir = str(tmp_path / "cache")
    monkeypatch.delenv("MR1FAST_CACHE", raising=False)
    shipped = B.shipped_folder("embedded-base")
    assert (shipped / "base.json").is_file(), "the embedded base's weights ship with the package"
    assert resolve_model("embedded-base", cfg, pytest.fail) == str(shipped)   # nothing built
    made = json.loads((shipped / "base.json").read_text())
    chosen = made["validation_accuracy"][made["chosen"]]
    assert min(chosen.values()) >= made["select"]["min_accuracy"]
    model = load_model(str(shipped), device=torch.device("cpu"), dtype=torch.float32,
                       trainable=False)
    assert model.config.text_config.hidden_size == PRESETS["tiny-base"]["hidden_size"]
    # without a shipped copy: built into the cache by the recipe (a small one stands in)
    monkeypatch.setattr(B, "SHIPPED", tmp_path / "nothing-shipped")
    monkeypatch.setitem(B.BASES, "embedded-base", {**B.BASES["embedded-base"], **SMALL})
    logs = []
    path = resolve_model("embedded-base", cfg, logs.append)
    assert path == str(B.base_folder("embedded-base", tmp_path / "cache"))
    assert (tmp_path / "cache" / "embedded-base-v2" / "base.json").is_file() and logs
