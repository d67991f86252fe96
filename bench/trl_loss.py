"""TRL 1.16's GRPO loss beside mr1fast's drop-in: time and peak memory of the loss part.

One measurement = GRPOTrainer._compute_loss(model, inputs) + backward on one micro-batch of
P prompts x G completions, as GRPOTrainer.training_step runs it: the policy's forward over
prompt + completion, the loss, the backward (no generation, no optimizer step). Providers,
each in its own child process, on the same micro-batch:
  trl        GRPOTrainer's own path: its fused chunked LM head (log-probs and entropies
             [B, T]), then the loss in torch
  trl-liger  GRPOTrainer(use_liger_kernel=True). TRL 1.16 has no Liger GRPO loss: the option
             only applies Liger's layer kernels (RMSNorm, RoPE, SwiGLU) with
             fused_linear_cross_entropy forced off, and the loss is trl's. Liger's kernels are
             Triton: on a CPU-only machine they cannot run, and the row says so.
  mr1fast    mr1fast.integrations.trl.MR1GRPOTrainer: mr1fast.grpo_loss on the last hidden
             state and the LM head's weight (impl="auto": Triton on CUDA, torch on the CPU)
Model: a random-weight preset (default tiny-v152k: Qwen2-VL's 151936-entry vocabulary, the LM
head ~97% of the weights, as in bench/step.py), text-only prompts of --prompt-tokens tokens,
completions of --tokens C or LO:HI tokens (each completion's length drawn, the same draws for
every provider), beta > 0 (a KL term), old log-probs given (ratios != 1).
Reported per provider: time_s (median of --repeats calls after a warm-up), peak_memory (MiB
above the memory in use before the first call, model, batch and gradient buffers included in
that base; CPU: the process's RSS high-water mark; CUDA: max_memory_allocated), and the loss
(trl and mr1fast must agree).

    python bench/trl_loss.py                                  # tiny-v152k, 4 x 8 x 64 tokens
    python bench/trl_loss.py --prompts 2 --G 4 --tokens 16:64 --providers trl,mr1fast
Writes bench/results/<device>/trl_loss-<date>-<commit>.json with --save-results.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402

PROVIDERS = ("trl", "trl-liger", "mr1fast")


def micro_batch(args, trainer, device):
    """The dict _generate_and_score_completions returns, for P x G rows."""
    import torch

    g = torch.Generator().manual_seed(args.seed)
    rng = random.Random(args.seed)
    B, C = args.prompts * args.G, args.tokens
    prompt_ids = torch.randint(10, 600, (B, args.prompt_tokens), generator=g)
    completion_ids = torch.randint(10, 600, (B, C), generator=g)
    lengths = torch.tensor([rng.randint(args.min_tokens, C) for _ in range(B)])
    completion_mask = (torch.arange(C)[None] < lengths[:, None]).long()
    inputs = {"prompt_ids": prompt_ids, "prompt_mask": torch.ones_like(prompt_ids),
              "completion_ids": completion_ids, "completion_mask": completion_mask,
              "advantages": torch.randn(B, generator=g),
              "num_items_in_batch": completion_mask.sum()}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1),
            torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1), C)
    for key in ("old_per_token_logps", "ref_per_token_logps"):
        noise = 0.1 * torch.randn(B, C, generator=g).to(device)
        inputs[key] = (logp + noise) * inputs["completion_mask"]
    return inputs


def measure_loss(args, device, dtype) -> dict:
    """Builds the provider's trainer and measures its _compute_loss + backward."""
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor
    from trl import GRPOConfig, GRPOTrainer

    from mr1fast.integrations.trl import MR1GRPOTrainer
    from mr1fast.trainer.model import load_model

    cuda = device.type == "cuda"
    liger = args.child == "trl-liger"
    model = load_model(args.model_path, device=device, dtype=dtype)
    config = GRPOConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.prompts * args.G,
        num_generations=args.G, max_completion_length=args.tokens, beta=args.beta,
        loss_type=args.loss_type, use_liger_kernel=liger, use_cpu=not cuda,
        bf16=args.dtype == "bf16", report_to="none", save_strategy="no", disable_tqdm=True,
        gradient_checkpointing=False, seed=args.seed)
    cls = MR1GRPOTrainer if args.child == "mr1fast" else GRPOTrainer
    trainer = cls(model=model, reward_funcs=lambda completions, **_: [0.0] * len(completions),
                  args=config, train_dataset=Dataset.from_dict({"prompt": ["x"] * args.G}),
                  processing_class=AutoProcessor.from_pretrained(args.model_path))
    if liger:  # what Trainer.train() does before its first step
        from transformers.integrations.liger import apply_liger_kernel
        apply_liger_kernel(trainer.model, config.liger_kernel_config)
    trainer.current_gradient_accumulation_steps = 1
    trainer.model.train()
    for p in trainer.model.parameters():  # the gradient buffers exist before the measurement
        p.grad = torch.zeros_like(p) if p.requires_grad else None
    inputs = micro_batch(args, trainer, device)

    def step():
        loss = trainer._compute_loss(trainer.model, inputs)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()
        return loss.item()

    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        base = results.reset_peak_rss() / 1024
    loss = step()
    peak = (torch.cuda.max_memory_allocated() / 2**20 if cuda
            else results.status_kib("VmHWM") / 1024) - base
    return {"loss": loss, "peak_memory": peak, "time_s": results.median_time(step, args.repeats)}


