"""The packed forwards' host data path: the native ops (csrc/packing.cpp) against their Python
reference and transformers' get_rope_index, on one step of a prompt-heavy VLM batch.

The step: P prompts of one 448x448 image (a 32x32 patch grid: 256 image tokens after the 2x2
merge) between ~50 text tokens, left-padded to the longest; G completions per prompt of 32-128
tokens (uniform draws). Measured (median of --repeat runs, one thread, as the trainer's main
thread runs them):
  rope       the prompts' 3-D mRoPE positions: native rope_positions, the Python reference,
             and Qwen2-VL's get_rope_index (transformers, the model-side computation)
  pack       the whole step's packing metadata in micro-batches of 16384 positions
             (packing.plan_micro_batches + pack_layout), shared prefix and plain packing:
             native and Python
Targets (issue 15): native >= 10x faster than get_rope_index and than the Python packing. The
data path's share of a whole step is bench/step.py's pack_share column (target < 2%).

    python bench/packing.py [--prompts 16 --G 8 --repeat 20] [--save-results]
    mr1fast bench packing [same options]
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402

IMAGE_TOKEN, MERGE = 7, 2
TARGET = 10.0


def prompts(P: int, seed: int):
    """Token ids [P, L] (left-padded), attention mask, image grids [P, 3]: one 448x448 image
    per prompt between 40-60 text tokens."""
    import torch

    rng = random.Random(seed)
    rows = []
    for _ in range(P):
        before = [rng.randrange(10, 600) for _ in range(rng.randint(10, 15))]
        after = [rng.randrange(10, 600) for _ in range(rng.randint(30, 45))]
        rows.append(before + [1] + [IMAGE_TOKEN] * 256 + [2] + after)
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    grid = torch.tensor([[1, 32, 32]] * P)
    return ids, mask, grid


def rope_model():
    """A Qwen2-VL model (tiny dimensions) whose get_rope_index is the comparison."""
    from transformers import Qwen2VLConfig, Qwen2VLModel
    from transformers.utils import logging

    logging.set_verbosity_error()  # the default bos / eos ids lie outside this tiny vocabulary
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=700, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         rope_parameters=dict(rope_type="default", rope_theta=1e4,
                                              mrope_section=[2, 1, 1])),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2,
                           spatial_merge_size=MERGE),
        image_token_id=IMAGE_TOKEN, video_token_id=8, vision_start_token_id=1)
    return Qwen2VLModel(cfg)


def measure(args) -> dict:
    import torch

    from mr1fast.trainer import packing as pk

    if pk.native() is None:
        raise SystemExit("the native extension is not built (bash setup.sh builds it where a "
                         "compiler exists); nothing to compare")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure(args)
    finally:
        torch.set_num_threads(threads)


def _measure(args) -> dict:
    import torch

    from mr1fast.trainer import packing as pk

    ids, mask, grid = prompts(args.prompts, args.seed)
    model = rope_model()
    out = {}
    out["rope/native"] = results.median_time(lambda: pk.rope_positions(
        ids, mask, grid, IMAGE_TOKEN, MERGE, use_native=True), args.repeat)
    out["rope/python"] = results.median_time(lambda: pk.rope_positions(
        ids, mask, grid, IMAGE_TOKEN, MERGE, use_native=False), args.repeat)
    with torch.no_grad():
        out["rope/get_rope_index"] = results.median_time(lambda: model.get_rope_index(
            ids, (ids == IMAGE_TOKEN).int(), grid, attention_mask=mask), args.repeat)
    want, _ = model.get_rope_index(ids, (ids == IMAGE_TOKEN).int(), grid, attention_mask=mask)
    positions, next_pos = pk.rope_positions(ids, mask, grid, IMAGE_TOKEN, MERGE)
    if not torch.equal(positions, want):
        raise RuntimeError("native rope positions differ from get_rope_index")

    rng = random.Random(args.seed + 1)
    B, C = args.prompts * args.G, 128
    lengths = torch.tensor([rng.randint(32, C) for _ in range(B)])
    prompt_of = torch.arange(args.prompts).repeat_interleave(args.G)
    prompt_len = mask.sum(1)
    for shared in (True, False):
        name = "shared_prefix" if shared else "packed"
        micro = pk.plan_micro_batches(range(B), prompt_of.tolist(), lengths.tolist(),
                                      prompt_len.tolist(), 16384, shared)

        def step(use_native):
            for rows in micro:
                pk.pack_layout(torch.tensor(rows), prompt_of, lengths, prompt_len, positions,
                               next_pos, C, shared, use_native=use_native)

        out[f"pack/{name}/native"] = results.median_time(lambda: step(True), args.repeat)
        out[f"pack/{name}/python"] = results.median_time(lambda: step(False), args.repeat)
    return out


def table(t: dict) -> list[str]:
    rows = [("rope: native / get_rope_index", t["rope/get_rope_index"], t["rope/native"]),
            ("rope: native / Python", t["rope/python"], t["rope/native"]),
            ("pack shared_prefix: native / Python", t["pack/shared_prefix/python"],
             t["pack/shared_prefix/native"]),
            ("pack packed: native / Python", t["pack/packed/python"], t["pack/packed/native"])]
    lines = ["| op | baseline ms | native ms | speed-up | target |", "| --- | --- | --- | --- | --- |"]
    for name, base, native in rows:
        x = base / native
        lines.append(f"| {name} | {base * 1e3:.3f} | {native * 1e3:.3f} | {x:.1f}x | "
                     f">= {TARGET:.0f}x: {'met' if x >= TARGET else 'NOT met'} |")
    return lines


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--prompts", type=int, default=16, help="P prompts per step")
    ap.add_argument("--G", type=int, default=8, help="completions per prompt")
    ap.add_argument("--repeat", type=int, default=20, help="timed runs per op (median)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--save-results", action="store_true")
    args = ap.parse_args(argv)
    results.check_args(ap, args, positive=("prompts", "G", "repeat"))
    return args


def main(argv=None) -> int:
    args = parse(argv)
    times = measure(args)
    print(f"{args.prompts} prompts x {args.G} completions, 448x448 images, 1 thread")
    print("\n".join(table(times)))
    if args.save_results:
        shape = {"prompts": args.prompts, "G": args.G, "image_tokens": 256}
        recs = [results.record("packing", k, "host", shape, "int64", "median_s", v, "s")
                for k, v in times.items()]
        print(f"results written to {results.write(recs, 'packing')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
