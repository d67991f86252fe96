"""mr1fast command line.

  mr1fast train [--config FILE.yaml] [--output-dir DIR] [section.key=value ...]   GRPO / GRPO-D
  mr1fast sft   [--config FILE.yaml] [--output-dir DIR] [section.key=value ...]   SFT baseline
  mr1fast eval  [--config FILE.yaml] [--output-dir DIR] [section.key=value ...]   cross-task matrix
  mr1fast export CHECKPOINT OUT [--dtype auto|bf16|fp32]     a Hugging Face checkpoint
  mr1fast plan [--config FILE.yaml] [--nproc N] [--gpu-gb G]  memory and traffic per process
  mr1fast init-model [--preset tiny|tiny-v152k|small|qwen2-vl-2b] OUT    random-weight Qwen2-VL
  mr1fast demo | bench [step|layouts|packing|rollout]   toy loss demo | kernel suite (or:
                                       the step beside TRL, layouts, packing data path, rollout)

Without --config, train/sft/eval run the embedded default: the tiny local model on synthetic
counting data (mr1fast.trainer.config.embedded_default).

A mistake in the input or the environment ends with a short message and exit code 1 (2 for a
wrong command line or config; 130 when interrupted); --debug or MR1FAST_DEBUG=1 shows the
traceback. A bug in mr1fast shows its traceback and exits with 70."""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import torch

from ..loss import beta_schedule, grpo_loss, token_logprobs
from .errors import (EXIT_BUG, EXIT_INTERRUPTED, UsageError, UserError, debug_enabled,
                     from_os_error)
from .model import PRESETS


