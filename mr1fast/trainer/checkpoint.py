"""Atomic, resumable checkpoints in safe formats.

run_dir/checkpoints/step-000040/
    model.safetensors, config.json, tokenizer + image processor files  (a Hugging Face
        checkpoint: `model.name=run_dir/checkpoints/step-000040` loads it)
    trainer_state.pt   optimizer state, RNG states, step and data position; tensors and plain
                       Python values only, so torch.load(weights_only=True) reads it
A checkpoint is written to a temporary folder and renamed into place, so a run killed while
saving leaves the previous checkpoint intact. The LR and beta schedules are functions of the
step, so the step restores them.
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch

STATE_FILE = "trainer_state.pt"


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
        if final.exists():  # never a moment without a complete checkpoint under this name
            aside = root / f".tmp-old-{final.name}"
            os.replace(final, aside)
            os.replace(tmp, final)
            shutil.rmtree(aside, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync(root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in sorted(root.glob("step-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


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


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    done = sorted(p for p in (Path(run_dir) / "checkpoints").glob("step-*")
                  if (p / STATE_FILE).is_file())
    return done[-1] if done else None


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
