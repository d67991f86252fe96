"""End-to-end GRPO-D step benchmark, and the same step in TRL's GRPOTrainer side by side.

One step = rollout (transformers' generate) + rewards (accuracy + format) + reference
log-probs + one optimizer update, on P prompts x G completions of synthetic counting data
(image_size x image_size images). Every trainer gets the same checkpoint, the same data, P, G,
the same completion lengths, beta > 0 (so a reference model), mu = 1, the whole batch in one
micro-batch, a frozen vision tower. Completion lengths: --tokens C makes every completion C
tokens; --tokens LO:HI draws each completion's length uniformly from [LO, HI] (the same draws
for every trainer: generation runs HI tokens, then each completion is cut at its length and
ends with the stop token). Each (trainer, model) runs in its own child process: `warmup`
steps, then `steps` measured ones. Reported per trainer and model (medians over the measured
steps):
  tokens_per_s    completion tokens / step seconds
  *_s             seconds per phase: rollout (prompt encoding + generate), reward (decode +
                  reward functions), ref (reference log-probs, advantages), update (policy
                  forward + backward + optimizer step), step (all of it)
  positions       the positions one forward pass over the step computes in the language
                  model, padding included (the reference and the update each run one pass)
  pack_share      host time building the packed layouts / step seconds (mr1fast)
  peak_memory     CPU: the process's peak RSS over the measured steps (weights, optimizer
                  state and libraries included); CUDA: max_memory_allocated
  step_memory     that peak minus the memory in use when the measured steps began

Trainers: mr1fast (model.packing=shared_prefix, the default), mr1fast-packed, mr1fast-padded,
any of them as @N (torchrun on N processes: FSDP2; NCCL on GPUs, gloo on the CPU; the same
global batch), and trl (GRPOTrainer(use_vllm=False), phases timed by wrapping its _generate,
_calculate_rewards and _generate_and_score_completions). mr1fast runs its real trainer
(mr1fast.trainer.grpo.train_grpo).

    python bench/step.py                             # mr1fast and TRL, tiny and tiny-v152k
    python bench/step.py --models tiny-v152k --image-size 448 --tokens 32:128 \
        --trainers mr1fast,mr1fast-packed,mr1fast-padded,trl      # the prompt-heavy VLM step
    python bench/step.py --models qwen2-vl-2b --trainers mr1fast --dtype bf16   # GPU
    python bench/step.py --models tiny-v152k --trainers mr1fast,mr1fast@2       # 2 ranks
    mr1fast bench step [same options]

Writes bench/results/<device>/step-<date>-<commit>.json with --save-results.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import results  # noqa: E402

PHASES = ("rollout_s", "reward_s", "ref_s", "update_s", "step_s")
# mr1fast[-layout][@N]: the layout (model.packing) and N processes under torchrun; mr1fast@1 is
# the FSDP path on one device.
LAYOUTS = {"mr1fast": "shared_prefix", "mr1fast-packed": "packed",
           "mr1fast-padded": "padded"}
TRAINERS = (*LAYOUTS, "trl")
# Issue 5's targets for the 151936-vocabulary model: mr1fast / TRL.
TARGETS = {"tokens_per_s": 2.0, "peak_memory": 0.5}


class Memory:
    """Peak memory from `start()` (the first measured step) to `peak()`, in MiB."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")
        self.base = 0.0

    def start(self) -> None:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated() / 2**20
        else:
            self.base = results.reset_peak_rss() / 1024

    def peak(self) -> float:
        import torch

        if self.cuda:
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() / 2**20
        return results.status_kib("VmHWM") / 1024


class StepRecorder:
    """Collects the measured steps' phases; starts the memory window after the warm-up."""

    def __init__(self, args, memory: Memory):
        self.args, self.memory = args, memory
        self.steps: list[dict] = []
        self.peak = None

    def step_done(self, step: int, phases: dict, completion_length: float,
                  positions: float, pack_s: float = 0.0) -> None:
        lo, hi = self.args.min_tokens, self.args.tokens
        if not lo - 1e-6 <= completion_length <= hi + 1e-6:
            raise RuntimeError(f"step {step}: mean completion length {completion_length}, "
                               f"expected one in [{lo}, {hi}]")
        if step == self.args.warmup:
            self.memory.start()
        elif self.args.warmup < step <= self.args.warmup + self.args.steps:
            B = self.args.prompts * self.args.G
            self.steps.append(dict(phases, tokens=completion_length * B, positions=positions,
                                   pack_s=pack_s))
            if step == self.args.warmup + self.args.steps:
                self.peak = self.memory.peak()

    def result(self) -> dict:
        if self.peak is None:
            raise RuntimeError(f"only {len(self.steps)} of {self.args.steps} steps measured")
        return {"steps": self.steps, "peak_memory": self.peak,
                "step_memory": self.peak - self.memory.base}


