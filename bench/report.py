"""Writes BENCHMARKS.md from the newest results JSON of each device (bench/results/<device>/):
tables of the kernel suite, the end-to-end step (mr1fast beside TRL), the packing data path and
the rollout benchmark, and a plot of time and peak memory
against V and N per implementation. Never edit BENCHMARKS.md by hand; rerun this.

    python bench/report.py [--out BENCHMARKS.md]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import layouts  # noqa: E402
import packing  # noqa: E402
import results  # noqa: E402
import step  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def newest(device_dir: Path, prefix: str):
    files = sorted(device_dir.glob(f"{prefix}-*.json"))
    return (files[-1], json.loads(files[-1].read_text())) if files else (None, None)


def value(recs, op, impl, mode, shape, metric):
    for r in recs:
        if (r["op"], r["impl"], r["mode"], r["metric"]) == (op, impl, mode, metric) \
                and r["shape"] == shape:
            return r["value"]
    return None


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def kernel_tables(recs) -> list[str]:
    shapes = []
    for r in recs:
        if r["op"] == "grpo_loss" and r["shape"] not in shapes:
            shapes.append(r["shape"])
    out = []
    for op in ("grpo_loss", "token_logprobs"):
        impls = [i for i in ("triton", "torch", "naive", "liger", "cublas_floor", "mm_floor")
                 if any(r["op"] == op and r["impl"] == i for r in recs)]
        # The floor ratio from the interleaved pair (bench_grpo_loss.test_floor_interleaved)
        pair = [(i, f) for i in ("triton", "torch") for f in ("cublas_floor", "mm_floor")
                if op == "grpo_loss" and any(r["metric"] == "time_interleaved" and r["impl"] == i
                                             for r in recs)
                and any(r["metric"] == "time_interleaved" and r["impl"] == f for r in recs)]
        liger = op == "grpo_loss" and any(r["metric"] == "time_interleaved" and
                                          r["impl"] == "liger" for r in recs)
        extra = [f"{i} / {f} (interleaved)" for i, f in pair[:1]] + \
            [f"{i} / liger (interleaved)" for i, _ in pair[:1] if liger]
        out += [f"**{op}**, forward + backward: median time (ms) / extra peak memory (MiB)", "",
                "| N | d | V | " + " | ".join(impls + extra) + " |",
                "| --- | --- | --- | " + " | ".join("---" for _ in impls + extra) + " |"]
        for s in shapes:
            cells = [f"{_fmt(value(recs, op, i, 'fwd_bwd', s, 'time'), '.1f')} / "
                     f"{_fmt(value(recs, op, i, 'fwd_bwd', s, 'extra_peak_memory'), '.0f')}"
                     for i in impls]
            for i, f in pair[:1]:
                a, b = (value(recs, op, x, "fwd_bwd", s, "time_interleaved") for x in (i, f))
                cells.append(f"{a:.1f} / {b:.1f} = {a / b:.2f}x" if a and b else "-")
                if liger:
                    c = value(recs, op, "liger", "fwd_bwd", s, "time_interleaved")
                    cells.append(f"{a:.1f} / {c:.1f} = {a / c:.2f}x" if a and c else "-")
            out.append(f"| {s['N']} | {s['d']} | {s['V']} | " + " | ".join(cells) + " |")
        out.append("")
    return out


def scaling_plot(recs, path: Path) -> bool:
    """Time and memory of grpo_loss fwd+bwd against V and against N (the scans' base point
    elsewhere), one line per implementation."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = [r["shape"] for r in recs if r["op"] == "grpo_loss" and r["metric"] == "time"]
    if not shapes:
        return False
    base = shapes[0]
    fig, axes = plt.subplots(2, 2, figsize=(10, 7))
    for col, axis in enumerate(("V", "N")):
        line = sorted({s[axis] for s in shapes if all(s[k] == base[k] for k in s if k != axis)})
        for row, (metric, unit) in enumerate((("time", "ms"), ("extra_peak_memory", "MiB"))):
            ax = axes[row][col]
            for impl in ("triton", "torch", "naive", "liger", "cublas_floor", "mm_floor"):
                pts = [(x, value(recs, "grpo_loss", impl, "fwd_bwd", dict(base, **{axis: x}),
                                 metric)) for x in line]
                pts = [(x, y) for x, y in pts if y is not None]
                if pts:
                    ax.plot(*zip(*pts), marker="o", label=impl)
            ax.set_xscale("log", base=2)
            ax.set_xlabel(f"{axis} ({', '.join(f'{k}={v}' for k, v in base.items() if k != axis)})")
            ax.set_ylabel(f"{metric} ({unit})")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=8)
    fig.suptitle(f"grpo_loss forward + backward, {recs[0]['device']}, commit {recs[0]['commit']}")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return True


