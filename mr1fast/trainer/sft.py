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
from .checkpoint import latest_checkpoint, save_final
from .config import Config
from .data import DataOrder, Example, answer_text
from .distributed import World
from .evaluate import evaluate_tasks, print_results
from ..rollout.sampler import Rollout
from .forward import StepBatch
from .model import PromptEncoder, lm_head_weight, load_model
from .run import MicroBatchFit, Run, distributed_run, log, setup, total_steps


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


def train_sft(cfg: Config, policy, encoder: PromptEncoder, train_set: list[Example], *,
              steps: int, run_dir: Path, world: World = World(), resumable: bool = False,
              packing: str = "padded", attention: str = "sdpa") -> dict:
    """`steps` optimizer steps of SFT on `policy` (a Policy wrapper; sharded under torchrun) in
    place; metrics (and, when resumable, checkpoints) go to run_dir, the final model to
    run_dir/checkpoints/final (a Hugging Face checkpoint). Loss: the mean NLL of the global
    batch's target tokens; each rank takes its share of every batch."""
    device = next(policy.parameters()).device
    order = DataOrder(len(train_set), cfg.sft.batch_size, cfg.seed + 1)
    fit = MicroBatchFit(cfg.sft.micro_batch_size if packing == "padded"
                        else cfg.sft.max_tokens_per_micro_batch, retry=not world.distributed)
    merge = policy.model.config.vision_config.spatial_merge_size
    metrics: dict = {}
    resume_from = world.broadcast(latest_checkpoint(run_dir, log) if resumable and world.is_main
                                  else None)
    with Run(cfg, cfg.sft, run_dir, policy, encoder, order, steps, world, desc="sft",
             resumable=resumable, resume_from=resume_from) as run:
        for step in run.steps():
            t0 = time.perf_counter()
            lr = run.set_lr(step)
            indices = run.order.next()
            examples = [train_set[i] for i in indices[world.my_share(len(indices))]]
            prompts = encoder.encode_examples(examples, device)
            ids, mask = encode_targets(
                encoder, [sft_target(e, cfg.sft.thinking) for e in examples], device)
            total_tokens = world.sum(mask.sum().clone())
            targets = Rollout(ids, mask, torch.zeros_like(mask), torch.arange(len(examples)))
            batch = StepBatch(prompts, targets, None, packing, attention, merge, world)
            for attempt in fit.attempts(batch.units(), on_retry=run.zero_grad,
                                        split=batch.split):
                with attempt:
                    loss = torch.zeros((), device=device)
                    for mb in attempt.micro_batches:
                        logp = policy(lambda m: token_logprobs(
                            batch.hidden(m, mb), lm_head_weight(m), batch.take(ids, mb),
                            impl=cfg.model.impl, check_values=False))
                        nll = -torch.where(batch.take(mask, mb) > 0, logp, 0.0).sum()
                        micro = nll / total_tokens * mb.real
                        micro.backward()
                        loss = loss + micro.detach()
            _, grad_norm = run.optimizer_step(loss)
            metrics = {"loss": float(world.sum(loss.reshape(1).clone())), "lr": lr,
                       "grad_norm": grad_norm, "step_seconds": time.perf_counter() - t0}
            run.end_step(step, metrics)
    save_final(run_dir, "final", policy.model, encoder, world)
    return metrics


def run_sft(cfg: Config) -> dict:
    """`mr1fast sft`: the SFT baseline as configured, resumable, evaluated at the end; in one
    process or sharded under torchrun. The output folder is locked for the run."""
    with distributed_run(cfg) as (world, device):
        s = setup(cfg, world, device, per_step={"sft.batch_size": cfg.sft.batch_size})
        steps = total_steps(len(s.train_set), cfg.sft.batch_size, cfg.sft.epochs,
                            cfg.sft.max_steps)
        metrics = train_sft(cfg, s.policy, s.encoder, s.train_set, steps=steps,
                            run_dir=s.run_dir, world=world, resumable=True,
                            packing=s.packing, attention=s.attention)
        final = s.model if not world.distributed else load_model(
            str(s.run_dir / "checkpoints" / "final"), device=device, dtype=s.dtype,
            trainable=False)
        results = {"final": evaluate_tasks(cfg, final, s.encoder, world)}
        print_results("after SFT", results["final"], world)
        if world.is_main:
            (s.run_dir / "eval.json").write_text(json.dumps(results, indent=2))
        return {"metrics": metrics, "eval": results, "steps": steps, "run_dir": str(s.run_dir)}
