"""Checks that run before the expensive work, so that a mistake costs seconds, not a warm-up:
the output folder (writable, not a file, not in use by another run), the device, the model,
the reward functions, the data (enough rows for a step) and the evaluation sets; after the model
is loaded, the free disk space for one checkpoint. Each failure is a UserError saying what is
wrong, where, and what to do.
"""
from __future__ import annotations

import inspect
import json
import os
import socket
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import UserError, free_bytes, from_os_error, human_bytes

try:
    import fcntl
except ImportError:  # pragma: no cover - not Unix: runs go unlocked
    fcntl = None

LOCK_FILE = ".mr1fast.lock"


class RunLock:
    """An exclusive lock on an output folder while a run writes into it (flock on
    `<run_dir>/.mr1fast.lock`, which records the holder's pid, host, start time and command).
    A second run into the folder refuses, naming the holder. The kernel drops the lock when its
    process dies however it dies, so a lock left by a killed run is free and is taken over (the
    file's record says whose it was). Use as a context manager, or call release()."""

    def __init__(self, run_dir: Path, command: str, log: Callable[[str], None]):
        self.path = Path(run_dir) / LOCK_FILE
        self.fd = None
        if fcntl is None:
            return
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_record(fd)
            os.close(fd)
            raise UserError(
                f"output folder {run_dir} is in use by another mr1fast run "
                f"({_describe(holder)})",
                fix="wait for it to finish or stop it, or pass another --output-dir") from None
        previous = _read_record(fd)
        if previous and previous.get("pid") != os.getpid():
            log(f"taking over the lock of {run_dir} from a run that is no longer running "
                f"({_describe(previous)})")
        record = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S"), "command": command}
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(fd)
        self.fd = fd

    def release(self) -> None:
        """Clear the record (a clean end leaves nothing to take over) and unlock."""
        if self.fd is not None:
            os.ftruncate(self.fd, 0)
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_record(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except ValueError:
        return {}


def _describe(record: dict) -> str:
    if not record:
        return "no record of who holds it"
    return (f"pid {record.get('pid')} on {record.get('host')}, started {record.get('started')}: "
            f"{record.get('command')}")


def claim_output_dir(run_dir: Path, command: str, log: Callable[[str], None]) -> RunLock:
    """Create the output folder if needed, check that it can be written, and lock it."""
    run_dir = Path(run_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output folder {run_dir} is a file",
                        fix="remove it or pass another --output-dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as e:
        raise from_os_error(e, f"cannot write into the output folder {run_dir}") or e
    return RunLock(run_dir, command, log)


def check_device(name: str) -> torch.device:
    """The configured device (auto: cuda when there is one), checked to exist here."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"model.device={name!r}: no CUDA GPU is visible to this process",
                            fix="use model.device=cpu (or auto), or check CUDA_VISIBLE_DEVICES")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UserError(f"model.device={name!r}: only {count} CUDA device(s) are visible",
                            fix=f"use cuda:0 .. cuda:{count - 1}")
    elif device.type != "cpu":
        raise UserError(f"model.device={name!r}: mr1fast runs on cpu or cuda devices",
                        fix="use model.device=auto, cpu or cuda")
    return device


def _looks_like_a_path(name: str) -> bool:
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1 or \
        name.endswith("/") or os.sep != "/" and os.sep in name


def check_model(name: str, key: str = "model.name") -> None:
    """A local checkpoint folder (with config.json) or a hub id whose config can be fetched (or
    is cached); a clear error otherwise, before any weights are read."""
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{key}={name!r}: the folder has no config.json, so it is not a "
                            "Hugging Face checkpoint",
                            fix="point it at the folder holding config.json and the weights")
        return
    if path.exists():
        raise UserError(f"{key}={name!r} is a file, not a checkpoint folder",
                        fix="point it at the folder holding config.json and the weights")
    if _looks_like_a_path(name):
        raise UserError(f"{key}={name!r}: no such folder",
                        fix="check the path (a hub id looks like org/name; presets: tiny, "
                            "tiny-v152k, qwen2-vl-2b)")
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(name)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{key}={name!r}: no such local folder, and the hub id cannot be "
                        f"loaded ({first})",
                        fix="check the name, or download the model and give its folder "
                            "(presets: tiny, tiny-v152k, qwen2-vl-2b)") from None


def check_rewards(weights: dict, columns: list[str]) -> None:
    """Every reward imports and can be called as f(completions, solution=..., <column>=...)
    with the dataset's columns, before any training."""
    from .rewards import resolve_reward

    for name in weights:
        try:
            func = resolve_reward(name)
        except ValueError as e:
            raise UserError(f"grpo.rewards: {e}",
                            fix="use a built-in reward (accuracy, format, count_accuracy, "
                                "math_accuracy) or an importable 'package.module:function'") \
                from None
        try:
            signature = inspect.signature(func)
        except (TypeError, ValueError):
            continue  # a builtin or extension function: not introspectable, tried when called
        try:
            signature.bind([], **{c: [] for c in columns})
        except TypeError as e:
            raise UserError(f"grpo.rewards: {name!r} cannot be called as "
                            f"f(completions, {', '.join(f'{c}=...' for c in columns)}): {e}",
                            fix="a reward takes the completions and the dataset's columns as "
                                "keyword arguments; add **columns to take the ones it ignores") \
                from None


def checkpoint_bytes(model_path: str, dtype: torch.dtype, freeze_vision: bool) -> int:
    """A checkpoint's size by estimate, from the model's config alone (the model is built on the
    meta device: no memory, no weights read): the weights in `dtype`, and the optimizer's state
    (AdamW's two fp32 moments per trainable parameter, plus fp32 master copies when the
    weights are not fp32)."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.from_pretrained(model_path))
    total = sum(p.numel() for p in model.parameters())
    frozen = sum(p.numel() for p in model.model.visual.parameters()) if freeze_vision else 0
    per_trainable = 4 * (2 if dtype == torch.float32 else 3)
    return int(total * dtype.itemsize + (total - frozen) * per_trainable)


def check_disk(run_dir: Path, needed: int, what: str = "one checkpoint") -> None:
    """Free space on the output folder's file system for `needed` bytes (+10%)."""
    free = free_bytes(run_dir)
    if free < needed * 1.1:
        raise UserError(f"not enough free disk space in {run_dir} for {what}: it needs about "
                        f"{human_bytes(needed)}, {human_bytes(free)} are free",
                        fix="free some space or pass an --output-dir on another disk")


def rows_per_step(n_rows: int, per_step: int, key: str, per_step_key: str,
                  source: Optional[str] = None) -> None:
    if n_rows < per_step:
        raise UserError(f"{key}{'=' + repr(source) if source else ''}: {n_rows} usable rows, "
                        f"fewer than the {per_step} that one step takes ({per_step_key})",
                        fix=f"add data or lower {per_step_key}")
