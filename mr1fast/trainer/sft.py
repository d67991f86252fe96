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

from ..loss import token_logprobs
from .checkpoint import latest_checkpoint
from .config import Config
from .data import DataOrder, Example, answer_text
from .evaluate import evaluate_tasks, print_results
from .model import PromptEncoder, completion_hidden, encode_images, lm_head_weight
from .run import MicroBatchFit, Run, locked_output_dir, log, setup, total_steps


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


def train_sft(cfg: Config, model, encoder: PromptEncoder, train_set: list[Example], *,
              steps: int, run_dir: Path, resumable: bool = False) -> dict:
    """`steps` optimizer steps of SFT on `model` in place; metrics (and, when resumable,
    checkpoints) go to run_dir, the final model to run_dir/checkpoints/final (a Hugging Face
    checkpoint). Loss: the mean NLL of the batch's target tokens."""
    device = next(model.parameters()).device
    order = DataOrder(len(train_set), cfg.sft.batch_size, cfg.seed + 1)
    fit = MicroBatchFit(cfg.sft.micro_batch_size)
    metrics: dict = {}
    resume_from = latest_checkpoint(run_dir, log) if resumable else None
    with Run(cfg, cfg.sft, run_dir, model, encoder, order, steps, desc="sft",
             resumable=resumable, resume_from=resume_from) as run:
        for step in run.steps():
            t0 = time.perf_counter()
            lr = run.set_lr(step)
            examples = [train_set[i] for i in run.order.next()]
            prompts = encoder.encode_examples(examples, device)
            ids, mask = encode_targets(
                encoder, [sft_target(e, cfg.sft.thinking) for e in examples], device)
            for attempt in fit.attempts(len(examples), on_retry=run.zero_grad):
                with attempt:
                    loss = torch.zeros((), device=device)
                    for rows in attempt.micro_batches:
                        sub = prompts.select(torch.arange(len(examples))[rows])
                        hidden = completion_hidden(model, sub, encode_images(model, sub),
                                                   torch.arange(len(sub)), ids[rows], mask[rows])
                        logp = token_logprobs(hidden, lm_head_weight(model), ids[rows],
                                              impl=cfg.model.impl, check_values=False)
                        micro = -torch.where(mask[rows] > 0, logp, 0.0).sum() / mask.sum()
                        micro.backward()
                        loss = loss + micro.detach()
            _, grad_norm = run.optimizer_step(loss)
            metrics = {"loss": float(loss), "lr": lr, "grad_norm": grad_norm,
                       "step_seconds": time.perf_counter() - t0}
            run.end_step(step, metrics)
        run.save(steps, name="final")
    return metrics


def run_sft(cfg: Config) -> dict:
    """`mr1fast sft`: the SFT baseline as configured, resumable, evaluated at the end. The
    output folder is locked for the run."""
    with locked_output_dir(cfg):
        return _run_sft(cfg)


def _run_sft(cfg: Config) -> dict:
    s = setup(cfg, per_step=cfg.sft.batch_size, per_step_key="sft.batch_size")
    steps = total_steps(len(s.train_set), cfg.sft.batch_size, cfg.sft.epochs, cfg.sft.max_steps)
    metrics = train_sft(cfg, s.model, s.encoder, s.train_set, steps=steps, run_dir=s.run_dir,
                        resumable=True)
    results = {"final": evaluate_tasks(cfg, s.model, s.encoder)}
    print_results("after SFT", results["final"])
    (s.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
    return {"metrics": metrics, "eval": results, "steps": steps, "run_dir": str(s.run_dir)}
