"""Kernel regression check against the device's committed baseline.

Absolute times drift with the machine's load, so each implementation's time is taken as a
ratio against naive (TRL's full-logits path) measured in the same run, for the same op, mode
and shape. A ratio regresses when it exceeds the baseline's median ratio by more than the
threshold, max(--min-threshold, 3 x noise), where noise is the largest relative deviation of
that ratio from its median over the baseline's repeat runs.

    python bench/compare.py RUN.json [--baseline PATH]           exit 1 on a regression
    python bench/compare.py --make-baseline RUN1.json RUN2.json RUN3.json [-o PATH]

The baseline defaults to bench/results/<device>/baseline.json (the device of RUN.json).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import results  # noqa: E402

MIN_THRESHOLD = 0.10


def ratios(records: list[dict]) -> dict[str, float]:
    """'op|impl|mode|N,d,V' -> time / naive's time (same op, mode, shape, run)."""
    def key(r, impl):
        shape = ",".join(f"{k}={v}" for k, v in sorted(r["shape"].items()))
        return f"{r['op']}|{impl}|{r['mode']}|{shape}"

    times = {key(r, r["impl"]): r["value"] for r in records if r["metric"] == "time"}
    out = {}
    for k, t in times.items():
        op, impl, mode, shape = k.split("|")
        naive = times.get(f"{op}|naive|{mode}|{shape}")
        if impl != "naive" and naive:
            out[k] = t / naive
    return out


def make_baseline(paths: list[str]) -> dict:
    runs = [ratios(json.loads(Path(p).read_text())) for p in paths]
    if len(runs) < 2:
        raise SystemExit("--make-baseline: give at least 2 repeat runs (noise needs them)")
    first = json.loads(Path(paths[0]).read_text())[0]
    entries = {}
    for k in sorted(set.intersection(*(set(r) for r in runs))):
        values = [r[k] for r in runs]
        med = statistics.median(values)
        noise = max(abs(v - med) / med for v in values)
        entries[k] = {"ratio": med, "noise": noise,
                      "threshold": max(MIN_THRESHOLD, 3 * noise)}
    return {"device": first["device"], "runs": [Path(p).name for p in paths],
            "commits": sorted({json.loads(Path(p).read_text())[0]["commit"] for p in paths}),
            "min_threshold": MIN_THRESHOLD, "ratios": entries}


def compare(run_path: str, baseline_path: str | None) -> int:
    records = json.loads(Path(run_path).read_text())
    if baseline_path is None:
        baseline_path = str(results.RESULTS_DIR / results._slug(records[0]["device"])
                            / "baseline.json")
    if not Path(baseline_path).is_file():
        print(f"no baseline at {baseline_path}; make one with --make-baseline", file=sys.stderr)
        return 2
    base = json.loads(Path(baseline_path).read_text())["ratios"]
    now = ratios(records)
    failed, checked = [], 0
    for k, ref in base.items():
        if k not in now:
            continue
        checked += 1
        change = now[k] / ref["ratio"] - 1
        flag = "REGRESSED" if change > ref["threshold"] else "ok"
        if flag != "ok":
            failed.append(k)
        print(f"{flag:9s} {k}: {now[k]:.3f} vs {ref['ratio']:.3f} ({change:+.0%}, "
              f"threshold {ref['threshold']:.0%})")
    print(f"{checked} ratios checked against {baseline_path}: {len(failed)} regressed")
    return 1 if failed else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("runs", nargs="+", help="results JSON (bench/results/<device>/kernels-*)")
    ap.add_argument("--baseline")
    ap.add_argument("--make-baseline", action="store_true")
    ap.add_argument("-o", "--output")
    args = ap.parse_args(argv)
    if args.make_baseline:
        base = make_baseline(args.runs)
        out = Path(args.output or results.RESULTS_DIR / results._slug(base["device"])
                   / "baseline.json")
        out.write_text(json.dumps(base, indent=1) + "\n")
        print(f"baseline of {len(base['ratios'])} ratios written to {out}")
        return 0
    if len(args.runs) != 1:
        ap.error("compare takes one run")
    return compare(args.runs[0], args.baseline)


if __name__ == "__main__":
    sys.exit(main())