def rollout_table(recs) -> list[str]:
    rows = ["| P x G x C | " + " | ".join(("transformers generate (tok/s)", "vLLM (tok/s)",
                                           "vLLM / generate")) + " |", "| --- | --- | --- | --- |"]
    for r in recs:
        if r["op"] == "rollout" and r["impl"] == "hf":
            s = r["shape"]
            v = value(recs, "rollout", "vllm", "generate", s, "tokens_per_s")
            rows.append(f"| {s['prompts']} x {s['G']} x {s['tokens']} | {r['value']:.0f} | "
                        f"{_fmt(v, '.0f')} | {_fmt(v and v / r['value'], '.2f')} |")
    for r in recs:
        if r["op"] in ("weight_sync", "engine_start"):
            extra = f", {r['shape']['params'] / 1e6:.2f} M params" if "params" in r["shape"] else ""
            rows.append(f"\n{r['op']} ({r['mode']}{extra}): {r['value'] * 1e3:.1f} ms"
                        if r["unit"] == "s" and r["value"] < 1 else
                        f"\n{r['op']} ({r['mode']}{extra}): {r['value']:.1f} s")
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    args = ap.parse_args(argv)
    lines = ["# Benchmarks", "",
             "Generated by `python bench/report.py` from the newest results JSON of each device "
             "in `bench/results/`; do not edit by hand. Methods: `bench/bench_grpo_loss.py` "
             "(kernels), `bench/step.py` (one GRPO-D step, beside TRL's GRPOTrainer), "
             "`bench/layouts.py` (reference + update per sequence layout), `bench/packing.py` "
             "(the packing data path), `bench/rollout.py` (rollouts, weight sync). Times are medians; on "
             "these shared CPU machines run-to-run noise is about +-20%, so compare ratios "
             "within one run (`bench/compare.py`).", ""]
    for device_dir in sorted(p for p in results.RESULTS_DIR.iterdir() if p.is_dir()):
        kpath, krecs = newest(device_dir, "kernels")
        rpath, rrecs = newest(device_dir, "rollout")
        spath, srecs = newest(device_dir, "step")
        ppath, precs = newest(device_dir, "packing")
        lpath, lrecs = newest(device_dir, "layouts")
        if not any((krecs, rrecs, srecs, precs, lrecs)):
            continue
        lines += [f"## {device_dir.name}", ""]
        if krecs:
            r0 = krecs[0]
            lines += [f"Kernels: `{kpath.relative_to(ROOT)}` (commit {r0['commit']}, "
                      f"{r0['date']}, torch {r0['versions'].get('torch')}, dtype {r0['dtype']}).",
                      ""] + kernel_tables(krecs)
            png = device_dir / "scaling.png"
            if scaling_plot(krecs, png):
                lines += [f"![time and memory against V and N]({png.relative_to(ROOT)})", ""]
        if srecs:
            r0 = srecs[0]
            sh = r0["shape"]
            tokens = f"{sh['min_tokens']}-{sh['tokens']} tokens (drawn lengths), " \
                f"{sh['image_size']}px images" if "min_tokens" in sh else \
                f"{sh['tokens']} tokens (fixed length)"
            lines += [f"End-to-end GRPO-D step (rollout + rewards + reference + update), "
                      f"{sh['prompts']} prompts x G={sh['G']} x {tokens}, "
                      f"{r0['dtype']}, medians over the measured steps: "
                      f"`{spath.relative_to(ROOT)}` (commit {r0['commit']}, {r0['date']}). "
                      "peak: the process's peak RSS (CPU) or max-allocated (CUDA) during the "
                      "measured steps; step: that peak minus the memory in use before them.",
                      ""] + step.table(*step.rows_from_records(srecs)) + [""]
        if lrecs:
            r0 = lrecs[0]
            sh = r0["shape"]
            lines += [f"Reference + update passes per layout, interleaved in one process, "
                      f"{sh['prompts']} prompts x G={sh['G']} x {sh['min_tokens']}-"
                      f"{sh['tokens']} tokens, {sh['image_size']}px images, {r0['dtype']}: "
                      f"`{lpath.relative_to(ROOT)}` (commit {r0['commit']}, {r0['date']}).", ""]
            by_model: dict = {}
            for r in lrecs:
                by_model.setdefault(r["shape"]["model"], {})[f"{r['impl']}/{r['metric']}"] = \
                    r["value"]
            for m, r in by_model.items():
                lines += layouts.table(m, r) + [""]
        if precs:
            r0 = precs[0]
            lines += [f"The packed forwards' host data path, {r0['shape']['prompts']} prompts "
                      f"x G={r0['shape']['G']}, one thread, medians: "
                      f"`{ppath.relative_to(ROOT)}` (commit {r0['commit']}, {r0['date']}).", ""]
            lines += packing.table({r["impl"]: r["value"] for r in precs}) + [""]
        if rrecs:
            r0 = rrecs[0]
            lines += [f"Rollouts, fixed-length generation: `{rpath.relative_to(ROOT)}` "
                      f"(commit {r0['commit']}, {r0['date']}).", ""] + rollout_table(rrecs) + [""]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
