"""Supervised fine-tuning: the paper's SFT baseline, and the embedded default's format warm-up.

The target of a row is `<think> {thinking} </think> <answer> {answer} </answer><|im_end|>`
(the row's "thinking" column when it has one, else sft.thinking). The loss is the mean NLL of the
target tokens from token_logprobs on the LM head's input: no logits are materialized.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from . import token_logprobs
from .checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import Config
from .data import Example, answer_text
from .metrics import MetricsLogger, Progress, plot_metrics
from .model import PromptEncoder, completion_hidden, encode_images, lm_head_weight
from .runtime import (DataOrder, NonFiniteGuard, clip_and_check, log, lr_at, make_optimizer,
                      micro_batches, setup_run, total_steps)


def sft_target(example: Example, thinking: str) -> str:
    think = example.row.get("thinking") or thinking
    return f"<think> {think} </think> <answer> {answer_text(example.solution)} </answer>"


def encode_targets(encoder: PromptEncoder, texts: list[str], device) -> tuple[torch.Tensor,
                                                                              torch.Tensor]:
    """Right-padded target ids [B, C] ending with <|im_end|>, and their mask [B, C]."""
    end = encoder.tokenizer.convert_tokens_to_ids("<|im_end|>")
    rows = [encoder.tokenizer(t, add_special_tokens=False)["input_ids"] + [end] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), encoder.tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros(len(rows), width)
    for i, r in enumerate(rows):
        ids[i, :len(r)] = torch.tensor(r)
        mask[i, :len(r)] = 1
    return ids.to(device), mask.to(device)


def sft_step(cfg: Config, model, encoder: PromptEncoder, examples: list[Example],
             device) -> torch.Tensor:
    """Accumulates the gradient of the batch's mean target NLL; returns the loss."""
    prompts = encoder.encode_examples(examples, device)
    ids, mask = encode_targets(encoder, [sft_target(e, cfg.sft.thinking) for e in examples],
                               device)
    total = torch.zeros(())
    n_tokens = mask.sum()
    for idx in micro_batches(len(examples), cfg.sft.micro_batch_size):
        sub = prompts.select(idx)
        feats = encode_images(model, sub)
        hidden = completion_hidden(model, sub, feats, torch.arange(len(idx)), ids[idx], mask[idx])
        logp = token_logprobs(hidden, lm_head_weight(model), ids[idx], impl=cfg.model.impl)
        loss = -(logp * mask[idx]).sum() / n_tokens
        loss.backward()
        total = total + loss.detach().cpu()
    return total


def train_sft(cfg: Config, model, encoder: PromptEncoder, train_set: list[Example], *,
              steps: int, run_dir: Path, resume: bool = False) -> dict:
    """`steps` optimizer steps of SFT on `model` in place; metrics and checkpoints go to
    run_dir, the final model to run_dir/checkpoints/final (a Hugging Face checkpoint)."""
    s = cfg.sft
    device = next(model.parameters()).device
    run_dir.mkdir(parents=True, exist_ok=True)
    optimizer = make_optimizer(model, s.lr, s.weight_decay)
    order = DataOrder(len(train_set), s.batch_size, cfg.seed + 1)
    start = 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = load_checkpoint(ckpt, model, optimizer)
        start = state["step"]
        order = DataOrder(len(train_set), s.batch_size, cfg.seed + 1, **state["data"])
        log(f"resumed SFT from {ckpt} at step {start}")
    guard = NonFiniteGuard(cfg.grpo.max_bad_steps)
    logger = MetricsLogger(run_dir, resume=start > 0)
    logger.truncate_after(start + 1)
    progress = Progress(steps, initial=start, desc="sft",
                        disable=None if cfg.log.progress else True)
    metrics: dict = {}
    try:
        for step in range(start, steps):
            t0 = time.perf_counter()
            lr = lr_at(step, steps, s.lr, s.lr_schedule, s.warmup_ratio)
            for group in optimizer.param_groups:
                group["lr"] = lr
            examples = [train_set[i] for i in order.next()]
            loss = sft_step(cfg, model, encoder, examples, device)
            ok, grad_norm = clip_and_check(model, s.max_grad_norm, loss, guard, step)
            if ok:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            metrics = {"loss": float(loss), "lr": lr, "grad_norm": grad_norm,
                       "step_seconds": time.perf_counter() - t0, "skipped_steps": guard.skipped}
            logger.log(step + 1, metrics)
            progress.update(metrics)
            if resume and ((step + 1) % cfg.log.save_every == 0 or step + 1 == steps):
                save_checkpoint(run_dir, step + 1, model, encoder, optimizer,
                                {"step": step + 1, "data": order.state()},
                                keep=cfg.log.keep_checkpoints)
    finally:
        progress.close()
        logger.close()
        plot_metrics(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    save_checkpoint(run_dir, steps, model, encoder, None, {"step": steps, "data": order.state()},
                    name="final")
    return metrics


def run_sft(cfg: Config) -> dict:
    """`mr1fast sft`: the SFT baseline as configured, resumable, evaluated at the end."""
    from .evaluate import evaluate_tasks, print_results

    run_dir, _, encoder, model, train_set = setup_run(cfg)
    steps = total_steps(len(train_set), cfg.sft.batch_size, cfg.sft.epochs, cfg.sft.max_steps)
    metrics = train_sft(cfg, model, encoder, train_set, steps=steps, run_dir=run_dir,
                        resume=True)
    results = {"final": evaluate_tasks(cfg, model, encoder)}
    print_results("after SFT", results["final"])
    (run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return {"metrics": metrics, "eval": results, "steps": steps, "run_dir": str(run_dir)}