class Lengths:
    """--tokens LO:HI: each completion's length, drawn per generate call (the k-th call of every
    trainer gets the same draws)."""

    def __init__(self, args):
        self.args, self.calls = args, 0

    def next(self, n: int) -> list[int]:
        import random

        rng = random.Random(f"{self.args.seed}:{self.calls}")
        self.calls += 1
        return [rng.randint(self.args.min_tokens, self.args.tokens) for _ in range(n)]


def cut_rollouts(args) -> None:
    """HFSampler.generate's completions cut at drawn lengths (each ends with a stop token);
    the width trimmed to the longest, as a sampler that stopped there returns it."""
    import torch

    from mr1fast.rollout.hf_sampler import HFSampler

    lengths, generate = Lengths(args), HFSampler.generate

    def cut(self, prompts, n, params, seeds=None):
        r = generate(self, prompts, n, params, seeds)
        ids, mask = r.completion_ids.clone(), r.completion_mask.clone()
        L = torch.tensor(lengths.next(ids.shape[0]), device=ids.device)
        cols = torch.arange(ids.shape[1], device=ids.device)[None]
        ids[cols == L[:, None] - 1] = self.stop_ids[0]
        mask = mask * (cols < L[:, None])
        ids = ids.masked_fill(mask == 0, self.pad_id)
        width = int(L.max())
        return type(r)(ids[:, :width], mask[:, :width], (r.logprobs * mask)[:, :width],
                       r.prompt_index)

    HFSampler.generate = cut


def counting_rows(args) -> list[dict]:
    from mr1fast.trainer.data import make_counting

    return make_counting(args.rows, seed=args.seed, image_size=args.image_size)


def run_mr1fast(args, recorder: StepRecorder) -> None:
    from mr1fast.trainer.config import embedded_default, from_dict
    from mr1fast.trainer.data import write_examples
    from mr1fast.trainer.grpo import train_grpo

    data = Path(args.work_dir) / "data" / "counting.jsonl"
    if os.environ.get("RANK", "0") == "0" and not data.is_file():
        write_examples(counting_rows(args), data)
    if "RANK" in os.environ:  # the other ranks wait for rank 0's file
        while not data.is_file():
            time.sleep(0.1)
    if args.min_tokens < args.tokens:
        cut_rollouts(args)
    # One step past the measured ones: the run's final checkpoint is saved at its last step,
    # outside the measurement.
    cfg = from_dict({
        "model": {"name": args.model_path, "device": args.device, "dtype": args.dtype,
                  "freeze_vision": True, "gradient_checkpointing": False,
                  "packing": LAYOUTS[args.child.split("@")[0]]},
        "data": {"train": str(data), "max_prompt_length": 4096},
        "grpo": {"num_generations": args.G, "prompts_per_step": args.prompts,
                 "micro_batch_size": 0, "max_tokens_per_micro_batch": 0,
                 "max_steps": args.warmup + args.steps + 1,
                 "max_completion_length": args.tokens, "ignore_eos": True, "lr": args.lr,
                 "sft_warmup_steps": 0, "loss_type": "grpo",
                 "beta_schedule": {"kind": "grpo_d", "beta_min": 0.04, "beta_max": 0.1,
                                   "explore_ratio": 0.3}},
        "eval": {"tasks": {}},
        "log": {"save_every": 10**9, "progress": False},
        "sampler": "hf", "seed": args.seed, "output_dir": args.work_dir + "/run",
        "cache_dir": args.work_dir,
    }, base=embedded_default())

    def on_step(step, m):
        recorder.step_done(step, {"rollout_s": m["rollout_s"], "reward_s": m["reward_s"],
                                  "ref_s": m["ref_s"], "update_s": m["update_s"] + m["sync_s"],
                                  "step_s": m["step_seconds"]}, m["completion_length"],
                           m["positions"], m["pack_s"])

    train_grpo(cfg, on_step=on_step)