def child(args) -> int:
    import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers and trl)
    import torch

    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    out = {"provider": args.child}
    try:  # a provider that cannot run here is reported, not fatal
        out.update(measure_loss(args, device, dtype))
    except Exception as e:
        out["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
    Path(args.out).write_text(json.dumps(out))
    return 0


def measure(provider: str, model_path: str, args, work: Path) -> dict:
    out = work / f"{provider}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", provider,
           "--model-path", model_path, "--out", str(out), "--work-dir",
           str(work / f"run-{provider}")]
    for k in ("prompts", "G", "prompt_tokens", "repeats", "seed", "device", "dtype", "beta",
              "loss_type"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--tokens", f"{args.min_tokens}:{args.tokens}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True)
    if proc.returncode != 0 or not out.is_file():
        tail = "" if args.verbose else (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{provider} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(out.read_text())


def table(rows: list[dict]) -> list[str]:
    base = next((r for r in rows if r["provider"] == "trl" and "error" not in r), None)
    lines = ["| provider | time s | peak MiB | loss | time / trl | peak / trl |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['provider']} | - | - | - | could not run: {r['error']} | |")
            continue
        rel = [f"{r[k] / base[k]:.2f}x" if base and base[k] > 0 else "-"
               for k in ("time_s", "peak_memory")]
        lines.append(f"| {r['provider']} | {r['time_s']:.3f} | {r['peak_memory']:.0f} | "
                     f"{r['loss']:.6g} | {rel[0]} | {rel[1]} |")
    return lines


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny-v152k", help="a preset of mr1fast.trainer.model "
                    "(tiny, tiny-v152k, small, ...) or a Qwen2-VL checkpoint folder")
    ap.add_argument("--providers", default=",".join(PROVIDERS))
    ap.add_argument("--prompts", type=int, default=4, help="P prompts")
    ap.add_argument("--G", type=int, default=8, help="completions per prompt")
    ap.add_argument("--tokens", default="64",
                    help="completion length: C, or LO:HI (drawn per completion)")
    ap.add_argument("--prompt-tokens", type=int, default=48)
    ap.add_argument("--loss-type", default="dapo", help="GRPOConfig.loss_type (TRL's default)")
    ap.add_argument("--beta", type=float, default=0.04)
    ap.add_argument("--repeats", type=int, default=3, help="measured calls (after a warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--save-results", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    results.add_child_args(ap)
    args = ap.parse_args(argv)
    results.check_args(ap, args, positive=("prompts", "G", "prompt_tokens", "repeats"),
                       tokens=True)
    if args.G < 2:
        ap.error(f"--G must be >= 2 (GRPO groups), got {args.G}")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    args.device = results.default_device(args.device)
    providers = [p for p in args.providers.split(",") if p]
    bad = [p for p in providers if p not in PROVIDERS]
    if bad:
        raise SystemExit(f"--providers: unknown {bad}; expected some of {list(PROVIDERS)}")
    rows, records = [], []
    shape = {"model": args.model, "prompts": args.prompts, "G": args.G, "tokens": args.tokens,
             "min_tokens": args.min_tokens, "prompt_tokens": args.prompt_tokens,
             "loss_type": args.loss_type, "device": args.device}
    with tempfile.TemporaryDirectory(prefix="mr1fast-trl-loss-") as tmp:
        work = Path(tmp)
        path = results.model_folder(args.model, work, args.seed)
        for p in providers:
            print(f"[trl_loss] {p}: {args.prompts}x{args.G} completions of "
                  f"{args.min_tokens}:{args.tokens} tokens on {args.model}", file=sys.stderr,
                  flush=True)
            rows.append(r := measure(p, path, args, work))
            for metric, unit in (("time_s", "s"), ("peak_memory", "MiB"), ("loss", "")):
                if metric in r:
                    records.append(results.record("trl_loss", p, "fwd+bwd", shape, args.dtype,
                                                  metric, r[metric], unit))
    print("\n".join(table(rows)))
    ok = {r["provider"]: r["loss"] for r in rows if "loss" in r}
    if "trl" in ok and "mr1fast" in ok:
        print(f"loss: |mr1fast - trl| / |trl| = "
              f"{abs(ok['mr1fast'] - ok['trl']) / max(abs(ok['trl']), 1e-30):.2e}")
    if args.save_results:
        print(f"results written to {results.write(records, 'trl_loss')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
