"""Evaluation: greedy decoding and accuracy per task, as in the paper (counting: the integer in
<answer>; geometry: math-verify equivalence), and the cross-task matrix (rows: models, e.g.
trained on A; columns: tasks B) as a markdown table and JSON."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..rollout import HFSampler, SamplingParams
from .config import Config, save_config
from .data import Example, load_task
from .distributed import World
from .errors import UsageError
from .model import PromptEncoder, load_encoder, load_model, model_dtype, resolve_model
from .preflight import check_model
from .rewards import RewardRunner, completion_answer, gold_answer
from .run import check_eval_tasks, distributed_run, log


@torch.no_grad()
def evaluate(model, encoder: PromptEncoder, examples: list[Example], score: RewardRunner, *,
             max_new_tokens: int, batch_size: int, world: World = World(), samples: int = 0,
             temperature: float = 1.0, seed: int = 0) -> dict:
    """{"accuracy", "format", "n", "unscored", "confusion"} over `examples` with greedy
    decoding; accuracy and format in %. confusion: {gold answer: {greedy answer: count}}, the
    answer being the last <answer>'s stripped content ("none" without one). With samples = k >
    0 also k sampled completions per example at `temperature`, seeded per example (seed and its
    index: the same draws on every run and any number of processes): "pass@k" (the share of
    examples with at least one right answer, %) and "sampled_accuracy" (the mean share of right
    answers, %). `score` is a RewardRunner with the "accuracy" and "format" rewards. With
    several processes each evaluates every world.size-th example on its own (unsharded)
    `model`, and the counts are summed."""
    sampler = HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                        encoder.multimodal_ids)
    greedy = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    sampled = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature)
    device = next(model.parameters()).device
    acc = fmt = 0.0
    failed = passed = right = 0
    confusion: dict = {}
    index = list(range(len(examples)))[world.rank::world.size]
    for i in range(0, len(index), batch_size):
        ids = index[i: i + batch_size]
        batch = [examples[j] for j in ids]
        rows = [e.reward_row() for e in batch]
        prompts = encoder.encode_examples(batch, device)
        out = sampler.generate(prompts, 1, greedy)
        texts = encoder.decode(out.completion_ids, out.completion_mask)
        result = score(texts, rows)
        acc += sum(v or 0.0 for v in result.values["accuracy"])
        failed += sum(v is None for v in result.values["accuracy"])
        fmt += sum(v or 0.0 for v in result.values["format"])
        for text, row in zip(texts, rows):
            gold = gold_answer(row["solution"])
            by_gold = confusion.setdefault(gold, {})
            got = completion_answer(text) or "none"
            by_gold[got] = by_gold.get(got, 0) + 1
        if samples:
            out = sampler.generate(prompts, samples, sampled,
                                   seeds=[seed * 1_000_003 + j for j in ids])
            texts = encoder.decode(out.completion_ids, out.completion_mask)
            values = score(texts, [r for r in rows for _ in range(samples)]).values["accuracy"]
            for k in range(len(batch)):
                hits = sum((v or 0.0) >= 1.0 for v in values[k * samples:(k + 1) * samples])
                passed += hits > 0
                right += hits
    gathered = world.gather((acc, fmt, failed, passed, right, confusion))
    acc, fmt, failed, passed, right = (sum(x) for x in list(zip(*gathered))[:5])
    merged: dict = {}
    for part in (g[5] for g in gathered):
        for gold, answers in part.items():
            row = merged.setdefault(gold, {})
            for got, c in answers.items():
                row[got] = row.get(got, 0) + c
    n = len(examples)
    if failed:
        log(f"eval: the accuracy of {failed} of {n} items could not be computed (counted wrong)",
            world)
    out = {"accuracy": 100.0 * acc / n, "format": 100.0 * fmt / n, "n": n, "unscored": failed,
           "confusion": _sorted_confusion(merged)}
    if samples:
        out[f"pass@{samples}"] = 100.0 * passed / n
        out["sampled_accuracy"] = 100.0 * right / (n * samples)
    return out


def _answer_order(a: str):
    """Integers first, in numeric order, then the rest as text."""
    return (0, int(a), "") if a.lstrip("-").isdigit() else (1, 0, a)


def _sorted_confusion(confusion: dict) -> dict:
    return {g: {a: confusion[g][a] for a in sorted(confusion[g], key=_answer_order)}
            for g in sorted(confusion, key=_answer_order)}


def confusion_table(confusion: dict) -> str:
    """Markdown: one row per gold answer, one column per answer given (counts)."""
    answers = sorted({a for row in confusion.values() for a in row}, key=_answer_order)
    lines = ["| gold \\ answer | " + " | ".join(a.replace("|", "\\|") for a in answers)
             + " |",
             "|---" * (len(answers) + 1) + "|"]
    for gold, row in confusion.items():
        lines.append(f"| {gold.replace('|', chr(92) + '|')} | "
                     + " | ".join(str(row.get(a, 0)) for a in answers) + " |")
    return "\n".join(lines) + "\n"


def evaluate_tasks(cfg: Config, model, encoder: PromptEncoder, world: World = World()) -> dict:
    """evaluate() on every task of cfg.eval.tasks (held-out split): {task: result}. `model`
    is unsharded (under FSDP: the trainer's replica)."""
    e = cfg.eval
    out = {}
    with RewardRunner({"accuracy": 1.0, "format": 1.0}, timeout_s=cfg.grpo.reward_timeout_s,
                      log=log) as score:
        for task, source in e.tasks.items():
            # No prompt-length filter: the test sets must keep their size (200, 754 items).
            examples = load_task(source, cfg, encoder, key=f"eval.tasks.{task}", split=e.split,
                                 n=e.synthetic_size,
                                 limit=e.limit, max_prompt_length=None, strict=cfg.data.strict,
                                 warn=lambda m: log(m, world), rows=(0, e.rows or None))
            out[task] = evaluate(model, encoder, examples, score, world=world,
                                 max_new_tokens=e.max_new_tokens, batch_size=e.batch_size,
                                 samples=e.samples, temperature=e.temperature, seed=cfg.seed)
    return out


def print_results(title: str, results: dict, world: World = World()) -> None:
    if not world.is_main:
        return
    cells = ", ".join(f"{task} {r['accuracy']:.1f}% (format {r['format']:.0f}%"
                      + "".join(f", {k} {r[k]:.1f}%" for k in r if k.startswith("pass@"))
                      + f", n={r['n']})" for task, r in results.items())
    print(f"eval {title}: {cells}", flush=True)


def markdown_matrix(matrix: dict) -> str:
    """| model | task A | task B | ... with accuracy in %."""
    tasks = list(next(iter(matrix.values())))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label, row in matrix.items():
        lines.append(f"| {label} | " + " | ".join(_cell(row[t]) for t in tasks) + " |")
    return "\n".join(lines) + "\n"


def _cell(result: dict) -> str:
    """accuracy, and pass@k where measured: "42.50 (pass@8 81.25)"."""
    extra = "".join(f" ({k} {result[k]:.2f})" for k in result if k.startswith("pass@"))
    return f"{result['accuracy']:.2f}{extra}"


def run_eval(cfg: Config) -> dict:
    """`mr1fast eval`: every model of eval.models (label -> checkpoint; default model.name) on
    every task of eval.tasks; writes eval.json and eval.md to output_dir (locked for the run).
    Every model and task is checked before the first evaluation. Under torchrun each process
    loads each model whole and evaluates its share of the examples."""
    with distributed_run(cfg) as (world, device):
        out_dir = Path(cfg.output_dir)
        if not cfg.eval.tasks:
            raise UsageError("config key eval.tasks: no task to evaluate on",
                             fix="e.g. eval.tasks={counting: synthetic:counting}")
        models = cfg.eval.models or {cfg.model.name: cfg.model.name}
        paths = {}
        for label, name in models.items():
            key = f"eval.models.{label}" if cfg.eval.models else "model.name"
            paths[label] = resolve_model(name, cfg, lambda m: log(m, world))
            check_model(paths[label], key=key)
        encoders = {label: load_encoder(path) for label, path in paths.items()}
        check_eval_tasks(cfg, next(iter(encoders.values())))
        if world.is_main:
            save_config(cfg, out_dir / "config.yaml")
        torch.manual_seed(cfg.seed)
        matrix = {}
        for label, path in paths.items():
            model = load_model(path, device=device, dtype=model_dtype(cfg.model.dtype, device),
                               trainable=False)
            matrix[label] = evaluate_tasks(cfg, model, encoders[label], world)
            print_results(label, matrix[label], world)
            del model
        if world.is_main:
            (out_dir / "eval.json").write_text(json.dumps(matrix, indent=2))
            table = markdown_matrix(matrix)
            confusions = [f"\nGreedy answers, {label} on {task} (rows: gold):\n\n"
                          + confusion_table(r["confusion"])
                          for label, row in matrix.items() for task, r in row.items()
                          if len({a for v in r["confusion"].values() for a in v}) <= 30]
            (out_dir / "eval.md").write_text(table + "".join(confusions))
            print(table + "".join(confusions))
        return matrix