def run_trl(args, recorder: StepRecorder) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoProcessor, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from mr1fast.trainer.data import question
    from mr1fast.trainer.model import load_model
    from mr1fast.trainer.rewards import accuracy_reward, format_reward

    rows = counting_rows(args)
    data = Dataset.from_list([
        {"prompt": [{"role": "user", "content": [
            {"type": "image"}, {"type": "text", "text": question(r["problem"])}]}],
         "image": r["image"], "solution": r["solution"]} for r in rows])

    def accuracy(completions, solution, **_):
        return accuracy_reward([c[0]["content"] for c in completions], solution)

    def format_(completions, **_):
        return format_reward([c[0]["content"] for c in completions])

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[args.dtype]
    model = load_model(args.model_path, device=torch.device(args.device), dtype=dtype,
                       freeze_vision=True)
    timers = {"rollout_s": 0.0, "reward_s": 0.0, "prepare_s": 0.0, "positions": 0}

    def timed(method, key):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return method(*a, **k)
            finally:
                timers[key] += time.perf_counter() - t0
        return wrapper

    class Steps(TrainerCallback):
        t0 = 0.0

        def on_step_begin(self, *_, **__):
            timers.update(rollout_s=0.0, reward_s=0.0, prepare_s=0.0, positions=0)
            self.t0 = time.perf_counter()

        def on_step_end(self, a, state, control, **_):
            step_s = time.perf_counter() - self.t0
            lengths = trainer._metrics["train"]["completions/mean_length"]
            recorder.step_done(state.global_step, {
                "rollout_s": timers["rollout_s"], "reward_s": timers["reward_s"],
                "ref_s": timers["prepare_s"] - timers["rollout_s"] - timers["reward_s"],
                "update_s": step_s - timers["prepare_s"], "step_s": step_s}, lengths[-1],
                timers["positions"])

    config = GRPOConfig(
        output_dir=args.work_dir, per_device_train_batch_size=args.prompts * args.G,
        num_generations=args.G, max_completion_length=args.tokens,
        generation_kwargs={"min_new_tokens": args.tokens}, temperature=1.0, top_p=1.0, top_k=0,
        beta=0.04, num_iterations=1, loss_type="grpo", learning_rate=args.lr,
        max_steps=args.warmup + args.steps, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=args.device == "cpu", bf16=args.dtype == "bf16",
        gradient_checkpointing=False, seed=args.seed, disable_tqdm=True,
        dataloader_num_workers=0, model_init_kwargs={"dtype": dtype})
    trainer = GRPOTrainer(model=model, reward_funcs=[accuracy, format_], args=config,
                          train_dataset=data,
                          processing_class=AutoProcessor.from_pretrained(args.model_path),
                          callbacks=[Steps()])
    trainer._generate = timed(trainer._generate, "rollout_s")
    trainer._calculate_rewards = timed(trainer._calculate_rewards, "reward_s")
    score = timed(trainer._generate_and_score_completions, "prepare_s")

    def scored(*a, **k):  # its padded [B, P + C] forward: the positions each pass computes
        out = score(*a, **k)
        timers["positions"] += out["prompt_ids"].numel() + out["completion_ids"].numel()
        return out

    trainer._generate_and_score_completions = scored
    if args.min_tokens < args.tokens:
        lengths, single_turn = Lengths(args), trainer._generate_single_turn
        stop = trainer.processing_class.tokenizer.eos_token_id

        def cut(*a, **k):  # the drawn lengths, each completion ending with the stop token
            ids, logprobs = single_turn(*a, **k)
            L = lengths.next(len(ids))
            ids = [list(c[:n - 1]) + [stop] for c, n in zip(ids, L)]
            if logprobs is not None:
                logprobs = [lp[:n] for lp, n in zip(logprobs, L)]
            return ids, logprobs

        trainer._generate_single_turn = cut
    trainer.train()


def child(args) -> int:
    import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers and trl)
    import torch

    torch.manual_seed(args.seed)
    recorder = StepRecorder(args, Memory(args.device))
    (run_mr1fast if args.child.startswith("mr1fast") else run_trl)(args, recorder)
    if os.environ.get("RANK", "0") == "0":  # under torchrun: rank 0's phases and memory
        Path(args.out).write_text(json.dumps(recorder.result()))
    return 0


def summarize(raw: dict) -> dict:
    """Medians over the measured steps of one child's output, tokens/s and memory."""
    steps = raw["steps"]
    out = {k: statistics.median(s[k] for s in steps) for k in PHASES}
    out["tokens_per_s"] = sum(s["tokens"] for s in steps) / sum(s["step_s"] for s in steps)
    out["positions"] = statistics.median(s["positions"] for s in steps)
    out["pack_share"] = sum(s["pack_s"] for s in steps) / sum(s["step_s"] for s in steps)
    out["peak_memory"], out["step_memory"] = raw["peak_memory"], raw["step_memory"]
    return out


