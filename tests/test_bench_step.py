"""bench/step.py, the end-to-end step benchmark with TRL side by side: both trainers run a real
(tiny) step in a child process and report consistent phases and memory; the fixed length is
enforced; the ratio table states the targets. Also the benchmark model presets."""
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import step  # noqa: E402

from mr1fast.trainer.model import SPECIAL_TOKENS, preset_config  # noqa: E402

HAVE_TRL = importlib.util.find_spec("trl") is not None


def params_of(preset: str) -> int:
    from transformers import Qwen2VLForConditionalGeneration

    config = preset_config(preset, {t: i for i, t in enumerate(SPECIAL_TOKENS)}, 1024)
    with torch.device("meta"):
        return sum(p.numel() for p in Qwen2VLForConditionalGeneration(config).parameters())


def test_benchmark_presets_have_the_intended_sizes():
    assert params_of("tiny") < 1_000_000
    # tiny-v152k: the tiny model with Qwen's 151936-row (tied) embedding / LM head.
    assert params_of("tiny-v152k") - params_of("tiny") == (151936 - 1024) * 64
    # qwen2-vl-2b: exactly Qwen2-VL-2B-Instruct's parameter count.
    assert params_of("qwen2-vl-2b") == 2_208_985_600


@pytest.mark.parametrize("trainer", ["mr1fast", pytest.param(
    "trl", marks=pytest.mark.skipif(not HAVE_TRL, reason="trl not installed"))])
def test_one_measured_step_has_consistent_phases_and_memory(trainer, tiny_model_dir, tmp_path):
    args = step.parse(["--prompts", "2", "--G", "2", "--tokens", "4", "--steps", "2",
                       "--warmup", "1", "--rows", "8", "--device", "cpu"])
    r = step.measure(trainer, str(tiny_model_dir), args, tmp_path)
    phases = [r[k] for k in ("rollout_s", "reward_s", "ref_s", "update_s")]
    assert all(p >= 0 for p in phases), r
    # Medians per phase need not add up exactly; the phases cover most of the step.
    assert 0.5 * r["step_s"] <= sum(phases) <= 1.5 * r["step_s"], r
    assert r["tokens_per_s"] == pytest.approx(2 * 2 * 4 / r["step_s"])
    assert r["peak_memory"] > 100 and 0 <= r["step_memory"] <= r["peak_memory"], r


def test_completions_must_have_the_fixed_length():
    args = step.parse(["--tokens", "8", "--steps", "1", "--device", "cpu"])
    recorder = step.StepRecorder(args, step.Memory("cpu"))
    with pytest.raises(RuntimeError, match="expected the fixed 8"):
        recorder.step_done(1, {}, 7.5)
    with pytest.raises(RuntimeError, match="only 0 of 1 steps"):
        recorder.result()


def test_table_prints_ratios_and_the_targets_verdict():
    def row(tok_s, peak):
        return {"tokens_per_s": tok_s, "step_s": 1.0, "rollout_s": 0.5, "reward_s": 0.1,
                "ref_s": 0.1, "update_s": 0.3, "peak_memory": peak, "step_memory": peak / 2}

    rows = {("mr1fast", "tiny-v152k"): row(300.0, 1000.0), ("trl", "tiny-v152k"): row(100.0, 4000.0)}
    text = "\n".join(step.table(rows, ["tiny-v152k"], ["mr1fast", "trl"]))
    assert "| tiny-v152k | mr1fast / TRL | 3.00x | 1.00x |" in text
    assert "tokens_per_s x3.00 (target >= 2.0): met" in text
    assert "peak_memory x0.25 (target <= 0.5): met" in text
    rows[("trl", "tiny-v152k")] = row(200.0, 1500.0)
    text = "\n".join(step.table(rows, ["tiny-v152k"], ["mr1fast", "trl"]))
    assert "tokens_per_s x1.50 (target >= 2.0): NOT met" in text
    assert "peak_memory x0.67 (target <= 0.5): NOT met" in text


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        step.parse(["--steps", "0"])
    with pytest.raises(SystemExit):
        step.parse(["--warmup", "0"])
    with pytest.raises(SystemExit, match="unknown"):
        step.main(["--trainers", "mr1fast,deepspeed", "--models", "tiny"])
