"""The reference and update passes of one GRPO step in each layout (model.packing), interleaved
in one process: the A/B measurement behind issue 15's target (the shared prefix >= 2x faster
than padded in reference + update), without the rollout's and the machine's drift between
bench/step.py's child processes.

The step: P prompts of synthetic counting data with image_size x image_size images, G
completions each of lengths drawn from [LO, HI] (random token ids: the cost does not depend
on them), a frozen vision tower (features computed once, outside the timing). Per layout and
repeat: `ref` = the reference log-probs (grpo.logprobs: no-grad forward + token_logprobs),
`update` = grpo_loss forward + backward over the step's micro-batches (one: the whole batch).
The layouts run in turn, `--repeat` rounds; medians over the rounds after the first. Also
checked: every layout's reference log-probs equal the padded ones (max abs difference shown).

    python bench/layouts.py --models small,tiny-v152k [--prompts 4 --G 8 --tokens 32:128
        --image-size 448 --repeat 4] [--save-results]
    mr1fast bench layouts [same options]
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402

LAYOUTS = ("padded", "packed", "shared_prefix")
TARGET = 2.0


def measure(model_path: str, args) -> dict:
    import torch

    import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers)
    from mr1fast import grpo_loss
    from mr1fast.rollout.sampler import Rollout
    from mr1fast.trainer.data import make_counting, question
    from mr1fast.trainer.forward import StepBatch
    from mr1fast.trainer.grpo import logprobs
    from mr1fast.trainer.model import (Policy, PromptEncoder, encode_images, lm_head_weight,
                                       load_model)
    from mr1fast.trainer.run import MicroBatchFit

    cpu = torch.device(args.device)
    rows = make_counting(args.prompts, seed=args.seed, image_size=args.image_size)
    prompts = PromptEncoder(model_path).encode(
        [[r["image"]] for r in rows], [question(r["problem"]) for r in rows], cpu)
    rng = random.Random(args.seed)
    B, C = args.prompts * args.G, args.tokens
    lengths = torch.tensor([rng.randint(args.min_tokens, C) for _ in range(B)])
    mask = (torch.arange(C)[None] < lengths[:, None]).float().to(cpu)
    ids = torch.randint(10, 600, (B, C), generator=torch.Generator().manual_seed(args.seed))
    ids = ids.to(cpu)
    rollout = Rollout(ids, mask, torch.zeros_like(mask), torch.arange(args.prompts)
                      .repeat_interleave(args.G))
    advantages = torch.randn(B, generator=torch.Generator().manual_seed(1)).to(cpu)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    policies = {m: Policy(load_model(model_path, device=cpu, dtype=dtype, packing=m,
                                     freeze_vision=True)) for m in ("padded", "shared_prefix")}
    with torch.no_grad():
        features = encode_images(policies["padded"].model, prompts)
    from mr1fast.trainer.packing import default_backend

    times = {m: [] for m in LAYOUTS}
    out = {}
    for rnd in range(args.repeat):
        for mode in LAYOUTS:
            policy = policies["padded" if mode == "padded" else "shared_prefix"]
            model = policy.model
            sync = torch.cuda.synchronize if cpu.type == "cuda" else (lambda: None)
            sync()
            t0 = time.perf_counter()
            batch = StepBatch(prompts, rollout, features, mode,
                              default_backend(cpu, mode == "shared_prefix"), 2)
            ref = logprobs(batch, policy, MicroBatchFit(0), "auto", 1.0)
            sync()
            t1 = time.perf_counter()
            for mb in batch.split(0):
                loss, _ = grpo_loss(
                    batch.hidden(model, mb), lm_head_weight(model), batch.take(ids, mb),
                    batch.rows(advantages, mb), mask=batch.take(mask, mb),
                    ref_logp=batch.take(ref, mb), beta=0.04, cu_seqlens=batch.cu_seqlens(mb),
                    check_values=False)
                loss.backward()
            sync()
            t2 = time.perf_counter()
            model.zero_grad(set_to_none=True)
            times[mode].append((t1 - t0, t2 - t1))
            if rnd == 0:
                out[f"{mode}/positions"] = batch.positions
                if mode == "padded":
                    want = ref
                else:
                    out[f"{mode}/max_abs_diff"] = float((ref - want).abs().max())
    for mode, rounds in times.items():
        kept = rounds[1:] if len(rounds) > 1 else rounds
        out[f"{mode}/ref_s"] = statistics.median(r for r, _ in kept)
        out[f"{mode}/update_s"] = statistics.median(u for _, u in kept)
    return out


def table(name: str, r: dict) -> list[str]:
    pad = r["padded/ref_s"] + r["padded/update_s"]
    lines = [f"| {name} | layout | ref s | update s | ref + update s | x padded | positions | "
             "max abs diff |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for mode in LAYOUTS:
        both = r[f"{mode}/ref_s"] + r[f"{mode}/update_s"]
        diff = r.get(f"{mode}/max_abs_diff")
        lines.append(f"| {name} | {mode} | {r[f'{mode}/ref_s']:.3f} | "
                     f"{r[f'{mode}/update_s']:.3f} | {both:.3f} | {pad / both:.2f}x | "
                     f"{r[f'{mode}/positions']} | {'-' if diff is None else f'{diff:.1e}'} |")
    speed = pad / (r["shared_prefix/ref_s"] + r["shared_prefix/update_s"])
    lines.append(f"\n{name}: the shared prefix runs ref + update x{speed:.2f} faster than "
                 f"padded (target >= {TARGET:.0f}): {'met' if speed >= TARGET else 'NOT met'}")
    return lines


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="small,tiny-v152k",
                    help="comma-separated presets (mr1fast.trainer.model.PRESETS) or paths")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--G", type=int, default=8)
    ap.add_argument("--tokens", default="32:128", help="LO:HI completion lengths (or C)")
    ap.add_argument("--image-size", type=int, default=448)
    ap.add_argument("--repeat", type=int, default=4, help="rounds (the first is a warm-up)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--save-results", action="store_true")
    args = ap.parse_args(argv)
    results.check_args(ap, args, positive=("prompts", "G", "repeat"), tokens=True)
    return args


def main(argv=None) -> int:
    args = parse(argv)
    args.device = results.default_device(args.device)
    records = []
    with tempfile.TemporaryDirectory(prefix="mr1fast-layouts-") as tmp:
        for m in [m for m in args.models.split(",") if m]:
            path = results.model_folder(m, Path(tmp), args.seed)
            print(f"[layouts] {m}: {args.prompts}x{args.G} completions of "
                  f"{args.min_tokens}-{args.tokens} tokens, {args.image_size}px images, "
                  f"{args.repeat} rounds", file=sys.stderr, flush=True)
            r = measure(path, args)
            print("\n".join(table(m, r)) + "\n", flush=True)
            shape = {"model": m, "prompts": args.prompts, "G": args.G,
                     "min_tokens": args.min_tokens, "tokens": args.tokens,
                     "image_size": args.image_size, "device": args.device}
            for k, v in r.items():
                mode, metric = k.split("/")
                unit = "s" if metric.endswith("_s") else "positions" \
                    if metric == "positions" else "logprob"
                records.append(results.record("layout_step", mode, "ref+update", shape,
                                              args.dtype, metric, v, unit))
    if args.save_results:
        print(f"results written to {results.write(records, 'layouts')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