def trainer_available(name: str) -> bool:
    if name.startswith("mr1fast"):
        return True
    import importlib.util

    return importlib.util.find_spec("trl") is not None


def measure(trainer: str, model_path: str, args, work: Path) -> dict:
    """Runs one (trainer, model) in a child process; its summarized measurements."""
    out = work / f"{trainer}-{Path(model_path).name}.json"
    nproc = int(trainer.split("@")[1]) if "@" in trainer else 1
    launcher = [sys.executable] if "@" not in trainer else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc)]
    cmd = [*launcher, str(Path(__file__).resolve()), "--child", trainer,
           "--model-path", model_path, "--out", str(out), "--work-dir",
           str(work / f"run-{trainer}-{Path(model_path).name}")]
    for k in ("prompts", "G", "steps", "warmup", "seed", "rows", "device", "dtype", "lr",
              "image_size"):
        cmd += [f"--{k.replace('_', '-')}", str(getattr(args, k))]
    cmd += ["--tokens", f"{args.min_tokens}:{args.tokens}"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, env=env, capture_output=not args.verbose, text=True)
    if proc.returncode != 0:
        tail = "" if args.verbose else (proc.stdout + proc.stderr)[-4000:]
        raise RuntimeError(f"{trainer} on {model_path} failed (exit {proc.returncode}):\n{tail}")
    return summarize(json.loads(out.read_text()))


COLUMNS = [("tokens_per_s", "tokens/s", ".0f"), ("step_s", "step s", ".3f"),
           ("rollout_s", "rollout s", ".3f"), ("reward_s", "reward s", ".3f"),
           ("ref_s", "ref s", ".3f"), ("update_s", "update s", ".3f"),
           ("positions", "positions", ".0f"), ("pack_share", "pack share", ".4f"),
           ("peak_memory", "peak MiB", ".0f"), ("step_memory", "step MiB", ".0f")]


def table(rows: dict, models: list[str], trainers: list[str]) -> list[str]:
    """A markdown table: per model, each trainer's medians; ratios: mr1fast@N / its one-process
    run, each layout / mr1fast-padded, mr1fast / TRL; the verdicts on the targets (TRL: the
    151936-vocabulary model; the shared prefix: ref + update >= 2x faster than padded)."""
    nan = float("nan")
    lines = ["| model | trainer | " + " | ".join(c[1] for c in COLUMNS) + " |",
             "| --- | --- | " + " | ".join("---" for _ in COLUMNS) + " |"]
    verdicts = []

    def ratio_line(m, name, a, b):
        ratio = {k: a.get(k, nan) / b[k] if b.get(k) else nan for k, _, _ in COLUMNS}
        lines.append(f"| {m} | {name} | " + " | ".join(f"{ratio[k]:.2f}x" for k, _, _ in COLUMNS)
                     + " |")
        return ratio

    for m in models:
        for t in trainers:
            r = rows[(t, m)]
            lines.append(f"| {m} | {t} | " + " | ".join(format(r.get(k, nan), f)
                                                         for k, _, f in COLUMNS) + " |")
        for t in trainers:
            base = t.split("@")[0]
            if "@" in t and base in trainers:
                ratio_line(m, f"{t} / {base}", rows[(t, m)], rows[(base, m)])
        if "mr1fast-padded" in trainers:
            padded = rows[("mr1fast-padded", m)]
            for t in ("mr1fast-packed", "mr1fast"):
                if t in trainers:
                    ratio_line(m, f"{t} / mr1fast-padded", rows[(t, m)], padded)
            if "mr1fast" in trainers:
                a = rows[("mr1fast", m)]
                speed = (padded["ref_s"] + padded["update_s"]) / (a["ref_s"] + a["update_s"])
                verdicts.append(f"{m}: the shared prefix runs ref + update x{speed:.2f} faster "
                                f"than padded (target >= 2): " +
                                ("met" if speed >= 2 else "NOT met"))
        if "trl" in trainers and "mr1fast" in trainers:
            ratio = ratio_line(m, "mr1fast / TRL", rows[("mr1fast", m)], rows[("trl", m)])
            if m == "tiny-v152k":
                verdicts += [f"{k} x{ratio[k]:.2f} (target {'>=' if k == 'tokens_per_s' else '<='}"
                             f" {v}): " + ("met" if (ratio[k] >= v if k == "tokens_per_s"
                                                     else ratio[k] <= v) else "NOT met")
                             for k, v in TARGETS.items()]
    if verdicts:
        lines += ["", "Targets: " + "; ".join(verdicts) + "."]
    return lines


