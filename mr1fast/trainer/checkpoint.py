"""Atomic, verified checkpoints, resumable at any world size.

run_dir/checkpoints/step-000040/
    weights/           torch.distributed.checkpoint (DCP): "model", the fp32 master weights
                       under the Hugging Face model's parameter names, and "optim", AdamW's
                       moments and step per trainable parameter. Each rank writes its shards;
                       loading reshards to the world size that reads it (1 process included)
    trainer_state.pt   step, data position, eval results, RNG states (torch.load with
                       weights_only=True reads it)
    config.json, tokenizer and image processor files: the model's description, so that
                       `model.name=<this folder>` loads it and `mr1fast export` turns it into a
                       plain Hugging Face checkpoint
    manifest.json      every other file's size and SHA-256, written last
A checkpoint is written to a temporary folder and renamed into place (by rank 0, after every
rank's shards are written), so a run killed while saving leaves the previous one intact.
Resuming verifies the manifest and takes the newest intact checkpoint (a damaged one is reported
and skipped). A full disk while saving keeps the previous checkpoint and says so. The LR and
beta schedules are functions of the step, so the step restores them. A "final" checkpoint (the
SFT result) is a plain Hugging Face checkpoint.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
import torch.distributed.checkpoint as dcp

from .distributed import World
from .errors import UserError, free_bytes, human_bytes

STATE_FILE = "trainer_state.pt"
MANIFEST = "manifest.json"
WEIGHTS = "weights"
# DCP says so on every save and load in one process, which is what no_dist=True asks for.
warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or "
                        "uninitialized, assuming the intent is to")


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


def named_weights(model) -> list:
    """(name, parameter) of the Hugging Face model, each shared tensor once (tied LM head)."""
    return list(model.named_parameters())


def training_state(model, optimizer) -> dict:
    """The tensors a step checkpoint holds, under names that are the same at every world size:
    {"model": {name: fp32 master weight}, "optim": {name: {"exp_avg", "exp_avg_sq", "step"}}}.
    The master weights are FSDP's sharded parameters, MasterWeightsAdamW's fp32 copies, or the
    fp32 parameters themselves. The optimizer state is created (zero, step 0: what AdamW starts
    from) where it does not exist yet, so the same dict is the destination when loading."""
    weights, optim = {}, {}
    for name, p in named_weights(model):
        master = optimizer.master_of(p) if hasattr(optimizer, "master_of") else p
        weights[name] = master
        if p.requires_grad:
            optim[name] = adam_state(optimizer, master)
    return {"model": weights, "optim": optim}


def adam_state(optimizer, param) -> dict:
    """AdamW's state of `param` (the tensor the optimizer updates), created if absent."""
    inner = getattr(optimizer, "inner", optimizer)
    state = inner.state[param]
    if not state:
        state["step"] = torch.tensor(0.0)
        state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
    return {k: state[k] for k in ("exp_avg", "exp_avg_sq", "step")}


def save_checkpoint(run_dir: Path, step: int, model, encoder, optimizer, state: dict,
                    world: World, keep: int = 2) -> Optional[Path]:
    """Write checkpoints/step-{step:06d} atomically (a collective: every rank calls it); keep
    the newest `keep` step checkpoints. Returns the path (on rank 0; None elsewhere)."""
    root = Path(run_dir) / "checkpoints"
    final = root / f"step-{step:06d}"
    tmp = None
    if world.is_main:
        root.mkdir(parents=True, exist_ok=True)
        for stale in root.glob(".tmp-*"):  # left by a run killed while saving
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    tmp = Path(world.broadcast(str(tmp)))
    try:
        dcp.save(training_state(model, optimizer), checkpoint_id=str(tmp / WEIGHTS),
                 no_dist=not world.distributed)
        world.barrier()
        if world.is_main:
            _write_description(tmp, model, encoder)
            torch.save({"rng": rng_state(), **state}, tmp / STATE_FILE)
            _publish(tmp, final, root)
    except BaseException as e:  # DCP's CheckpointException is a BaseException
        if world.is_main:
            _raise_if_disk_full(e, tmp, final, run_dir)
        raise
    finally:
        if world.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    if world.is_main:
        for old in sorted(root.glob("step-*"))[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final
    return None


def save_final(run_dir: Path, name: str, model, encoder, world: World) -> Optional[Path]:
    """checkpoints/<name>: a plain Hugging Face checkpoint of `model` (gathered on rank 0 when
    sharded), written atomically with a manifest. A collective."""
    from .distributed import full_tensors

    full = None
    if world.distributed:  # gathered one tensor at a time; a tied LM head once, as HF saves it
        seen, entries = set(), []
        for key, t in model.state_dict(keep_vars=True).items():
            if id(t) not in seen:
                seen.add(id(t))
                entries.append((key, t))
        full = {k: t.cpu() for k, t in full_tensors(entries, world)}
    if not world.is_main:
        world.barrier()
        return None
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    final = root / name
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=root))
    try:
        model.save_pretrained(tmp, safe_serialization=True, state_dict=full)
        encoder.save(tmp)
        torch.save({"rng": rng_state()}, tmp / STATE_FILE)
        _publish(tmp, final, root)
    except Exception as e:
        _raise_if_disk_full(e, tmp, final, run_dir)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    world.barrier()
    return final


