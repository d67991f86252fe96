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
from .rewards import RewardRunner
from .run import check_eval_tasks, distributed_run, log


@torch.no_grad()
def evaluate(model, encoder: PromptEncoder, examples: list[Example], score: RewardRunner, *,
             max_new_tokens: int, batch_size: int, world: World = World()) -> dict:
    """{"accuracy", "format", "n", "unscored"} over `examples` with greedy decoding; accuracy in
    %. `score` is a RewardRunner with the "accuracy" and "format" rewards. With several
    processes each evaluates every world.size-th example on its own (unsharded) `model`, and
    the counts are summed."""
    sampler = HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                        encoder.multimodal_ids)
    params = SamplingParams(max_new_tokens=max_new_tokens, greedy=True)
    device = next(model.parameters()).device
    acc = fmt = 0.0
    failed = 0
    mine = examples[world.rank::world.size]
    for i in range(0, len(mine), batch_size):
        batch = mine[i: i + batch_size]
        out = sampler.generate(encoder.encode_examples(batch, device), 1, params)
        texts = encoder.decode(out.completion_ids, out.completion_mask)
        result = score(texts, [e.reward_row() for e in batch])
        acc += sum(v or 0.0 for v in result.values["accuracy"])
        failed += sum(v is None for v in result.values["accuracy"])
        fmt += sum(v or 0.0 for v in result.values["format"])
    acc, fmt, failed = (sum(x) for x in zip(*world.gather((acc, fmt, failed))))
    n = len(examples)
    if failed:
        log(f"eval: the accuracy of {failed} of {n} items could not be computed (counted wrong)",
            world)
    return {"accuracy": 100.0 * acc / n, "format": 100.0 * fmt / n, "n": n,
            "unscored": failed}


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
                                 warn=lambda m: log(m, world))
            out[task] = evaluate(model, encoder, examples, score, world=world,
                                 max_new_tokens=e.max_new_tokens, batch_size=e.batch_size)
    return out


def print_results(title: str, results: dict, world: World = World()) -> None:
    if not world.is_main:
        return
    cells = ", ".join(f"{task} {r['accuracy']:.1f}% (format {r['format']:.0f}%, n={r['n']})"
                      for task, r in results.items())
    print(f"eval {title}: {cells}", flush=True)


def markdown_matrix(matrix: dict) -> str:
    """| model | task A | task B | ... with accuracy in %."""
    tasks = list(next(iter(matrix.values())))
    lines = ["| model | " + " | ".join(tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    for label, row in matrix.items():
        lines.append(f"| {label} | " + " | ".join(f"{row[t]['accuracy']:.2f}" for t in tasks)
                     + " |")
    return "\n".join(lines) + "\n"


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
            (out_dir / "eval.md").write_text(table)
            print(table)
        return matrix
