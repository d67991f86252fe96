"""`mr1fast reproduce`: the paper's comparison as one grid of runs from one base model.

GRPO-D, constant-beta GRPO and SFT, each trained on each task on the same budget of training
examples (GRPO: prompts; SFT: examples), over several seeds, and every final model tested on
every task: same-task (the paper's Table 1) and cross-task (trained on one, tested on the other).
Constant beta is tuned as the paper did, on a small grid: each candidate trains on the first
seed, the one with the best mean same-task *validation* accuracy is kept and run on the other
seeds. The table reports the *test* split only; nothing is chosen on it.

The grid is a YAML file (configs/reproduce/*.yaml, keys in GRID_KEYS). A task is one source with
train, validation and test splits (the synthetic ones), or separate sources per role, as the
paper's tasks have (see parse_task): then validation, unless named, is a hold-out of the training
source's first rows, which the training runs skip. Output folder:
  base/                       the base model's validation and test evaluation
  runs/<method>/<task>/seed<k>/  one sub-run: the trainer's own run folder (checkpoints,
                              metrics.jsonl, eval.json with its validation curve) and
                              result.json (its final model's validation and test accuracy)
  results.json, table.md, figure.png   the aggregate (rewritten after every sub-run)
Sub-runs are resumable: a finished one (result.json written last, atomically) is never run
again, an interrupted one resumes from its newest checkpoint. Progress goes to stdout, one line
per sub-run with the grid's position and an estimate of the time left.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import yaml

from .checkpoint import latest_checkpoint
from .config import Config, embedded_default, from_dict, load_config, override_dict, validate
from .errors import UsageError
from .metrics import atomic_write

GRID_KEYS = ("recipe", "overrides", "base", "seeds", "examples", "tasks", "methods", "eval",
             "paper", "ablations", "output_dir")
METHOD_KINDS = ("grpo", "sft")


@dataclass
class Method:
    name: str
    kind: str                               # grpo | sft
    overrides: dict = field(default_factory=dict)
    task_overrides: dict = field(default_factory=dict)   # task -> overrides on that task
    tune_beta: list = field(default_factory=list)   # constant-beta candidates (GRPO)
    examples: dict = field(default_factory=dict)    # task -> examples; {}: the grid's


ROLES = ("train", "validation", "test")


@dataclass
class Source:
    source: str                             # a data source (synthetic:<task>, a path, a hub id)
    split: str
    items: int = 0                          # train: rows trained on (data.limit; 0: all);
                                            # eval: items (0: the grid's eval.<role>)
    rows: int = 0                           # eval: only the source's first rows (a hold-out)


@dataclass
class Task:
    train: Source
    validation: Source
    test: Source
    explicit: bool = False                  # given as a mapping: it sets data.split, data.limit
                                            # and data.holdout of its runs (TASK_KEYS)

    @property
    def holdout(self) -> int:
        """The training source's first rows, left out of training: the validation rows when
        validation is held out of it (else 0)."""
        return self.validation.rows


TASK_KEYS = ("data.train", "data.split", "data.limit", "data.holdout")


def _is_count(n, least: int) -> bool:
    """An int (not a bool) >= least."""
    return isinstance(n, int) and not isinstance(n, bool) and n >= least


def parse_task(where: str, spec, validation_items: int) -> Task:
    """A grid's task: a source with train/validation/test splits ("synthetic:counting-grid"),
    or a mapping of roles, each a source or {source, split, items} (train: {source, split,
    limit}):
        train: leonardPKU/clevr_cogen_a_train       # split train
        test: {source: leonardPKU/superclevr, items: 200}   # split test
        validation: {holdout: 200}      # the default: the first eval.validation rows of train
    Errors name the key."""
    if isinstance(spec, str) and spec:
        return Task(*(Source(spec, role) for role in ROLES))
    if not isinstance(spec, dict):
        raise UsageError(f"{where}: expected a data source or a mapping of {', '.join(ROLES)}, "
                         f"got {spec!r}")
    unknown = sorted(set(spec) - set(ROLES))
    if unknown or "train" not in spec or "test" not in spec:
        raise UsageError(f"{where}: expected train and test (each a source or {{source, split}})"
                         f" and optionally validation, got keys {sorted(spec)}")

    def source(role: str, value, count: str) -> Source:
        key = f"{where}.{role}"
        if isinstance(value, str) and value:
            return Source(value, role)
        if not (isinstance(value, dict) and isinstance(value.get("source"), str)
                and set(value) <= {"source", "split", count}):
            raise UsageError(f"{key}: expected a source or {{source, split, {count}}}, got "
                             f"{value!r}")
        n = value.get(count, 0)
        if not _is_count(n, 0):
            raise UsageError(f"{key}.{count}: expected a number of rows >= 0, got {n!r}")
        split = value.get("split", role)
        if not (isinstance(split, str) and split):
            raise UsageError(f"{key}.split: expected a split name, got {split!r}")
        return Source(value["source"], split, n)

    train = source("train", spec["train"], "limit")
    test = source("test", spec["test"], "items")
    val = spec.get("validation", "holdout")
    if val == "holdout" or (isinstance(val, dict) and "holdout" in val):
        n = validation_items if val == "holdout" else val["holdout"]
        if val != "holdout" and set(val) != {"holdout"}:
            raise UsageError(f"{where}.validation: expected {{holdout: N}} (the first N rows of "
                             f"the training source) or a source, got {val!r}")
        if not _is_count(n, 1):
            raise UsageError(f"{where}.validation.holdout: expected the number of rows held "
                             f"out of {train.source}, got {n!r}")
        return Task(train, Source(train.source, train.split, n, rows=n), test, explicit=True)
    validation = source("validation", val, "items")
    if (validation.source, validation.split) == (train.source, train.split):
        raise UsageError(f"{where}.validation: the training rows themselves ({train.source}, "
                         f"split {train.split}); use {{holdout: N}} to hold out its first rows")
    return Task(train, validation, test, explicit=True)


@dataclass
class Grid:
    recipe: str                             # a config file, or "embedded"
    overrides: dict
    seeds: list
    examples: dict                          # task -> examples per run (GRPO prompts, SFT rows)
    tasks: dict                             # task -> Task (its train/validation/test sources)
    methods: dict                           # name -> Method
    eval: dict                              # validation, test (items), data_seed, ...
    paper: dict = field(default_factory=dict)      # method -> {"A" or "A->B": accuracy}
    ablations: dict = field(default_factory=dict)  # name -> {method, task, key, values}
    output_dir: str = "runs/reproduce"
    base: dict = field(default_factory=dict)       # {} (the recipe's model) or {"sft": {...}}


@dataclass
class SubRun:
    method: str                             # the grid's method, or "<method>-beta<b>"
    task: str
    seed: int
    kind: str
    overrides: dict

    @property
    def id(self) -> str:
        return f"{self.method}/{self.task}/seed{self.seed}"


def load_grid(path: str) -> Grid:
    """The grid of a configs/reproduce/*.yaml file, checked: errors name the key."""
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"--grid {path}: no such file")
    raw = yaml.safe_load(p.read_text()) or {}
    if not isinstance(raw, dict):
        raise UsageError(f"--grid {path}: expected a mapping of {', '.join(GRID_KEYS)}")
    unknown = sorted(set(raw) - set(GRID_KEYS))
    if unknown:
        raise UsageError(f"{path}: unknown key(s) {unknown}; expected {list(GRID_KEYS)}")
    need = ("seeds", "examples", "tasks", "methods", "eval")
    missing = [k for k in need if k not in raw]
    if missing:
        raise UsageError(f"{path}: missing key(s) {missing}")
    seeds = raw["seeds"]
    if not (isinstance(seeds, list) and seeds and all(isinstance(s, int) for s in seeds)):
        raise UsageError(f"{path}: seeds: expected a non-empty list of integers, got {seeds!r}")
    if not (isinstance(raw["tasks"], dict) and raw["tasks"]):
        raise UsageError(f"{path}: tasks: expected a mapping task -> data source")
    examples = _examples(f"{path}: examples", raw["examples"], raw["tasks"])
    methods = {}
    for name, m in (raw["methods"] or {}).items():
        m = dict(m or {})
        kind = m.pop("recipe", None)
        if kind not in METHOD_KINDS:
            raise UsageError(f"{path}: methods.{name}.recipe: expected one of {METHOD_KINDS}, "
                             f"got {kind!r}")
        own_examples = _examples(f"{path}: methods.{name}.examples", m.pop("examples"),
                                 raw["tasks"]) if "examples" in m else {}
        tune = m.pop("tune_beta", [])
        overrides = m.pop("overrides", {}) or {}
        per_task = m.pop("task_overrides", {}) or {}
        if m:
            raise UsageError(f"{path}: methods.{name}: unknown key(s) {sorted(m)}; expected "
                             "recipe, overrides, task_overrides, tune_beta, examples")
        if set(per_task) - set(raw["tasks"]):
            raise UsageError(f"{path}: methods.{name}.task_overrides: unknown task(s) "
                             f"{sorted(set(per_task) - set(raw['tasks']))}")
        if tune and (kind != "grpo" or not all(isinstance(b, (int, float)) and b >= 0
                                               for b in tune)):
            raise UsageError(f"{path}: methods.{name}.tune_beta: expected betas >= 0 of a grpo "
                             f"method, got {tune!r}")
        methods[name] = Method(name, kind, overrides, per_task, list(tune), own_examples)
    if not methods:
        raise UsageError(f"{path}: methods: expected at least one method")
    for name, a in (raw.get("ablations") or {}).items():
        if not (isinstance(a, dict) and {"method", "task", "key", "values"} <= set(a)
                and a["method"] in methods and a["task"] in raw["tasks"]
                and isinstance(a["values"], list) and a["values"]):
            raise UsageError(f"{path}: ablations.{name}: expected method (one of "
                             f"{sorted(methods)}), task (one of {sorted(raw['tasks'])}), key "
                             "(a config key) and values (a list)")
    ev = dict(raw["eval"])
    for k in ("validation", "test"):
        if not (isinstance(ev.get(k), int) and ev[k] > 0):
            raise UsageError(f"{path}: eval.{k}: expected the number of items, got "
                             f"{ev.get(k)!r}")
    tasks = {t: parse_task(f"{path}: tasks.{t}", spec, ev["validation"])
             for t, spec in raw["tasks"].items()}
    grid = Grid(recipe=raw.get("recipe", "embedded"), overrides=raw.get("overrides") or {},
                seeds=seeds, examples=examples, tasks=tasks,
                methods=methods, eval=ev, paper=raw.get("paper") or {},
                ablations=raw.get("ablations") or {},
                output_dir=raw.get("output_dir", "runs/reproduce"), base=raw.get("base") or {})
    for t, task in tasks.items():
        sets = [("overrides", grid.overrides)] + [
            (f"methods.{n}.overrides", m.overrides) for n, m in methods.items()] + [
            (f"methods.{n}.task_overrides.{t}", m.task_overrides.get(t, {}))
            for n, m in methods.items()] + [
            (f"ablations.{a}", {v["key"]: None}) for a, v in grid.ablations.items()
            if v["task"] == t]
        for where, d in sets:
            clash = sorted(k for k in _flatten(d) if k in TASK_KEYS)
            if clash and (task.explicit or "data.train" in clash):
                raise UsageError(f"{path}: {where}: sets {clash}, which tasks.{t} decides "
                                 "(its training source, split, limit and hold-out)")
    if set(grid.base) - {"sft"} or not isinstance(grid.base.get("sft", {}), dict):
        raise UsageError(f"{path}: base: expected nothing (the recipe's model) or "
                         "{sft: {overrides}} (an SFT run that makes the shared base)")
    base_config(grid)  # every override must apply
    return grid


def _examples(where: str, value, tasks: dict) -> dict:
    """{task: examples per run} from one positive integer or a mapping with one per task."""
    out = value if isinstance(value, dict) else {t: value for t in tasks}
    if set(out) != set(tasks) or not all(_is_count(n, 1) for n in out.values()):
        raise UsageError(f"{where}: expected a positive integer, or one per task "
                         f"({sorted(tasks)}), got {value!r}")
    return dict(out)


def _flatten(d: dict) -> dict:
    """Nested sections to "section.key" (a mapping value under a key stays whole: it replaces
    that mapping field); keys already dotted are kept ("grpo.rewards.format" sets one entry)."""
    blank = Config()
    sections = {f.name for f in dataclasses.fields(Config)
                if dataclasses.is_dataclass(getattr(blank, f.name))}
    out = {}
    for k, v in d.items():
        if "." not in k and k in sections and isinstance(v, dict):
            out.update({f"{k}.{k2}": v2 for k2, v2 in v.items()})
        else:
            out[k] = v
    return out


def base_config(grid: Grid, extra: Optional[dict] = None) -> Config:
    """The recipe with the grid's overrides (and `extra`, flat or nested keys), validated."""
    cfg = embedded_default() if grid.recipe == "embedded" else load_config(grid.recipe)
    for key, value in {**_flatten(grid.overrides), **_flatten(extra or {})}.items():
        cfg = from_dict(override_dict(key, value, cfg), base=cfg,
                        where=f"reproduce grid, {key}={value!r}")
    validate(cfg)
    return cfg


def sub_runs(grid: Grid, beta: Optional[dict] = None, ablations: bool = False) -> list[SubRun]:
    """Every sub-run of the grid in run order. Methods with tune_beta run each candidate on the
    first seed; with `beta` ({method: {task: chosen beta}}) the chosen one on the other seeds."""
    out = []

    def constant(name, task, b, seeds, m):
        return [_sub(grid, f"{name}-beta{b:g}", task, s, m,
                     {"grpo.beta_schedule": {"kind": "constant", "beta": float(b)}})
                for s in seeds]

    for name, m in grid.methods.items():
        for task in grid.tasks:
            if not m.tune_beta:
                out += [_sub(grid, name, task, s, m, {}) for s in grid.seeds]
                continue
            for b in m.tune_beta:
                out += constant(name, task, b, grid.seeds[:1], m)
            if beta is not None and task in beta.get(name, {}):
                out += constant(name, task, beta[name][task], grid.seeds[1:], m)
    if ablations:
        for aname, a in grid.ablations.items():
            m = grid.methods[a["method"]]
            for v in a["values"]:
                out += [_sub(grid, f"ablation-{aname}-{v:g}" if isinstance(v, (int, float))
                             else f"ablation-{aname}-{v}", a["task"], s, m, {a["key"]: v})
                        for s in grid.seeds]
    return out


def _sub(grid: Grid, method: str, task: str, seed: int, m: Method, extra: dict) -> SubRun:
    own = {**_flatten(m.overrides), **_flatten(m.task_overrides.get(task, {})),
           **_flatten(extra)}
    cfg = base_config(grid, own)
    batch = cfg.grpo.prompts_per_step if m.kind == "grpo" else cfg.sft.batch_size
    steps = max(1, math.ceil((m.examples or grid.examples)[task] / batch))
    t = grid.tasks[task]
    data = {"data.train": t.train.source}
    if t.explicit:   # the task owns its rows (load_grid refuses overrides of TASK_KEYS)
        data.update({"data.split": t.train.split, "data.limit": t.train.items,
                     "data.holdout": t.holdout})
    return SubRun(method, task, seed, m.kind, {**own, "seed": seed, **data,
                                               f"{m.kind}.max_steps": steps})


def eval_overrides(grid: Grid, task: str, role: str) -> dict:
    """Config keys that evaluate `task`'s validation or test items alone (run_sub's own curve
    takes its item count from the recipe; the table's evaluation sets it, see _evaluate)."""
    src = getattr(grid.tasks[task], role)
    return {"eval.tasks": {task: src.source}, "eval.split": src.split, "eval.rows": src.rows}


def _write_json(path: Path, obj) -> None:
    atomic_write(path, lambda f: json.dump(obj, f, indent=2))


def _evaluate(grid: Grid, model: str, out_dir: Path) -> dict:
    """{split: {task: accuracy %}} of `model` on the validation and test items of every task
    (fixed data seed: the same items for every run)."""
    from .evaluate import run_eval
    ev = grid.eval
    out = {}
    for split in ("validation", "test"):
        # Tasks whose items come the same way share one evaluation (one model load).
        groups: dict = {}
        for task, t in grid.tasks.items():
            src = getattr(t, split)
            groups.setdefault((src.split, src.items or ev[split], src.rows), {})[task] = \
                src.source
        for i, ((name, n, rows), tasks) in enumerate(groups.items()):
            folder = f"eval-{split}" if i == 0 else f"eval-{split}-{i}"
            cfg = base_config(grid, {
                "seed": ev.get("data_seed", 1234), "output_dir": str(out_dir / folder),
                "eval.tasks": tasks, "eval.split": name, "eval.rows": rows, "eval.limit": n,
                "eval.synthetic_size": n, "eval.models": {"model": model},
                **{f"eval.{k}": v for k, v in ev.items()
                   if k in ("max_new_tokens", "batch_size", "samples", "temperature")}})
            for task, r in run_eval(cfg)["model"].items():
                out.setdefault(split, {})[task] = r["accuracy"]
                for k in r:
                    if k.startswith("pass@"):
                        out.setdefault(f"{split}_{k}", {})[task] = r[k]
    return out


def _curve(run_dir: Path, task: str) -> list:
    """[(step, validation accuracy %)] from the run's own eval.json (log.eval_every)."""
    p = run_dir / "eval.json"
    if not p.is_file():
        return []
    data = json.loads(p.read_text())
    pts = []
    for key, res in data.items():
        if key.startswith("step_") and task in res:
            pts.append((int(key[5:]), res[task]["accuracy"]))
    return sorted(pts)


def config_digest(grid: Grid, sub: SubRun) -> str:
    """What a sub-run trains and evaluates: a digest of its resolved config, all but its output
    folder. Two sub-runs with one digest are the same run (an ablation's value that equals a
    method's setting, a beta candidate run again on the first seed)."""
    cfg = base_config(grid, {**sub.overrides, **eval_overrides(grid, sub.task, "validation")})
    fields = dataclasses.asdict(cfg)
    fields.pop("output_dir", None)
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def run_sub(grid: Grid, sub: SubRun, root: Path, same: Optional[dict] = None) -> dict:
    """Train one sub-run (resuming it) and evaluate its final model; returns its result.
    `same`: the result of a finished sub-run with the same config (config_digest), taken
    instead of training again: a run is deterministic on one machine (the default grid's
    ablation runs gave bit-identical accuracies to the grid's own runs of the same config)."""
    from .grpo import train_grpo
    from .sft import run_sft
    run_dir = root / "runs" / sub.id
    done = run_dir / "result.json"
    if done.is_file():
        return json.loads(done.read_text())
    if same is not None:
        result = {**same, "id": sub.id, "method": sub.method, "task": sub.task,
                  "seed": sub.seed, "same_as": same.get("same_as", same["id"]), "seconds": 0.0}
        run_dir.mkdir(parents=True, exist_ok=True)
        _write_json(done, result)
        return result
    t0 = time.perf_counter()
    cfg = base_config(grid, {**sub.overrides, "output_dir": str(run_dir),
                             **eval_overrides(grid, sub.task, "validation")})
    (train_grpo if sub.kind == "grpo" else run_sft)(cfg)
    final = run_dir / "checkpoints" / "final"     # SFT; GRPO: its last step checkpoint
    model = final if final.is_dir() else latest_checkpoint(run_dir)
    result = {"id": sub.id, "method": sub.method, "task": sub.task, "seed": sub.seed,
              "model": str(model), **_evaluate(grid, str(model), run_dir),
              "curve": _curve(run_dir, sub.task), "seconds": time.perf_counter() - t0}
    _write_json(done, result)
    return result


def _mean_std(xs: list) -> tuple:
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0) if xs \
        else (None, None)


def choose_beta(grid: Grid, results: dict) -> dict:
    """{method: {task: beta}} for the methods with tune_beta, per task as the paper tuned it:
    the candidate with the best validation accuracy on the task it trained on (first seed);
    ties: the smaller beta. A task appears once all its candidates have finished."""
    chosen: dict = {}
    s0 = grid.seeds[0]
    for name, m in grid.methods.items():
        for t in grid.tasks if m.tune_beta else ():
            score = {b: results[f"{name}-beta{b:g}/{t}/seed{s0}"]["validation"][t]
                     for b in m.tune_beta if f"{name}-beta{b:g}/{t}/seed{s0}" in results}
            if len(score) == len(m.tune_beta):
                chosen.setdefault(name, {})[t] = max(sorted(score), key=lambda b: score[b])
    return chosen


def aggregate(grid: Grid, base: dict, results: dict, beta: dict) -> dict:
    """{"rows": {method: {column: (mean, std, n)}}, "columns": [...], "beta": beta} over the
    test split: columns are the tasks (same-task) and "A->B" (trained on A, tested on B). A
    tuned method's row holds its chosen beta's runs."""
    tasks = list(grid.tasks)
    columns = tasks + [f"{a}->{b}" for a in tasks for b in tasks if a != b]
    rows = {"base": {c: (base.get("test", {}).get(c.split("->")[-1]), 0.0, 1)
                     for c in columns}}
    for name, m in grid.methods.items():
        row = {}
        for c in columns:
            train, test = c.split("->") if "->" in c else (c, c)
            if m.tune_beta:
                b = beta.get(name, {}).get(train)
                label = None if b is None else f"{name}-beta{b:g}"
            else:
                label = name
            xs = [r["test"][test] for r in results.values()
                  if r["method"] == label and r["task"] == train and test in r.get("test", {})]
            row[c] = (*_mean_std(xs), len(xs))
        rows[name] = row
    return {"rows": rows, "columns": columns, "beta": beta}


def markdown_table(grid: Grid, agg: dict) -> str:
    cols = agg["columns"]
    lines = ["| method | " + " | ".join(f"{c} (test %)" for c in cols) + " |",
             "|---" * (len(cols) + 1) + "|"]
    for name, row in agg["rows"].items():
        cells = []
        for c in cols:
            mean, std, n = row[c]
            cell = "-" if mean is None else (f"{mean:.1f}" if name == "base"
                                             else f"{mean:.1f} ± {std:.1f} (n={n})")
            paper = (grid.paper.get(name) or {}).get(c)
            cells.append(cell + (f" [paper {paper}]" if paper is not None else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if agg["beta"]:
        lines.append("")
        lines.append("Constant beta chosen on validation (per training task): " + "; ".join(
            f"{k}: " + ", ".join(f"{t} {b:g}" for t, b in v.items())
            for k, v in agg["beta"].items()))
    return "\n".join(lines) + "\n"


def ablation_tables(grid: Grid, results: dict) -> str:
    out = []
    for aname, a in grid.ablations.items():
        lines = [f"\nAblation {aname} ({a['key']}; {a['method']} on {a['task']}, test %):\n",
                 "| value | accuracy |", "|---|---|"]
        for v in a["values"]:
            label = f"ablation-{aname}-{v:g}" if isinstance(v, (int, float)) \
                else f"ablation-{aname}-{v}"
            xs = [r["test"][a["task"]] for r in results.values() if r["method"] == label]
            mean, std = _mean_std(xs)
            lines.append(f"| {v} | " + ("-" if mean is None else
                                        f"{mean:.1f} ± {std:.1f} (n={len(xs)})") + " |")
        out.append("\n".join(lines) + "\n")
    return "".join(out)


def figure(grid: Grid, agg: dict, results: dict, path: Path) -> None:
    """Bars (mean ± std test accuracy per method and column) and validation accuracy over
    steps (GRPO sub-runs' own curves, mean over seeds)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols, rows = agg["columns"], agg["rows"]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / max(1, len(rows))
    for i, (name, row) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [row[c][0] or 0.0 for c in cols], width, yerr=[row[c][1] or 0.0 for c in cols],
               capsize=3, label=name)
    ax.set_xticks([j + width * (len(rows) - 1) / 2 for j in range(len(cols))], cols)
    ax.set_ylabel("test accuracy (%)")
    ax.legend(fontsize=8)
    for name, m in grid.methods.items():
        for task in grid.tasks:
            b = agg["beta"].get(name, {}).get(task)
            label = name if not m.tune_beta else None if b is None else f"{name}-beta{b:g}"
            curves = [r["curve"] for r in results.values()
                      if r["method"] == label and r["task"] == task and r.get("curve")]
            if curves:
                steps = sorted({s for c in curves for s, _ in c})
                mean = [statistics.fmean([a for c in curves for s2, a in c if s2 == s])
                        for s in steps]
                bx.plot(steps, mean, marker=".", label=f"{name} on {task}")
    bx.set_xlabel("step")
    bx.set_ylabel("validation accuracy (%)")
    if bx.lines:
        bx.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def base_sft_keys(grid: Grid, out_dir: Path) -> dict:
    """The config keys of the SFT run that makes a grid's shared base (grid.base["sft"]). It
    never trains on a task's validation hold-out: on a task's training source it skips the
    largest hold-out of that source."""
    keys = {**_flatten(grid.base["sft"]), "output_dir": str(out_dir), "eval.tasks": {}}
    data = base_config(grid, keys).data
    held = [t.holdout for t in grid.tasks.values()
            if (t.train.source, t.train.split) == (data.train, data.split)]
    if held:
        keys["data.holdout"] = max([data.holdout] + held)
    return keys


def reproduce(grid_path: str, output_dir: Optional[str] = None, *, ablations: bool = False,
              on_done: Optional[Callable[[SubRun, dict], None]] = None) -> dict:
    """Runs (or resumes) the grid; returns {"base", "results", "aggregate"}. `on_done(sub,
    result)` is called after each sub-run (tests use it to interrupt)."""
    grid = load_grid(grid_path)
    root = Path(output_dir or grid.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if "sft" in grid.base:   # one SFT run makes the base every sub-run starts from
        from .sft import run_sft
        base_dir = root / "base" / "train"
        final = base_dir / "checkpoints" / "final"
        if not (final / "config.json").is_file():
            print("reproduce: training the shared base (SFT)", flush=True)
            run_sft(base_config(grid, base_sft_keys(grid, base_dir)))
        grid.overrides = {**_flatten(grid.overrides), "model.name": str(final)}
    base_file = root / "base" / "result.json"
    if base_file.is_file():
        base = json.loads(base_file.read_text())
    else:
        base_file.parent.mkdir(parents=True, exist_ok=True)
        base = _evaluate(grid, base_config(grid).model.name, base_file.parent)
        _write_json(base_file, base)
    results: dict = {}
    t_start = time.perf_counter()
    ran = 0
    plan = sub_runs(grid, beta={}, ablations=ablations)
    total_guess = len(sub_runs(grid, beta={m: {t: 0.0 for t in grid.tasks}
                                           for m in grid.methods}, ablations=ablations))
    k = 0
    finished: dict = {}    # config_digest -> the first result of that config
    while True:
        for sub in plan:
            if sub.id in results:
                continue
            k += 1
            fresh = not (root / "runs" / sub.id / "result.json").is_file()
            t0 = time.perf_counter()
            digest = config_digest(grid, sub)
            same = finished.get(digest) if fresh else None
            results[sub.id] = run_sub(grid, sub, root, same)
            finished.setdefault(digest, results[sub.id])
            if same is not None:
                print(f"reproduce [{k}/{total_guess}] {sub.id}: the same run as "
                      f"{results[sub.id]['same_as']} (its result)", flush=True)
            elif fresh:
                ran += 1
                per = (time.perf_counter() - t_start) / ran
                left = per * (total_guess - k)
                print(f"reproduce [{k}/{total_guess}] {sub.id}: test "
                      + ", ".join(f"{t} {a:.1f}%" for t, a in results[sub.id]["test"].items())
                      + f" ({time.perf_counter() - t0:.0f} s; about {left / 60:.0f} min left)",
                      flush=True)
            else:
                print(f"reproduce [{k}/{total_guess}] {sub.id}: done before (skipped)",
                      flush=True)
            _write_summary(grid, root, base, results)
            if on_done is not None:
                on_done(sub, results[sub.id])
        beta = choose_beta(grid, results)
        more = [s for s in sub_runs(grid, beta=beta, ablations=ablations)
                if s.id not in results]
        if not more:
            break
        plan = more
    agg = _write_summary(grid, root, base, results)
    print(markdown_table(grid, agg) + ablation_tables(grid, results), flush=True)
    print(f"reproduce: {root / 'table.md'}, {root / 'figure.png'}", flush=True)
    return {"base": base, "results": results, "aggregate": agg}


def _write_summary(grid: Grid, root: Path, base: dict, results: dict) -> dict:
    beta = choose_beta(grid, results)
    agg = aggregate(grid, base, results, beta)
    _write_json(root / "results.json", {"base": base, "results": results,
                                        "beta": beta, "aggregate": agg})
    (root / "table.md").write_text(markdown_table(grid, agg) + ablation_tables(grid, results))
    figure(grid, agg, results, root / "figure.png")
    return agg