def demo(steps: int, impl: str, seed: int) -> int:
    """A toy GRPO-D run: a linear LM head over fixed hidden states samples G completions per
    prompt; the reward is the fraction of tokens from the upper half of the vocabulary. The
    reward should rise while beta follows the paper's V-shaped schedule."""
    torch.manual_seed(seed)
    prompts, G, T, d, V = 4, 8, 16, 64, 512
    hidden = torch.randn(prompts, 1, T, d).expand(-1, G, -1, -1).reshape(prompts * G, T, d)
    weight = torch.nn.Parameter(torch.randn(V, d) * 0.02)
    ref_weight = weight.detach().clone()
    opt = torch.optim.Adam([weight], lr=3e-2)
    beta_at = beta_schedule("grpo_d", steps, preset="counting")
    print(f"toy GRPO-D: {prompts} prompts x G={G}, T={T}, d={d}, V={V}, impl={impl}")
    print(f"{'step':>4} {'reward':>7} {'beta':>6} {'kl':>8} {'loss':>8} {'ms':>6}")
    first = last = None
    for step in range(steps):
        t0 = time.perf_counter()
        with torch.no_grad():
            probs = torch.softmax(hidden @ weight.T, -1)
            targets = torch.multinomial(probs.view(-1, V), 1).view(prompts * G, T)
            rewards = (targets >= V // 2).float().mean(1)
            ref_logp = token_logprobs(hidden, ref_weight, targets, impl=impl)
        beta = beta_at(step)
        loss, stats = grpo_loss(hidden, weight, targets, rewards=rewards, group_size=G,
                                ref_logp=ref_logp, beta=beta, impl=impl)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ms = (time.perf_counter() - t0) * 1e3
        r = rewards.mean().item()
        first = r if first is None else first
        last = r
        print(f"{step:>4} {r:>7.3f} {beta:>6.3f} {stats['kl'].item():>8.5f} "
              f"{loss.item():>8.4f} {ms:>6.1f}")
    print(f"reward {first:.3f} -> {last:.3f}")
    return 0 if last > first else 1


def bench(args: list[str]) -> int:
    """The pytest-benchmark suite; with --compare, the run is saved and checked against the
    device's baseline (bench/compare.py). `bench step|layouts|packing|rollout ...` run
    bench/<name>.py instead: the end-to-end step (with TRL side by side), the reference +
    update passes per layout, the packed forwards' data path, the rollout benchmark."""
    root = Path(__file__).resolve().parents[2]
    if args and args[0] in ("step", "rollout", "packing", "layouts"):
        return subprocess.call([sys.executable, str(root / "bench" / f"{args[0]}.py"),
                                *args[1:]], cwd=root)
    check = "--compare" in args
    args = [a for a in args if a != "--compare"] + (["--save-results"] if check else [])
    code = subprocess.call([sys.executable, "-m", "pytest", str(root / "bench"),
                            "--benchmark-only", *args], cwd=root)
    if not check or code != 0:
        return code
    runs = sorted((root / "bench" / "results").glob("*/kernels-*.json"),
                  key=lambda p: p.stat().st_mtime)
    return subprocess.call([sys.executable, str(root / "bench" / "compare.py"),
                            str(runs[-1])], cwd=root)


def run_command(cmd: str, config: str | None, output_dir: str | None,
                overrides: list[str]) -> int:
    from transformers.utils import logging as hf_logging

    from .config import embedded_default, load_config

    hf_logging.disable_progress_bar()
    cfg = load_config(config, overrides, base=None if config else embedded_default())
    if output_dir is not None:
        cfg.output_dir = output_dir
    if cmd == "train":
        from .grpo import train_grpo
        train_grpo(cfg)
    elif cmd == "sft":
        from .sft import run_sft
        run_sft(cfg)
    else:
        from .evaluate import run_eval
        run_eval(cfg)
    if _rank() == 0:
        print(f"run directory: {cfg.output_dir}")
    return 0


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def plan(config: str | None, nproc: int | None, gpu_gb: float | None) -> int:
    """`mr1fast plan`: plan.py's estimate for a recipe; exit 1 when it does not fit."""
    from .config import embedded_default, load_config
    from .errors import UsageError
    from .plan import fits, format_plan, model_shape

    cfg = load_config(config, base=None if config else embedded_default())
    nproc = cfg.dist.gpus if nproc is None else nproc
    gpu_gb = cfg.dist.gpu_gb if gpu_gb is None else gpu_gb
    if nproc < 1 or gpu_gb <= 0:
        raise UsageError("--nproc: expected >= 1 and --gpu-gb: expected > 0")
    shape = model_shape(cfg.model.name)
    print(format_plan(cfg, nproc, shape, gpu_gb))
    return 0 if fits(cfg, nproc, shape, gpu_gb) else 1


def export(checkpoint: str, out: str, dtype: str) -> int:
    """`mr1fast export CHECKPOINT OUT`: a step checkpoint (DCP shards, any world size) or any
    checkpoint load_model reads, written as one Hugging Face safetensors checkpoint (with its
    tokenizer and image processor) that transformers and vLLM load. Atomic."""
    import shutil
    import tempfile

    from .model import load_encoder, load_model
    from .preflight import check_model

    check_model(checkpoint, key="CHECKPOINT")
    table = {"bf16": torch.bfloat16, "fp32": torch.float32}
    if dtype == "auto":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(checkpoint)
        saved = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        dtype = "bf16" if str(saved).endswith("bfloat16") else "fp32"
    model = load_model(checkpoint, device=torch.device("cpu"), dtype=table[dtype],
                       trainable=False)
    encoder = load_encoder(checkpoint)
    target = Path(out)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        encoder.save(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(target)
    return 0


def main(argv=None) -> int:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the full traceback of an error (also: MR1FAST_DEBUG=1)")
    p = argparse.ArgumentParser(prog="mr1fast", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    for name, text in (("train", "GRPO / GRPO-D training"), ("sft", "the SFT baseline"),
                       ("eval", "greedy accuracy per task; the cross-task matrix")):
        c = sub.add_parser(name, help=text, parents=[common])
        c.add_argument("--config", help="recipe YAML (configs/); default: the embedded default")
        c.add_argument("--output-dir", help="run directory (overrides output_dir)")
        c.add_argument("overrides", nargs="*", metavar="section.key=value")
    r = sub.add_parser("reproduce", help="the paper's comparison from one base: GRPO-D vs "
                       "constant-beta GRPO vs SFT, same-task and cross-task, over seeds "
                       "(resumable; a table and a figure)", parents=[common])
    r.add_argument("--grid", default="configs/reproduce/embedded.yaml",
                   help="grid YAML (configs/reproduce/); default: %(default)s")
    r.add_argument("--output-dir", help="default: the grid's output_dir")
    r.add_argument("--ablations", action="store_true",
                   help="also run the grid's ablations (format weight, constant beta)")
    q = sub.add_parser("plan", help="memory per process and bytes exchanged per step of a "
                       "recipe on N processes", parents=[common])
    q.add_argument("--config", help="recipe YAML; default: the embedded default")
    q.add_argument("--nproc", type=int, help="processes (GPUs); default: the recipe's dist.gpus")
    q.add_argument("--gpu-gb", type=float, help="GPU memory; default: the recipe's dist.gpu_gb")
    x = sub.add_parser("export", help="write a checkpoint (a step checkpoint of any world "
                       "size) as one Hugging Face safetensors checkpoint", parents=[common])
    x.add_argument("checkpoint", help="e.g. runs/vc/checkpoints/step-000040")
    x.add_argument("out")
    x.add_argument("--dtype", default="auto", choices=["auto", "bf16", "fp32"],
                   help="auto: the dtype the model was configured with")
    m = sub.add_parser("init-model", help="write a random-weight Qwen2-VL checkpoint (tiny "
                       "local model, or a benchmark preset)", parents=[common])
    m.add_argument("out")
    m.add_argument("--preset", default="tiny", choices=sorted(PRESETS),
                   help="tiny | tiny-v152k (Qwen's vocabulary) | small (decoder-bound, as "
                        "real VLMs) | qwen2-vl-2b / qwen2-vl-7b (the real dimensions)")
    m.add_argument("--seed", type=int, default=0)
    d = sub.add_parser("demo", help="train a toy policy with the fused GRPO-D loss",
                       parents=[common])
    d.add_argument("--steps", type=int, default=30)
    d.add_argument("--impl", default="auto", choices=["auto", "triton", "torch", "naive"])
    d.add_argument("--seed", type=int, default=0)
    b = sub.add_parser("bench", help="run the kernel benchmark suite (pytest-benchmark; "
                       "--compare checks it against the device's baseline); `bench step`: the "
                       "end-to-end GRPO-D step beside TRL; `bench rollout`: vLLM vs generate; "
                       "`bench layouts`: ref + update per layout; `bench packing`: the packing "
                       "data path, native vs Python")
    b.add_argument("pytest_args", nargs=argparse.REMAINDER)
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"] and not set(argv[1:2]) & {"-h", "--help"}:
        # Everything after `bench` goes to pytest or the benchmark script as it is: argparse's
        # REMAINDER drops a leading option such as --compare.
        return bench(argv[1:])
    args = p.parse_args(argv)  # a wrong command line exits here with code 2
    debug = args.debug or debug_enabled()
    try:
        return _dispatch(args)
    except UserError as e:
        return _report(args.cmd, e, debug)
    except KeyboardInterrupt:
        return _interrupted(args)
    except OSError as e:
        user = from_os_error(e, "a file operation failed")
        if user is None:
            return _bug(args.cmd)
        return _report(args.cmd, user, debug)
    except torch.cuda.OutOfMemoryError as e:
        return _report(args.cmd, UserError(
            f"CUDA out of memory ({str(e).splitlines()[0][:200]})",
            fix="with grpo.max_tokens_per_micro_batch=0 (packed layouts) or "
                "grpo.micro_batch_size=0 (padded) micro-batches halve down to one completion "
                "on their own; otherwise lower the one your layout uses. Also: lower "
                "grpo.max_completion_length or grpo.prompts_per_step (the rollout), set "
                "model.gradient_checkpointing=true, or use a smaller model"), debug)
    except MemoryError:
        return _report(args.cmd, UserError("out of host memory",
                                           fix="use a smaller model or batch"), debug)
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # a bug; BaseException too: DCP's CheckpointException is one
        if peer_failed(e):
            return _report(args.cmd, UserError(
                "stopped: another process of this job failed, and this one lost its "
                "connection to it in a collective",
                fix="see the first process's message above (torchrun names its rank)"), debug)
        return _bug(args.cmd)


# What gloo / NCCL / the TCP store say when a peer process has gone away.
_PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
              "remote process exited", "NCCL communicator was aborted")


def peer_failed(error: BaseException) -> bool:
    """Under torchrun: a collective failed because another process died (its own message is
    the one that matters), not a bug of this one."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not isinstance(error, RuntimeError):
        return False
    return any(s in str(error) for s in _PEER_GONE)


def _dispatch(args) -> int:
    if args.cmd in ("train", "sft", "eval"):
        return run_command(args.cmd, args.config, args.output_dir, args.overrides)
    if args.cmd == "reproduce":
        from .reproduce import reproduce
        grid = Path(args.grid)
        if not grid.is_file() and not grid.is_absolute():   # the repository's configs/
            grid = Path(__file__).resolve().parents[2] / args.grid
        reproduce(str(grid) if grid.is_file() else args.grid, args.output_dir,
                  ablations=args.ablations)
        return 0
    if args.cmd == "export":
        return export(args.checkpoint, args.out, args.dtype)
    if args.cmd == "plan":
        return plan(args.config, args.nproc, args.gpu_gb)
    if args.cmd == "init-model":
        from .model import init_tiny_model
        print(init_tiny_model(args.out, preset=args.preset, seed=args.seed))
        return 0
    return demo(args.steps, args.impl, args.seed)


def _report(cmd: str, error: UserError, debug: bool) -> int:
    """A user's mistake: its message (what, where, what to do), no traceback unless asked."""
    if debug:
        traceback.print_exc()
    rank = f"[rank {_rank()}] " if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
    lines = [f"{rank}mr1fast {cmd}: error: {error}"]
    if error.fix:
        lines.append(f"  what to do: {error.fix}")
    if not debug and not isinstance(error, UsageError):
        lines.append("  (--debug or MR1FAST_DEBUG=1 shows the traceback)")
    print("\n".join(lines), file=sys.stderr)
    return error.exit_code


def _interrupted(args) -> int:
    where = ""
    if args.cmd in ("train", "sft"):
        output_dir = args.output_dir or _configured_output_dir(args)
        newest = sorted(Path(output_dir or ".", "checkpoints").glob("step-*"))
        where = (f"; the newest checkpoint is {newest[-1]}, and rerunning the same command "
                 "resumes from it" if newest else "; no checkpoint was written yet")
    print(f"mr1fast {args.cmd}: interrupted{where}", file=sys.stderr)
    return EXIT_INTERRUPTED


def _configured_output_dir(args):
    from .config import embedded_default, load_config

    try:
        return load_config(args.config, args.overrides,
                           base=None if args.config else embedded_default()).output_dir
    except UserError:
        return None


def _bug(cmd: str) -> int:
    traceback.print_exc()
    print(f"mr1fast {cmd}: this is a bug in mr1fast, not a mistake in your input: please report "
          "it with the traceback above and the command that led to it", file=sys.stderr)
    return EXIT_BUG


if __name__ == "__main__":
    sys.exit(main())
