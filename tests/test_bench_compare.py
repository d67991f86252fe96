"""bench/compare.py: ratios against naive from the same run, a baseline's noise-derived
thresholds, and a regression that fails the check."""
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import compare  # noqa: E402


def run(tmp_path, name, torch_ms, naive_ms, liger_ms=50.0):
    shape = {"N": 8, "d": 4, "V": 16}
    recs = [{"op": "grpo_loss", "impl": impl, "mode": "fwd_bwd", "shape": shape, "metric": m,
             "value": v, "device": "cpu-test", "commit": "abc"}
            for impl, v in (("torch", torch_ms), ("naive", naive_ms), ("liger", liger_ms))
            for m in ("time",)]
    recs.append(dict(recs[0], metric="extra_peak_memory", value=1.0))
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(recs))
    return str(path)


def test_ratios_are_against_naive_of_the_same_run(tmp_path):
    recs = json.loads(Path(run(tmp_path, "a", 30.0, 60.0)).read_text())
    assert compare.ratios(recs) == {"grpo_loss|torch|fwd_bwd|N=8,V=16,d=4": 0.5,
                                    "grpo_loss|liger|fwd_bwd|N=8,V=16,d=4": 50.0 / 60.0}


def test_baseline_thresholds_come_from_the_noise_and_catch_a_regression(tmp_path, capsys):
    # torch/naive over three runs: 0.5, 0.55, 0.45 -> median 0.5, noise 10%, threshold 30%.
    runs = [run(tmp_path, f"r{i}", t, 100.0) for i, t in enumerate((50.0, 55.0, 45.0))]
    base = compare.make_baseline(runs)
    entry = base["ratios"]["grpo_loss|torch|fwd_bwd|N=8,V=16,d=4"]
    assert entry["ratio"] == 0.5 and abs(entry["noise"] - 0.1) < 1e-9
    assert abs(entry["threshold"] - 0.3) < 1e-9
    liger = base["ratios"]["grpo_loss|liger|fwd_bwd|N=8,V=16,d=4"]
    assert liger["threshold"] == compare.MIN_THRESHOLD  # no noise: the floor applies
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps(base))

    # A slower machine (everything 2x) is not a regression: the ratios hold.
    assert compare.compare(run(tmp_path, "slow", 100.0, 200.0, 100.0), str(path)) == 0
    # torch 60% slower relative to naive: past its 30% threshold.
    assert compare.compare(run(tmp_path, "bad", 80.0, 100.0), str(path)) == 1
    assert "REGRESSED grpo_loss|torch" in capsys.readouterr().out
    assert compare.compare(run(tmp_path, "x", 1.0, 2.0), str(tmp_path / "none.json")) == 2
