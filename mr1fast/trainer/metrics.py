"""Run logging for the trainer: metrics.jsonl, a PNG of the curves, optional TensorBoard / W&B.

A run directory holds `metrics.jsonl`, one JSON object `{"step": int, "<name>": float | null, ...}`
per optimizer step. Every line is flushed and fsync'd as it is written, so a killed run keeps every
finished step; a line torn by a crash mid-write is skipped when the file is read back. JSON has no
NaN, so non-finite values are written as null.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import sys
from pathlib import Path
from typing import IO, Any, Callable, TextIO

from tqdm import tqdm

METRICS_FILE = "metrics.jsonl"
PLOT_KEYS = ("reward_mean", "acc_reward", "format_reward", "beta", "kl", "loss", "clip_frac",
             "entropy", "tokens_per_s")


def _json_value(name: str, value: Any) -> int | float | None:
    """A metric as a JSON-safe number: ints stay ints, anything float()-able (0-d tensors, numpy
    scalars, bools) becomes a float, and NaN / inf / None become None (JSON null)."""
    if value is None:
        return None
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    try:
        value = float(value)
    except (TypeError, ValueError) as e:
        raise TypeError(f"metric {name!r}: expected a number or a 0-d tensor, got {value!r}") from e
    return value if math.isfinite(value) else None


def atomic_write(path: Path, write: Callable[[IO], None], mode: str = "w") -> None:
    """Write `path` through `write(file)` into a temporary file beside it, then os.replace it over
    `path`, so a reader never sees a half-written file. (Not tempfile.mkstemp: its files are 0600,
    this one gets the usual umask permissions.)"""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def read_metrics(path: str | Path) -> list[dict]:
    """The rows of a metrics.jsonl file, in file order.

    A last line that does not parse (the run was killed mid-write) is skipped; a bad line anywhere
    else means the file is corrupt and raises ValueError.
    """
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    rows = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path}:{i + 1}: not a JSON line ({e})") from e
    return rows


class MetricsLogger:
    """Appends one JSON line per step to `run_dir/metrics.jsonl`, mirrored to TensorBoard
    (`run_dir/tensorboard`) and W&B when asked.

    resume=False starts a new metrics.jsonl; resume=True keeps the existing lines (dropping a torn
    last one) and appends; call `truncate_after(start_step)` so the steps about to be redone are not
    logged twice. Usable as a context manager.
    """

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = False, wandb: bool = False,
                 wandb_project: str = "mr1fast", config: dict | None = None,
                 resume: bool = False):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        self._file = None
        if resume and self.path.exists():
            self._rewrite(lambda row: True)
        else:
            self._file = open(self.path, "w", encoding="utf-8")
        self._tb_writer = self._open_tensorboard() if tensorboard else None
        self._wandb_run = self._open_wandb(wandb_project, config) if wandb else None

    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise RuntimeError("tensorboard=True needs the tensorboard package: "
                               "pip install mr1fast[tensorboard]") from e
        return SummaryWriter(log_dir=str(self.run_dir / "tensorboard"))

    def _open_wandb(self, project: str, config: dict | None):
        try:
            import wandb
        except ImportError as e:
            raise RuntimeError("wandb=True needs the wandb package: "
                               "pip install mr1fast[wandb]") from e
        return wandb.init(project=project, dir=str(self.run_dir), config=config)

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        """Append `{"step": step, **metrics}` to metrics.jsonl (flushed and fsync'd) and send the
        finite values to TensorBoard / W&B."""
        if "step" in metrics:
            raise ValueError("metrics: 'step' is reserved for the step argument")
        values = {name: _json_value(name, v) for name, v in metrics.items()}
        self._file.write(json.dumps({"step": int(step), **values}, allow_nan=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        finite = {name: v for name, v in values.items() if v is not None}
        if self._tb_writer is not None:
            for name, v in finite.items():
                self._tb_writer.add_scalar(name, v, int(step))
        if self._wandb_run is not None:
            self._wandb_run.log(finite, step=int(step))

    def truncate_after(self, step: int) -> None:
        """Keep only the lines with "step" < `step` (rewriting the file atomically): call on resume
        with the first step the resumed run will log."""
        self._rewrite(lambda row: isinstance(row.get("step"), int) and row["step"] < step)

    def _rewrite(self, keep: Callable[[dict], bool]) -> None:
        if self._file is not None:
            self._file.close()
        rows = [row for row in read_metrics(self.path) if keep(row)]
        atomic_write(self.path, lambda f: f.writelines(json.dumps(row) + "\n" for row in rows))
        self._file = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        """Close metrics.jsonl and the TensorBoard / W&B runs; safe to call twice."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb_writer is not None:
            self._tb_writer.close()
            self._tb_writer = None
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def plot_metrics(jsonl_path: str | Path, png_path: str | Path,
                 keys: tuple[str, ...] = PLOT_KEYS) -> Path:
    """Plot each of `keys` present in a metrics.jsonl against the step, one small panel per key
    (keys absent or all-null are skipped), into `png_path` (written atomically). Returns png_path.

    Uses matplotlib's object API with the Agg canvas: no pyplot global state, no display needed.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    rows = read_metrics(jsonl_path)
    curves = {}
    for key in keys:
        points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
        if points:
            curves[key] = points
    ncols = min(3, max(1, len(curves)))
    nrows = max(1, math.ceil(len(curves) / ncols))
    fig = Figure(figsize=(4 * ncols, 2.6 * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    if not curves:
        fig.text(0.5, 0.5, "no data", ha="center", va="center", fontsize=14)
    for i, (key, points) in enumerate(curves.items()):
        ax = fig.add_subplot(nrows, ncols, i + 1)
        steps, values = zip(*points)
        ax.plot(steps, values, marker="." if len(points) < 50 else None, linewidth=1)
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
    if curves:
        fig.supxlabel("step")
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(png_path, lambda f: fig.savefig(f, format="png", dpi=100), mode="wb")
    return png_path


class Progress:
    """A tqdm bar over optimizer steps (on stderr) whose postfix shows the latest reward, beta
    and kl. disable=None follows tqdm: the bar is hidden when the output is not a terminal."""

    POSTFIX_KEYS = {"reward_mean": "reward", "beta": "beta", "kl": "kl"}

    def __init__(self, total: int, initial: int = 0, desc: str = "train",
                 disable: bool | None = None, file: TextIO | None = None):
        self.n = initial  # tracked here: a disabled tqdm does not count
        self._bar = tqdm(total=total, initial=initial, desc=desc, disable=disable, unit="step",
                         file=sys.stderr if file is None else file, dynamic_ncols=True)

    def update(self, metrics: dict[str, Any]) -> None:
        """Advance one step and show the present keys of POSTFIX_KEYS with 4 significant digits."""
        shown = []
        for key, label in self.POSTFIX_KEYS.items():
            value = _json_value(key, metrics.get(key))
            if value is not None:
                shown.append(f"{label}={value:.4g}")
        self._bar.set_postfix_str(" ".join(shown), refresh=False)
        self._bar.update(1)
        self.n += 1

    def close(self) -> None:
        self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def device_peak_mb(device) -> float | None:
    """Peak allocated memory on a CUDA device since the last reset (MiB); None elsewhere."""
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return None