def _write_description(folder: Path, model, encoder) -> None:
    """config.json (and the generation config), tokenizer, image processor: what load_model and
    export need besides the weights."""
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(folder)
    encoder.save(folder)


def _publish(tmp: Path, final: Path, root: Path) -> None:
    """fsync, manifest, rename into place (never a moment without a complete `final`)."""
    _fsync_tree(tmp)
    _write_manifest(tmp)
    if final.exists():
        aside = root / f".tmp-old-{final.name}"
        os.replace(final, aside)
        os.replace(tmp, final)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync(root)


def _raise_if_disk_full(e: BaseException, tmp: Optional[Path], final: Path, run_dir: Path
                        ) -> None:
    root = final.parent
    if not _disk_full(e, root):
        return
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    previous = latest_checkpoint(run_dir)
    kept = f"the previous checkpoint {previous.name} is intact" if previous else \
        "no earlier checkpoint exists"
    raise UserError(f"no space left on device while writing checkpoint {final.name} in "
                    f"{root} ({human_bytes(free_bytes(root))} free after cleaning up); {kept}",
                    fix="free some space and rerun the same command: it resumes from the "
                        "newest intact checkpoint") from e


def _disk_full(e: BaseException, folder: Path) -> bool:
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


def load_checkpoint(path: Path, model, optimizer, world: World) -> dict:
    """Load a step checkpoint into `model` (sharded or not) and `optimizer`, whatever world
    size wrote it; restore the RNGs; return the trainer state (step, data, ...). A
    collective."""
    path = Path(path)
    state = training_state(model, optimizer)
    dcp.load(state, checkpoint_id=str(path / WEIGHTS), no_dist=not world.distributed)
    if hasattr(optimizer, "load_masters"):
        optimizer.load_masters()
    trainer = torch.load(path / STATE_FILE, weights_only=True, map_location="cpu")
    set_rng_state(trainer["rng"])
    return trainer


def load_weights(path: Path, model) -> None:
    """The master weights of a step checkpoint into an unsharded model (any dtype), in one
    process: for export, evaluation and references."""
    fp32 = {name: torch.empty(p.shape, dtype=torch.float32) for name, p in named_weights(model)}
    dcp.load({"model": fp32}, checkpoint_id=str(Path(path) / WEIGHTS), no_dist=True)
    with torch.no_grad():
        for name, p in named_weights(model):
            p.copy_(fp32[name])


def is_step_checkpoint(path: Path) -> bool:
    return (Path(path) / WEIGHTS / ".metadata").is_file()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    """Flush the files and the folders, so a rename never publishes data still in the cache."""
    for f in folder.rglob("*"):
        if f.is_file():
            _fsync(f)
    for d in [p for p in folder.rglob("*") if p.is_dir()] + [folder]:
        _fsync(d)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_manifest(folder: Path) -> None:
    """manifest.json: each file's size and SHA-256, written (and flushed) after all of them."""
    files = {f.relative_to(folder).as_posix(): {"size": f.stat().st_size, "sha256": _sha256(f)}
             for f in sorted(folder.rglob("*")) if f.is_file()}
    path = folder / MANIFEST
    with open(path, "w") as f:
        json.dump({"files": files}, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    _fsync(folder)


def checkpoint_problem(path: Path) -> Optional[str]:
    """What is wrong with a checkpoint folder, or None when it is intact: every file of its
    manifest present, of the recorded size and SHA-256."""
    path = Path(path)
    if not (path / MANIFEST).is_file():
        return f"{MANIFEST} is missing (an unfinished or foreign checkpoint)"
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
    """The newest intact step checkpoint of a run, or None when there is none. Damaged ones
    are skipped, each reported through `log`; when there are checkpoints but none is intact,
    a UserError (starting over would write over the run)."""
    found = sorted((Path(run_dir) / "checkpoints").glob("step-*"), reverse=True)
    problems = []
    for path in found:
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        problems.append(f"{path.name}: {problem}")
        if log is not None:
            log(f"checkpoint {path} is damaged ({problem}); trying an older one")
    if found:
        raise UserError(f"{run_dir} holds checkpoints but none is intact ({'; '.join(problems)})",
                        fix="move the folder away (or pass another --output-dir) to start over")
    return None
