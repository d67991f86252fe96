"""Pre-trained embedded bases: small Qwen2-VL models trained here, deterministically, by a fixed
recipe, that play the paper's base model (Qwen2-VL-2B) at embedded scale: partially capable on
the task, with an answer distribution reinforcement learning can sharpen
(docs/notes/embedded-base.md has the measurements behind each recipe).

A base is named in the config like a preset (`model.name=embedded-base`). The first use builds it
into the cache (`<cache>/<name>-<version>/`, a Hugging Face checkpoint with `base.json`, its
recipe) by running `mr1fast sft` on the recipe's random-weight preset in a child process (no
process group or output-folder lock of the caller's run is touched). Concurrent first uses (the
ranks of a torchrun job, two runs sharing a cache) serialise on a lock file: one builds, the
others wait and then load it. The build is deterministic on a given machine and thread count
(fixed seeds, CPU).
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError

# name -> recipe. version changes whenever the recipe (or what it depends on) does.
BASES = {
    # Counting on the grid layout: 400 SFT steps of 32 on 3000 rows at lr 3e-3 took this
    # architecture to 42.6% held-out greedy accuracy (pass@8 90.2%, over-counting), from which
    # GRPO-D at lr 5e-4 reached 77.0% in 200 steps (seed 0; docs/notes/embedded-base.md).
    "embedded-base": {"version": "v1", "preset": "tiny-base", "data": "synthetic:counting-grid",
                      "rows": 3000, "steps": 400, "batch_size": 32, "lr": 3e-3, "seed": 0},
}


def base_folder(name: str, cache: Path) -> Path:
    return Path(cache) / f"{name}-{BASES[name]['version']}"


def build_base(name: str, cache: Path, log: Callable[[str], None] = print,
               steps: int | None = None) -> Path:
    """The folder of base `name` in `cache`, built first when missing (see the module doc).
    `steps` overrides the recipe's (tests)."""
    recipe = dict(BASES[name], **({"steps": steps} if steps is not None else {}))
    final = base_folder(name, cache) if steps is None else \
        Path(cache) / f"{name}-{recipe['version']}-steps{steps}"
    if (final / "base.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one builder; the others wait here
        if (final / "base.json").is_file():
            return final
        log(f"building the {name} base model in {final} ({recipe['steps']} SFT steps on "
            f"{recipe['data']}; once, about a minute on 2 cores)")
        _build(recipe, final, Path(cache))
    return final


def _build(recipe: dict, final: Path, cache: Path) -> None:
    from .model import init_tiny_model
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        init = init_tiny_model(work / "init", preset=recipe["preset"], seed=recipe["seed"])
        overrides = [f"model.name={init}", "model.device=cpu", "model.dtype=fp32",
                     f"data.train={recipe['data']}", f"data.synthetic_size={recipe['rows']}",
                     f"sft.max_steps={recipe['steps']}", f"sft.batch_size={recipe['batch_size']}",
                     f"sft.lr={recipe['lr']}", "sft.lr_schedule=constant",
                     "sft.warmup_ratio=0.0", f"seed={recipe['seed']}", f"cache_dir={cache}",
                     "eval.tasks={}", "log.progress=false", f"log.save_every={recipe['steps']}"]
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                            "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
        env["MR1FAST_CACHE"] = str(cache)
        run = subprocess.run([sys.executable, "-m", "mr1fast", "sft", "--output-dir",
                              str(work / "sft"), *overrides], env=env, capture_output=True,
                             text=True)
        if run.returncode != 0:
            (final.parent / f"{final.name}-build.log").write_text(run.stdout + run.stderr)
            raise UserError(f"building the base model {final.name} failed (exit "
                            f"{run.returncode}); its output: "
                            f"{final.parent / (final.name + '-build.log')}",
                            fix="read the log; remove the folder to retry")
        built = work / "sft" / "checkpoints" / "final"
        (built / "base.json").write_text(json.dumps(recipe, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(built, final)
    finally:
        shutil.rmtree(work, ignore_errors=True)
