"""bench/layouts.py (the reference + update passes per layout, interleaved) and
bench/packing.py (the native data path against Python and get_rope_index) on tiny inputs: the
layouts give the padded log-probs, the shared prefix computes fewer positions, the tables
state the targets."""
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))
import layouts  # noqa: E402
import packing  # noqa: E402

from mr1fast.trainer import packing as pk  # noqa: E402


def test_layouts_measure_equal_log_probs_and_fewer_positions(tiny_model_dir):
    args = layouts.parse(["--prompts", "2", "--G", "3", "--tokens", "2:6", "--image-size",
                          "56", "--repeat", "2", "--device", "cpu"])
    r = layouts.measure(str(tiny_model_dir), args)
    for mode in ("packed", "shared_prefix"):
        assert r[f"{mode}/max_abs_diff"] <= 1e-5
    assert 0 < r["shared_prefix/positions"] < r["padded/positions"]
    assert all(r[f"{m}/{k}"] > 0 for m in layouts.LAYOUTS for k in ("ref_s", "update_s"))
    text = "\n".join(layouts.table("tiny", r))
    assert "| tiny | shared_prefix |" in text and "the shared prefix runs ref + update x" in text


@pytest.mark.skipif(pk.native() is None, reason="the native extension is not built")
def test_the_packing_benchmark_times_every_op():
    args = packing.parse(["--prompts", "2", "--G", "2", "--repeat", "1"])
    times = packing.measure(args)
    assert set(times) == {"rope/native", "rope/python", "rope/get_rope_index",
                          "pack/shared_prefix/native", "pack/shared_prefix/python",
                          "pack/packed/native", "pack/packed/python"}
    assert all(t > 0 for t in times.values())
    lines = packing.table(times)
    assert len(lines) == 6 and all("target" in lines[0] or "x | >= 10x" in line
                                   for line in lines[2:])
