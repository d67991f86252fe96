"""Configuration: every shipped recipe loads and validates; overrides and bad input."""
import re
from pathlib import Path

import pytest

from mr1fast.trainer.config import (Config, embedded_default, from_dict, kl_schedule, load_config,
                                    parse_override, to_dict)

ROOT = Path(__file__).parent.parent
# Trainer recipes; configs/reproduce/ holds `mr1fast reproduce` grids (tests/test_reproduce.py).
CONFIGS = sorted(p for p in (ROOT / "configs").rglob("*.yaml") if "reproduce" not in p.parts)


def test_there_is_a_recipe_per_model_task_and_method():
    names = {p.stem for p in CONFIGS}
    for model in ("2b", "7b"):
        for task in ("counting", "geometry"):
            for method in ("grpo-d", "grpo", "sft"):
                assert f"qwen2vl-{model}-{task}-{method}" in names
    assert {"format-weight", "constant-beta"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads_and_is_headed_by_its_launch_command(path):
    cfg = load_config(str(path))
    assert cfg.output_dir
    first = path.read_text().splitlines()[0]
    assert first.startswith("# ") and "mr1fast " in first
    assert f"--config {path.relative_to(ROOT).as_posix()}" in first
    if "-grpo-d" in path.stem or path.stem == "format-weight":
        assert cfg.grpo.beta_schedule["kind"] == "grpo_d"
    if path.stem.endswith("-grpo") or path.stem == "constant-beta":
        assert set(cfg.grpo.beta_schedule) == {"kind", "beta"}
        assert cfg.grpo.beta_schedule["kind"] == "constant"


def test_paper_settings_in_the_recipes():
    vc = load_config(f"{ROOT}/configs/qwen2vl-2b-counting-grpo-d.yaml")
    assert vc.grpo.beta_schedule == {"kind": "grpo_d", "beta_min": 0.04, "beta_max": 0.1,
                                     "explore_ratio": 0.3} and vc.data.limit == 100
    gr = load_config(f"{ROOT}/configs/qwen2vl-2b-geometry-grpo-d.yaml")
    assert (gr.grpo.beta_schedule["beta_min"], gr.grpo.beta_schedule["beta_max"]) == (0.0, 0.02)
    beta = (lambda name: load_config(f"{ROOT}/configs/{name}.yaml").grpo.beta_schedule["beta"])
    assert beta("qwen2vl-2b-counting-grpo") == 0.04
    assert beta("qwen2vl-7b-geometry-grpo") == 0.01
    sft = load_config(f"{ROOT}/configs/qwen2vl-7b-counting-sft.yaml")
    assert (sft.sft.lr, sft.sft.lr_schedule, sft.sft.warmup_ratio) == (2e-5, "cosine", 0.1)
    assert vc.grpo.num_generations == 8 and vc.grpo.lr == 1e-6


def test_the_tiny_recipe_is_the_embedded_default():
    written = to_dict(load_config(f"{ROOT}/configs/tiny-counting-grpo-d.yaml"))
    default = to_dict(embedded_default())
    written.pop("cache_dir"), default.pop("cache_dir")
    assert written == default


def test_overrides_parse_yaml_values_and_set_one_mapping_entry():
    cfg = load_config(None, ["grpo.lr=1e-5", "grpo.rewards.format=0.5", "model.freeze_vision=true",
                             "eval.tasks={a: synthetic:counting}", "grpo.epochs=3"])
    assert cfg.grpo.lr == 1e-5 and cfg.grpo.epochs == 3.0
    assert cfg.grpo.rewards == {"accuracy": 1.0, "format": 0.5}
    assert cfg.model.freeze_vision is True and cfg.eval.tasks == {"a": "synthetic:counting"}
    assert parse_override("seed=7") == {"seed": 7}


@pytest.mark.parametrize("override, message", [
    ("grpo.lrr=1e-5", "unknown key grpo.lrr"),
    ("nope=1", "unknown key nope"),
    ("grpo.lr=fast", "grpo.lr: expected float"),
    ("grpo.num_generations=2.5", "grpo.num_generations: expected int"),
    ("model.freeze_vision=3", "model.freeze_vision: expected bool"),
    ("grpo.loss_type=ppo", "grpo.loss_type: expected one of"),
    ("grpo.num_generations=1", "group of >= 2"),
    ("grpo.lr=-1", "expected >= 0"),
    ("grpo.rewards.format=high", "grpo.rewards.format: expected a finite number"),
    ("grpo=3", "section grpo must be a mapping"),
    ("grpo.lr", "expected key=value"),
    ("grpo.eps_low=1.0", "grpo.eps_low: expected a value in [0.0, 1.0)"),
    ("grpo.top_p=0", "grpo.top_p: expected a value in (0.0, 1.0]"),
    ("grpo.beta_schedule.explore_ratio=1.5", "grpo.beta_schedule: explore_ratio"),
    ("grpo.beta_schedule.beta_min=-0.1", "grpo.beta_schedule: beta_min"),
    ("grpo.beta_schedule.beta_min=low", "grpo.beta_schedule.beta_min: expected a number"),
    ("grpo.beta_schedule.kind=constant", "constant schedule: takes beta"),
    ("grpo.beta_schedule={kind: exp}", "grpo.beta_schedule.kind: expected one of"),
    ("grpo.beta_schedule={kind: constant, beta_max: 0.1}", "unknown beta_max"),
    ("grpo.beta_schedule={kind: linear, beta_start: 0.1}", "missing beta_end"),
    ("grpo.top_k=-1", "grpo.top_k: expected >= 0"),
    ("model.dtype=fp16", "model.dtype: expected one of"),
    ("sampler=sglang", "sampler: expected one of"),
    ("vllm.importance_sampling=seq", "vllm.importance_sampling: expected one of"),
    ("vllm.is_cap=0", "vllm.is_cap: expected > 0"),
    ("vllm.sync_every=0", "vllm.sync_every: expected > 0"),
    ("vllm.gpu_memory_utilization=1.5", "vllm.gpu_memory_utilization"),
    ("vllm.sleep_level=3", "vllm.sleep_level: expected one of"),
    ("model.packing=dense", "model.packing: expected one of"),
    ("model.attention=xformers", "model.attention: expected one of"),
    ("model.attention=varlen", "varlen (flash-attn) runs plain packing only"),
    ("grpo.max_tokens_per_micro_batch=-1", "grpo.max_tokens_per_micro_batch: expected >= 0"),
    ("sft.max_tokens_per_micro_batch=1.5", "sft.max_tokens_per_micro_batch: expected int"),
])
def test_bad_overrides_are_rejected_with_the_key(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        load_config(None, [override])


def test_a_yaml_file_with_an_unknown_key_names_the_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("grpo:\n  betaa: 0.1\n")
    with pytest.raises(ValueError, match="bad.yaml: unknown key grpo.betaa"):
        load_config(str(p))
    with pytest.raises(ValueError, match="no such file"):
        load_config(str(tmp_path / "missing.yaml"))


def test_defaults_are_the_paper_and_r1v_settings():
    cfg = Config()
    assert cfg.grpo.num_generations == 8 and cfg.grpo.lr == 1e-6
    assert cfg.grpo.eps_low == 0.2 and cfg.grpo.max_completion_length == 512
    assert cfg.grpo.rewards == {"accuracy": 1.0, "format": 1.0}
    assert from_dict({}).grpo.beta_schedule["explore_ratio"] == 0.3


def test_packed_attention_backends_need_a_packed_layout():
    assert load_config(None, ["model.packing=packed", "model.attention=varlen"]).model.attention \
        == "varlen"
    for backend in ("flex", "varlen"):
        with pytest.raises(ValueError, match="runs the packed layouts only"):
            load_config(None, ["model.packing=padded", f"model.attention={backend}"])


def test_a_level_2_sleep_needs_a_sync_every_step():
    assert load_config(None, ["vllm.sleep_level=2"]).vllm.sync_every == 1
    with pytest.raises(ValueError, match="vllm.sync_every"):
        load_config(None, ["vllm.sleep_level=2", "vllm.sync_every=4"])
    cfg = load_config(None, ["sampler=vllm", "vllm.importance_sampling=sequence"])
    assert cfg.sampler == "vllm" and cfg.vllm.importance_sampling == "sequence"


def test_beta_schedule_keys_are_the_schedules_own_parameters():
    cfg = load_config(None, ["grpo.beta_schedule={kind: constant, beta: 0.04}"])
    assert cfg.grpo.beta_schedule == {"kind": "constant", "beta": 0.04}
    cfg = load_config(None, ["grpo.beta_schedule.beta_max=0.2"])  # one entry of the mapping
    assert cfg.grpo.beta_schedule == {"kind": "grpo_d", "beta_min": 0.04, "beta_max": 0.2,
                                      "explore_ratio": 0.3}
    cfg = load_config(None, ["grpo.beta_schedule={kind: cosine, beta_start: 1e-2, beta_end: 0}"])
    assert cfg.grpo.beta_schedule["beta_start"] == 0.01  # YAML 1.1's string "1e-2" read as a float
    cfg = load_config(None, ["grpo.beta_schedule={kind: grpo_d, preset: geometry}"])
    assert kl_schedule(cfg.grpo.beta_schedule, 10)(0) == pytest.approx(0.01)


def test_loss_options_are_validated_by_the_loss_library():
    from mr1fast.trainer.config import loss_options
    from mr1fast.trainer.errors import UsageError
    cfg = from_dict({"grpo": {"loss_type": "sapo", "loss": {"importance_sampling_level":
                                                             "sequence", "delta": "1.5"}}},
                    base=embedded_default())
    o = loss_options(cfg.grpo)
    assert (o.loss_type, o.importance_sampling_level, o.delta) == ("sapo", "sequence", 1.5)
    for bad, match in (({"loss": {"dleta": 1.5}}, "grpo.loss.dleta: unknown loss option"),
                       ({"loss": {"delta": 0.5}}, "grpo.loss.delta: expected a value > 1"),
                       ({"loss": {"eps_low": 0.1}}, "set it as grpo.eps_low"),
                       ({"loss_type": "ppo"}, "grpo.loss_type")):
        with pytest.raises(UsageError, match=match):
            from_dict({"grpo": bad}, base=embedded_default())
