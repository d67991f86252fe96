"""Rollout throughput, vLLM against transformers' generate, and the vLLM weight-sync time.

Both samplers produce exactly P * G * C tokens per rollout (fixed-length generation,
ignore_eos) from the same prompts (P images + questions) on the same model; tokens/s is the
median over repeats after a warm-up. The sync time is `VLLMSampler.update_weights` for all
parameters and for the trainable ones only (a frozen vision tower), median over repeats.

    .venv/bin/python bench/rollout.py [--model tiny|PATH] [--repeats 5] [--save-results]

Writes bench/results/<device>/rollout-<date>-<commit>.json with --save-results.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402

SHAPES = [  # (prompts P, completions per prompt G, tokens per completion C)
    (4, 8, 32),     # the embedded default's step
    (16, 8, 128),   # a paper-sized batch (16 x 8), shorter completions
]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="tiny", help="'tiny' (built here) or a checkpoint path")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--save-results", action="store_true")
    args = ap.parse_args(argv)

    from mr1fast.rollout import HFSampler, SamplingParams  # first: the torchvision shim
    from mr1fast.rollout.vllm_sampler import VLLMSampler
    from mr1fast.trainer.data import make_counting, question
    from mr1fast.trainer.distributed import World
    from mr1fast.trainer.grpo import sync_weights
    from mr1fast.trainer.model import Policy, PromptEncoder, init_tiny_model, load_model

    path = args.model
    if path == "tiny":
        path = str(init_tiny_model(Path(tempfile.mkdtemp()) / "tiny", seed=0))
    device = torch.device("cpu")
    encoder = PromptEncoder(path)
    policy = load_model(path, device=device, dtype=torch.float32, freeze_vision=True)
    rows_data = make_counting(max(p for p, _, _ in SHAPES), seed=0)

    def encode(p):
        return encoder.encode([r["image"] for r in rows_data[:p]],
                              [question(r["problem"]) for r in rows_data[:p]], device)
    records, rows = [], []

    def measure(name: str, sampler) -> dict:
        """tokens/s per shape for one sampler; appends the records."""
        rates = {}
        for p, g, c in SHAPES:
            prompts = encode(p)
            params = SamplingParams(max_new_tokens=c, ignore_eos=True)
            out = sampler.generate(prompts, g, params)
            assert out.num_tokens == p * g * c, out.num_tokens
            rates[(p, g, c)] = p * g * c / results.median_time(
                lambda: sampler.generate(prompts, g, params), args.repeats)
            records.append(results.record(
                "rollout", name, "generate",
                {"prompts": p, "G": g, "tokens": c, "model": Path(path).name}, torch.float32,
                "tokens_per_s", rates[(p, g, c)], "tok/s"))
        return rates

    # transformers' generate first: the in-process vLLM engine binds threads when it starts.
    hf_rates = measure("hf", HFSampler(policy, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                                       encoder.multimodal_ids))
    t0 = time.perf_counter()
    vllm = VLLMSampler(path, stop_ids=encoder.stop_ids, pad_id=encoder.tokenizer.pad_token_id,
                       suppress_ids=encoder.multimodal_ids,
                       max_model_len=512, max_num_seqs=max(p * g for p, g, _ in SHAPES))
    start_s = time.perf_counter() - t0
    sync_weights(vllm, Policy(policy), World())
    records.append(results.record("engine_start", "vllm", "init", {"model": Path(path).name},
                                  torch.float32, "seconds", start_s, "s"))
    vllm_rates = measure("vllm", vllm)
    for (p, g, c), rate in vllm_rates.items():
        rows.append(f"P={p:3d} G={g} C={c:4d}  hf {hf_rates[(p, g, c)]:9.0f} tok/s   "
                    f"vllm {rate:9.0f} tok/s   x{rate / hf_rates[(p, g, c)]:.2f}")

    n_params = sum(t.numel() for t in policy.parameters())
    n_train = sum(t.numel() for t in policy.parameters() if t.requires_grad)
    full = results.median_time(lambda: vllm.update_weights(policy.named_parameters()), args.repeats)
    part = results.median_time(lambda: sync_weights(vllm, Policy(policy), World()), args.repeats)
    for mode, sec, n in (("all", full, n_params), ("trainable", part, n_train)):
        records.append(results.record("weight_sync", "vllm", mode, {"params": n,
                                      "model": Path(path).name}, torch.float32, "seconds", sec,
                                      "s"))
        rows.append(f"weight sync ({mode}, {n / 1e6:.2f} M params): {sec * 1e3:.1f} ms")
    rows.append(f"engine start: {start_s:.1f} s")
    print("\n".join(rows))
    if args.save_results:
        print(f"results written to {results.write(records, 'rollout')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
