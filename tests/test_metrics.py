import io
import math
import sys
import types

import numpy as np
import pytest
import torch
from PIL import Image

from mr1fast.trainer.metrics import MetricsLogger, Progress, plot_metrics, read_metrics

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _log_steps(run_dir, steps, **kwargs):
    with MetricsLogger(run_dir, **kwargs) as logger:
        for s in steps:
            logger.log(s, {"reward_mean": 0.1 * s, "kl": 0.01 * s})
    return run_dir / "metrics.jsonl"


def test_log_read_round_trip_converts_tensors_numpy_and_non_finite(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        logger.log(0, {"reward_mean": torch.tensor(0.5), "beta": np.float32(0.25),
                       "n_tokens": 128, "n_seqs": np.int64(8), "kl": float("nan"),
                       "loss": torch.tensor(float("inf")), "grad_norm": np.float64(1.5)})
        logger.log(1, {"reward_mean": 0.75})
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert rows == [{"step": 0, "reward_mean": 0.5, "beta": 0.25, "n_tokens": 128, "n_seqs": 8,
                     "kl": None, "loss": None, "grad_norm": 1.5},
                    {"step": 1, "reward_mean": 0.75}]
    assert type(rows[0]["reward_mean"]) is float and type(rows[0]["n_seqs"]) is int
    text = (tmp_path / "metrics.jsonl").read_text()
    assert "NaN" not in text and "Infinity" not in text and text.count("\n") == 2


def test_log_rejects_reserved_step_and_non_numbers(tmp_path):
    with MetricsLogger(tmp_path) as logger:
        with pytest.raises(ValueError, match="reserved"):
            logger.log(0, {"step": 3})
        with pytest.raises(TypeError, match="'name'"):
            logger.log(0, {"name": "abc"})
        with pytest.raises(TypeError, match="'vec'"):
            logger.log(0, {"vec": torch.ones(3)})
    assert read_metrics(tmp_path / "metrics.jsonl") == []


def test_lines_are_on_disk_before_close(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(0, {"loss": 1.0})
    logger.log(1, {"loss": 0.5})
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 0, "loss": 1.0},
                                                        {"step": 1, "loss": 0.5}]
    logger.close()
    logger.close()


def test_truncated_last_line_is_skipped_but_corruption_elsewhere_raises(tmp_path):
    path = _log_steps(tmp_path, range(3))
    with open(path, "a") as f:
        f.write('{"step": 3, "reward_m')  # killed mid-write
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == [0, 1, 2]
    path.write_text('{"step": 0}\n{"ste\n{"step": 2}\n')
    with pytest.raises(ValueError, match=":2:"):
        read_metrics(path)


def test_new_run_truncates_existing_file(tmp_path):
    _log_steps(tmp_path, range(5))
    path = _log_steps(tmp_path, [0])
    assert [r["step"] for r in read_metrics(path)] == [0]


def test_resume_truncate_after_keeps_only_earlier_steps(tmp_path):
    path = _log_steps(tmp_path, range(6))
    with open(path, "a") as f:
        f.write('{"step": 6, "kl"')  # the crash that ended the first run
    with MetricsLogger(tmp_path, resume=True) as logger:
        assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3, 4, 5]
        logger.truncate_after(4)  # the checkpoint was taken after step 3
        assert [r["step"] for r in read_metrics(path)] == [0, 1, 2, 3]
        for s in range(4, 7):
            logger.log(s, {"reward_mean": 1.0})
    rows = read_metrics(path)
    assert [r["step"] for r in rows] == list(range(7))
    assert rows[3] == {"step": 3, "reward_mean": pytest.approx(0.3), "kl": pytest.approx(0.03)}
    assert rows[4] == {"step": 4, "reward_mean": 1.0}
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_resume_without_existing_file_starts_one(tmp_path):
    path = _log_steps(tmp_path / "new", range(2), resume=True)
    assert [r["step"] for r in read_metrics(path)] == [0, 1]


def _check_png(path, min_size):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    with Image.open(path) as im:
        im.load()
        assert im.width >= min_size[0] and im.height >= min_size[1]
        return im.size


