"""Pre-trained embedded bases: small Qwen2-VL models trained here, deterministically, by a fixed
recipe, that play the paper's base model (Qwen2-VL-2B) at embedded scale: partially capable on
both tasks, with an answer distribution reinforcement learning can sharpen
(docs/notes/embedded-base.md has the measurements behind each recipe).

A base is named in the config like a preset (`model.name=embedded-base`). Its weights ship with
the package (mr1fast/assets/<name>-<version>/, a Hugging Face checkpoint with `base.json`: the
recipe and the selection's accuracies), so a run starts from them in seconds. Where they are
missing (or for a changed recipe), the first use builds the base into the cache instead
(`<cache>/<name>-<version>/`); `python -m mr1fast.trainer.base` remakes the shipped copy.

The recipe: `mr1fast sft` on the recipe's random-weight preset and data, in a child process (no
process group or output-folder lock of the caller's run is touched), saving a checkpoint every
`every` steps; then every checkpoint is evaluated (greedy, `select.items` validation items per
task, a data seed of its own) and the base is the first one whose accuracy reaches
`select.min_accuracy` on every task: the "partially capable" model, chosen on validation, not
after a fixed number of steps (the step at which this happens varies several-fold between
seeds). Concurrent first uses (the ranks of a torchrun job, two runs sharing a cache) serialise
on a lock file: one builds, the others wait and then load it. The build is deterministic on a
given machine and thread count (fixed seeds, CPU).
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable

from .errors import UserError

SHIPPED = Path(__file__).resolve().parent.parent / "assets"

# name -> recipe. version changes whenever the recipe (or what it depends on) does.
BASES = {
    # Grid counting and polygon geometry, half and half (synthetic:embedded-mix), SFT at a
    # constant lr with the vision tower frozen; the first checkpoint (every 50 steps) at >= 35%
    # greedy accuracy on both tasks' validation items. docs/notes/embedded-base.md.
    "embedded-base": {
        "version": "v2", "preset": "tiny-base", "data": "synthetic:embedded-mix",
        "rows": 6000, "max_steps": 1000, "every": 50, "batch_size": 32, "lr": 2e-3, "seed": 0,
        "select": {"tasks": {"counting": "synthetic:counting-grid",
                             "geometry": "synthetic:geometry-polygon"},
                   "items": 128, "data_seed": 777, "min_accuracy": 35.0}},
}


def base_folder(name: str, cache: Path) -> Path:
    return Path(cache) / f"{name}-{BASES[name]['version']}"


def shipped_folder(name: str) -> Path:
    return SHIPPED / f"{name}-{BASES[name]['version']}"


def build_base(name: str, cache: Path, log: Callable[[str], None] = print,
               recipe: dict | None = None, use_shipped: bool = True) -> Path:
    """The folder of base `name`: the shipped copy, else the cache's, built first when missing
    (see the module doc). `recipe` overrides the recipe's keys (tests: fewer steps; then the
    folder's name says so and nothing shipped is used)."""
    changed = dict(recipe or {})
    recipe = {**BASES[name], **changed}
    if use_shipped and not changed and (shipped_folder(name) / "base.json").is_file():
        return shipped_folder(name)
    # a changed recipe gets a folder of its own, named by a digest of the changes
    final = base_folder(name, cache) if not changed else Path(cache) / (
        f"{name}-{recipe['version']}-"
        + hashlib.sha256(json.dumps(changed, sort_keys=True).encode()).hexdigest()[:12])
    if (final / "base.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with open(final.parent / f".{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one builder; the others wait here
        if (final / "base.json").is_file():
            return final
        log(f"building the {name} base model in {final} (up to {recipe['max_steps']} SFT "
            f"steps on {recipe['data']}, then the first checkpoint at "
            f"{recipe['select']['min_accuracy']}% on validation; once, a few minutes on 2 cores)")
        _build(recipe, final, Path(cache), log)
    return final


def _child(args: list[str], cache: Path, log_file: Path, what: str) -> None:
    """Runs `python -m mr1fast <args>` in a clean environment; a failure is a UserError naming
    its log."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE",
                        "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env["MR1FAST_CACHE"] = str(cache)
    run = subprocess.run([sys.executable, "-m", "mr1fast", *args], env=env,
                         capture_output=True, text=True)
    if run.returncode != 0:
        log_file.write_text(run.stdout + run.stderr)
        raise UserError(f"building the base model {what} failed (exit {run.returncode}); its "
                        f"output: {log_file}", fix="read the log; remove the folder to retry")


def _build(recipe: dict, final: Path, cache: Path, log: Callable[[str], None]) -> None:
    from .model import init_tiny_model
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    failed = final.parent / f"{final.name}-build.log"
    sel = recipe["select"]
    try:
        init = init_tiny_model(work / "init", preset=recipe["preset"], seed=recipe["seed"])
        common = ["model.device=cpu", "model.dtype=fp32", f"cache_dir={cache}",
                  "log.progress=false"]
        _child(["sft", "--output-dir", str(work / "sft"), f"model.name={init}", *common,
                "model.freeze_vision=true", f"data.train={recipe['data']}",
                f"data.synthetic_size={recipe['rows']}", f"sft.max_steps={recipe['max_steps']}",
                f"sft.batch_size={recipe['batch_size']}", f"sft.lr={recipe['lr']}",
                "sft.lr_schedule=constant", "sft.warmup_ratio=0.0", f"seed={recipe['seed']}",
                "eval.tasks={}", f"log.save_every={recipe['every']}",
                f"log.keep_checkpoints={recipe['max_steps'] // recipe['every'] + 1}"],
               cache, failed, final.name)
        steps = sorted((work / "sft" / "checkpoints").glob("step-*"))
        models = "{" + ", ".join(f"{p.name}: {p}" for p in steps) + "}"
        tasks = "{" + ", ".join(f'{t}: "{s}"' for t, s in sel["tasks"].items()) + "}"
        _child(["eval", "--output-dir", str(work / "select"), *common, f"seed={sel['data_seed']}",
                f"eval.tasks={tasks}", "eval.split=validation", f"eval.limit={sel['items']}",
                f"eval.synthetic_size={sel['items']}", f"eval.models={models}",
                "eval.max_new_tokens=32", "eval.batch_size=64"], cache, failed, final.name)
        scores = json.loads((work / "select" / "eval.json").read_text())
        accuracy = {step: {t: r["accuracy"] for t, r in row.items()}
                    for step, row in scores.items()}
        chosen = next((p for p in steps if min(accuracy[p.name].values())
                       >= sel["min_accuracy"]), None)
        if chosen is None:
            failed.write_text(json.dumps(accuracy, indent=2))
            raise UserError(f"building the base model {final.name}: no checkpoint reached "
                            f"{sel['min_accuracy']}% on every task; the accuracies: {failed}",
                            fix="raise the recipe's max_steps or change its seed")
        log(f"base: {chosen.name} ({accuracy[chosen.name]} on validation)")
        _child(["export", str(chosen), str(work / "base"), "--dtype", "fp32"], cache, failed,
               final.name)
        (work / "base" / "base.json").write_text(json.dumps(
            {**recipe, "chosen": chosen.name, "validation_accuracy": accuracy}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(work / "base", final)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    """`python -m mr1fast.trainer.base [NAME]`: (re)make the shipped copy of a base."""
    args = sys.argv[1:] if argv is None else argv
    name = args[0] if args else "embedded-base"
    if name not in BASES:
        print(f"unknown base {name!r}; the bases: {sorted(BASES)}", file=sys.stderr)
        return 2
    out = shipped_folder(name)
    with tempfile.TemporaryDirectory() as cache:
        built = build_base(name, Path(cache), use_shipped=False)
        staged = out.with_name(f".{out.name}.new")
        shutil.rmtree(staged, ignore_errors=True)
        shutil.copytree(built, staged)
        old = out.with_name(f".{out.name}.old")
        if out.exists():                 # the old copy stays whole until the new one is in place
            os.replace(out, old)
        os.replace(staged, out)
        shutil.rmtree(old, ignore_errors=True)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