def rows_from_records(recs: list[dict]) -> tuple[dict, list[str], list[str]]:
    """(rows, models, trainers) of table() from the grpo_step records of a results file."""
    rows, models, trainers = {}, [], []
    for r in recs:
        if r["op"] != "grpo_step":
            continue
        m, t = r["shape"]["model"], r["impl"]
        models += [m] if m not in models else []
        trainers += [t] if t not in trainers else []
        rows.setdefault((t, m), {})[r["metric"]] = r["value"]
    return rows, models, trainers


def parse(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,tiny-v152k",
                    help="comma-separated presets (mr1fast.trainer.model.PRESETS) or checkpoint paths")
    ap.add_argument("--trainers", default="mr1fast,trl")
    ap.add_argument("--prompts", type=int, default=4, help="P prompts per step")
    ap.add_argument("--G", type=int, default=8, help="completions per prompt")
    ap.add_argument("--tokens", default="64",
                    help="C: every completion C tokens; LO:HI: lengths drawn from [LO, HI]")
    ap.add_argument("--image-size", type=int, default=112,
                    help="the synthetic images' side in pixels (the model's processor caps "
                    "it at its max_pixels)")
    ap.add_argument("--steps", type=int, default=3, help="measured steps")
    ap.add_argument("--warmup", type=int, default=1,
                    help="steps before the measured ones (>= 1: the memory window starts "
                    "after them)")
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rows", type=int, default=64, help="synthetic counting rows")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--save-results", action="store_true")
    ap.add_argument("--verbose", action="store_true", help="show the children's output")
    results.add_child_args(ap)
    args = ap.parse_args(argv)
    results.check_args(ap, args, positive=("prompts", "G", "steps", "rows"), tokens=True)
    if args.image_size < 28:
        ap.error(f"--image-size must be >= 28, got {args.image_size}")
    if args.warmup < 1:
        ap.error(f"--warmup must be >= 1, got {args.warmup}")
    if args.rows < args.prompts:
        ap.error(f"--rows ({args.rows}) must be >= --prompts ({args.prompts})")
    return args


def main(argv=None) -> int:
    args = parse(argv)
    if args.child:
        return child(args)
    args.device = results.default_device(args.device)
    models = [m for m in args.models.split(",") if m]
    trainers = [t for t in args.trainers.split(",") if t]
    bad = [t for t in trainers if t not in TRAINERS and not (
        t.split("@")[0] in LAYOUTS and t.split("@")[1].isdigit() and int(t.split("@")[1]) > 0)]
    if bad:
        raise SystemExit(f"--trainers: unknown {bad}; expected some of {list(TRAINERS)}, the "
                         "mr1fast ones also as NAME@N (N processes under torchrun)")
    missing = [t for t in trainers if not trainer_available(t)]
    if missing:
        print(f"skipping {missing}: not installed (pip install -e '.[dev]')", file=sys.stderr)
        trainers = [t for t in trainers if t not in missing]
    rows, records = {}, []
    with tempfile.TemporaryDirectory(prefix="mr1fast-step-") as tmp:
        work = Path(tmp)
        for m in models:
            path = results.model_folder(m, work, args.seed)
            for t in trainers:
                tokens = f"{args.min_tokens}:{args.tokens}" if args.min_tokens < args.tokens \
                    else str(args.tokens)
                print(f"[step] {t} on {m}: {args.warmup} warm-up + {args.steps} measured "
                      f"steps of {args.prompts}x{args.G}x{tokens} tokens, {args.image_size}px "
                      "images", file=sys.stderr, flush=True)
                rows[(t, m)] = r = measure(t, path, args, work)
                shape = {"model": m, "prompts": args.prompts, "G": args.G,
                         "tokens": args.tokens, "device": args.device}
                if args.min_tokens < args.tokens or args.image_size != 112:
                    shape.update(min_tokens=args.min_tokens, image_size=args.image_size)
                for k, v in r.items():
                    unit = {"tokens_per_s": "tok/s", "positions": "positions",
                            "pack_share": "fraction"}.get(k, "MiB" if k.endswith("memory")
                                                          else "s")
                    records.append(results.record("grpo_step", t, "step", shape, args.dtype, k,
                                                  v, unit))
    print("\n".join(table(rows, models, trainers)))
    if args.save_results:
        print(f"results written to {results.write(records, 'step')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
