"""bench/step.py, the end-to-end step benchmark with TRL side by side: the trainers run a real
(tiny) step in a child process and report consistent phases and memory; completion lengths are
enforced (fixed, or drawn from a range); the shared prefix computes fewer positions than the
padded layout; the ratio table states the targets. Also the benchmark model presets."""
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
    # small: decoder-bound like the real models (layers / LM head per position).
    def layers_over_head(preset):
        from transformers import Qwen2VLForConditionalGeneration

        config = preset_config(preset, {t: i for i, t in enumerate(SPECIAL_TOKENS)}, 1024)
        with torch.device("meta"):
            m = Qwen2VLForConditionalGeneration(config)
        layers = sum(p.numel() for p in m.model.language_model.layers.parameters())
        return layers / m.lm_head.weight.numel()

    assert layers_over_head("tiny-v152k") < 0.01
    assert 5 < layers_over_head("small") < 10 and 5 < layers_over_head("qwen2-vl-2b") < 6
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


def test_layouts_report_positions_on_drawn_completion_lengths(tiny_model_dir, tmp_path):
    """--tokens 2:6 and 56 px images: each completion cut at its drawn length; one forward
    pass of the shared prefix computes fewer positions than the padded layout's."""
    args = step.parse(["--prompts", "2", "--G", "3", "--tokens", "2:6", "--steps", "1",
                       "--warmup", "1", "--rows", "8", "--device", "cpu", "--image-size", "56"])
    shared = step.measure("mr1fast", str(tiny_model_dir), args, tmp_path)
    padded = step.measure("mr1fast-padded", str(tiny_model_dir), args, tmp_path)
    assert 0 < shared["positions"] < padded["positions"], (shared, padded)
    assert 0 <= shared["pack_share"] < 0.5 and padded["pack_share"] == 0.0
    for r in (shared, padded):  # tokens per step: 6 completions of 2..6 tokens
        assert 6 * 2 <= r["tokens_per_s"] * r["step_s"] <= 6 * 6, r


def test_completion_lengths_are_enforced():
    args = step.parse(["--tokens", "8", "--steps", "1", "--device", "cpu"])
    recorder = step.StepRecorder(args, step.Memory("cpu"))
    with pytest.raises(RuntimeError, match=r"expected one in \[8, 8\]"):
        recorder.step_done(1, {}, 7.5, 100)
    with pytest.raises(RuntimeError, match="only 0 of 1 steps"):
        recorder.result()
    args = step.parse(["--tokens", "4:8", "--steps", "1", "--device", "cpu"])
    assert (args.min_tokens, args.tokens) == (4, 8)
    draws = step.Lengths(args)
    first = draws.next(50)
    assert all(4 <= n <= 8 for n in first) and len(set(first)) > 1
    assert step.Lengths(args).next(50) == first  # every trainer gets the same draws


def test_table_prints_ratios_and_the_targets_verdict():
    def row(tok_s, peak, ref=0.1, update=0.3):
        return {"tokens_per_s": tok_s, "step_s": 1.0, "rollout_s": 0.5, "reward_s": 0.1,
                "ref_s": ref, "update_s": update, "positions": 1000, "pack_share": 0.01,
                "peak_memory": peak, "step_memory": peak / 2}

    rows = {("mr1fast", "tiny-v152k"): row(300.0, 1000.0), ("trl", "tiny-v152k"): row(100.0, 4000.0)}
    text = "\n".join(step.table(rows, ["tiny-v152k"], ["mr1fast", "trl"]))
    assert "| tiny-v152k | mr1fast / TRL | 3.00x | 1.00x |" in text
    assert "tokens_per_s x3.00 (target >= 2.0): met" in text
    assert "peak_memory x0.25 (target <= 0.5): met" in text
    rows[("trl", "tiny-v152k")] = row(200.0, 1500.0)
    text = "\n".join(step.table(rows, ["tiny-v152k"], ["mr1fast", "trl"]))
    assert "tokens_per_s x1.50 (target >= 2.0): NOT met" in text
    assert "peak_memory x0.67 (target <= 0.5): NOT met" in text
    # The shared prefix against the padded layout: ref + update 0.4 s against 1.0 s.
    rows[("mr1fast-padded", "tiny-v152k")] = row(100.0, 1000.0, ref=0.4, update=0.6)
    text = "\n".join(step.table(rows, ["tiny-v152k"], ["mr1fast", "mr1fast-padded"]))
    assert "| tiny-v152k | mr1fast / mr1fast-padded | 3.00x |" in text
    assert "the shared prefix runs ref + update x2.50 faster than padded (target >= 2): met" \
        in text


def test_bad_arguments_are_named():
    with pytest.raises(SystemExit):
        step.parse(["--steps", "0"])
    with pytest.raises(SystemExit):
        step.parse(["--warmup", "0"])
    with pytest.raises(SystemExit):
        step.parse(["--tokens", "9:4"])
    with pytest.raises(SystemExit):
        step.parse(["--tokens", "many"])
    with pytest.raises(SystemExit, match="unknown"):
        step.main(["--trainers", "mr1fast,deepspeed", "--models", "tiny"])
    with pytest.raises(SystemExit, match="unknown"):
        step.main(["--trainers", "mr1fast-dense@2", "--models", "tiny"])
