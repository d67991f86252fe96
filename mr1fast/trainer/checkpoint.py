"""Atomic, resumable checkpoints in safe formats.

run_dir/checkpoints/step-000040/
    model.safetensors, config.json, tokenizer + image processor files  (a Hugging Face
        checkpoint: `model.name=run_dir/checkpoints/step-000040` loads it)
    trainer_state.pt   optimizer state, RNG states, step and data position; tensors and plain
                       Python values only, so torch.load(weights_only=True) reads it
    manifest.json      every other file's size and SHA-256, written last
A checkpoint is written to a temporary folder and renamed into place, so a run killed while
saving leaves the previous checkpoint intact. Resuming verifies the manifest and takes the newest
intact checkpoint (a damaged one, e.g. truncated by a full disk or a crash outside mr1fast, is
reported and skipped). A full disk while saving keeps the previous checkpoint and says so. The
LR and beta schedules are functions of the step, so the step restores them.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from .errors import UserError, free_bytes, human_bytes

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(run_dir: Path, step: int, model, encoder, optimizer, state: dict,
                    keep: int = 2, name: Optional[str] = None) -> Path:
    """Write checkpoints/step-{step:06d} (or checkpoints/{name}) atomically; keep the newest
    `keep` step checkpoints."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-*"):  # left by a run killed while saving
        shutil.rmtree(stale, ignore_errors=True)
    final = root / (name or f"step-{step:06d}")
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        encoder.save(tmp)
        torch.save({"optimizer": optimizer.state_dict() if optimizer is not None else None,
                    "rng": rng_state(), **state}, tmp / STATE_FILE)
        _fsync_tree(tmp)
        _write_manifest(tmp)
        if final.exists():  # never a moment without a complete checkpoint under this name
            aside = root / f".tmp-old-{final.name}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
    except Exception as e:
        if not _disk_full(e, root):
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        previous = latest_checkpoint(run_dir)
        kept = f"the previous checkpoint {previous.name} is intact" if previous else \
            "no earlier checkpoint exists"
        raise UserError(f"no space left on device while writing checkpoint {final.name} in "
                        f"{root} ({human_bytes(free_bytes(root))} free after cleaning up); {kept}",
                        fix="free some space and rerun the same command: it resumes from the "
                            "newest intact checkpoint") from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _disk_full(e: Exception, folder: Path) -> bool:
    """Whether a failed write means the disk (or quota) is full. The writers do not agree on
    how they say it: an OSError with ENOSPC / EDQUOT from Python's own files, safetensors'
    "No space left on device (os error 28)", and torch.save's zip writer's bare "unexpected pos
    N vs M" (then the file system is checked: nearly no space left)."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left on device" in text or "os error 28" in text or "quota exceeded" in text:
        return True
    return "unexpected pos" in text and free_bytes(folder) < 64 << 20


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush the files and the folder, so a rename never publishes data still in the cache."""
    for f in folder.iterdir():
        if f.is_file():
            _fsync(f)
    _fsync(folder)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """manifest.json: each file's size and SHA-256, written (and flushed) after all of them."""
    files = {f.name: {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.iterdir()) if f.is_file()}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint folder, or None when it is intact: every file of its
    manifest present, of the recorded size and SHA-256 (a checkpoint written before manifests
    existed is taken as it is)."""
    path = Path(path)
    if not (path / STATE_FILE).is_file():
        return f"{STATE_FILE} is missing"
    if not (path / MANIFEST).is_file():
        return None
    try:
        files = json.loads((path / MANIFEST).read_text())["files"]
    except (ValueError, KeyError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    for name, want in files.items():
        f = path / name
        if not f.is_file():
            return f"{name} is missing"
        if f.stat().st_size != want["size"]:
            return f"{name} has {f.stat().st_size} bytes, {want['size']} were written"
        if _sha256(f) != want["sha256"]:
            return f"{name} does not match its checksum"
    return None


def latest_checkpoint(run_dir: Path, log: Optional[Callable[[str], None]] = None
                      ) -> Optional[Path]:
    """The newest intact step checkpoint of a run, or None. Damaged ones are skipped, each
    reported through `log` when given."""
    for path in sorted((Path(run_dir) / "checkpoints").glob("step-*"), reverse=True):
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        if log is not None:
            log(f"checkpoint {path} is damaged ({problem}); trying an older one")
    return None


def load_checkpoint(path: Path, model, optimizer) -> dict:
    """Load weights into `model`, state into `optimizer`; restore the RNGs; return the state."""
    from transformers import AutoModelForImageTextToText

    path = Path(path)
    # transformers maps its on-disk names (which differ from the module names for Qwen2-VL)
    # back to the model's own; the copy is loaded on the CPU, then copied in place.
    saved = AutoModelForImageTextToText.from_pretrained(path, dtype=model.dtype)
    model.load_state_dict(saved.state_dict())
    del saved
    state = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    set_rng_state(state["rng"])
    return state