def test_plot_skips_missing_and_all_null_keys(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path) as logger:
        for s in range(20):
            logger.log(s, {"reward_mean": math.sin(s), "beta": 0.04 + 0.001 * s,
                           "kl": float("nan") if s % 3 else 0.01 * s, "entropy": float("nan")})
    out = plot_metrics(path, tmp_path / "plots" / "curves.png")
    assert out == tmp_path / "plots" / "curves.png"
    # three panels (reward_mean, beta, kl) side by side at 100 dpi: 1200 x 260
    assert _check_png(out, (300, 150)) == (1200, 260)
    one = plot_metrics(path, tmp_path / "one.png", keys=("beta", "not_logged", "entropy"))
    assert _check_png(one, (300, 150)) == (400, 260)
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_plot_more_keys_than_columns_wraps(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path) as logger:
        for s in range(5):
            logger.log(s, {k: float(s) for k in ("reward_mean", "acc_reward", "format_reward",
                                                 "beta", "kl")})
    assert _check_png(plot_metrics(path, tmp_path / "c.png"), (300, 150)) == (1200, 520)


def test_plot_empty_data_writes_a_no_data_figure(tmp_path):
    path = tmp_path / "metrics.jsonl"
    MetricsLogger(tmp_path).close()
    assert path.read_text() == ""
    out = plot_metrics(path, tmp_path / "empty.png")
    assert _check_png(out, (300, 150)) == (400, 260)
    with Image.open(out) as im:
        # the "no data" text, not a blank canvas
        assert len(np.unique(np.asarray(im.convert("L")))) > 1


def test_missing_tensorboard_or_wandb_names_the_pip_extra(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(RuntimeError, match=r"pip install mr1fast\[tensorboard\]"):
        MetricsLogger(tmp_path, tensorboard=True)
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(RuntimeError, match=r"pip install mr1fast\[wandb\]"):
        MetricsLogger(tmp_path, wandb=True)


class _Recorder:
    """Stands in for SummaryWriter and a wandb run, recording the calls made on it."""

    def __init__(self, **kwargs):
        self.init_kwargs, self.calls, self.closed = kwargs, [], False

    def add_scalar(self, name, value, step):
        self.calls.append((name, value, step))

    def log(self, metrics, step):
        self.calls.append((metrics, step))

    def close(self):
        self.closed = True

    finish = close


def test_tensorboard_and_wandb_receive_the_finite_values(tmp_path, monkeypatch):
    made = []

    def record(**kwargs):
        made.append(_Recorder(**kwargs))
        return made[-1]

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard",
                        types.SimpleNamespace(SummaryWriter=record))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=record))
    with MetricsLogger(tmp_path, tensorboard=True, wandb=True, wandb_project="p",
                       config={"lr": 1e-6}) as logger:
        logger.log(7, {"loss": torch.tensor(2.0), "kl": float("nan")})
    tb, run = made
    assert tb.init_kwargs == {"log_dir": str(tmp_path / "tensorboard")}
    assert tb.calls == [("loss", 2.0, 7)] and tb.closed
    assert run.init_kwargs == {"project": "p", "dir": str(tmp_path), "config": {"lr": 1e-6}}
    assert run.calls == [({"loss": 2.0}, 7)] and run.closed
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 7, "loss": 2.0, "kl": None}]


def test_progress_disabled_tracks_steps():
    with Progress(total=10, initial=3, disable=True) as bar:
        bar.update({"reward_mean": 0.5})
        bar.update({})
        assert bar.n == 5


def test_progress_shows_reward_beta_kl():
    out = io.StringIO()
    with Progress(total=4, desc="grpo", disable=False, file=out) as bar:
        bar.update({"reward_mean": 0.5, "kl": float("nan")})
        bar.update({"reward_mean": torch.tensor(0.123456), "beta": 0.04, "kl": 0.000123456,
                    "loss": 9.0})
        assert bar.n == 2
    last = out.getvalue().rsplit("\r", 1)[-1]  # tqdm redraws the line: the final state
    assert last.startswith("grpo") and "2/4" in last and "step/s" in last
    assert "reward=0.1235 beta=0.04 kl=0.0001235" in last and "loss" not in last
