"""Several processes on the CPU: torchrun, gloo and FSDP2 (2 ranks), against one process.

- the sharded loss and gradients equal the whole model's (every loss type);
- a 2-rank run trains exactly what the 1-rank run trains: the same samples, rewards, loss,
  gradient norm and weights after the step, for every loss type, with mu = 2 and gradient
  accumulation, and the embedded default end to end (SFT warm-up, GRPO-D, evaluation);
- a checkpoint written by 2 ranks resumes in 1 process and continues as the 1-process run
  does; `mr1fast export` turns it into a Hugging Face checkpoint with the same log-probs;
- a rank that fails stops the whole job, with its message, long before any timeout.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from helpers import read_step_checkpoint

from mr1fast.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent
TESTS = ROOT / "tests"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
KEYS = ("reward_mean", "reward_std", "loss", "kl", "entropy", "grad_norm", "clip_frac",
        "completion_length")


def train_args(run_dir, cache_dir, *extra):
    """A short GRPO run of the embedded default whose reward varies between completions of an
    untrained model (so advantages and gradients are not zero)."""
    return ["train", "--output-dir", str(run_dir), f"cache_dir={cache_dir}", "seed=0",
            "sampler=hf", "log.progress=false", "grpo.max_steps=1", "grpo.sft_warmup_steps=0",
            "grpo.prompts_per_step=4", "grpo.num_generations=2",
            "grpo.max_completion_length=8", "grpo.lr=0.01", "data.synthetic_size=16",
            "eval.limit=2", "eval.synthetic_size=2", "eval.max_new_tokens=4",
            "log.save_every=1", "grpo.rewards.reward_fixtures:length_mod_3=1.0",
            "dist.timeout_s=120", *extra]


def launch(nproc: int, args: list, timeout: float = 600, extra_path: str = ""):
    """`mr1fast ...` in one process, or under torchrun with nproc processes."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (extra_path, str(TESTS)) if p),
               OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    cmd = [sys.executable, "-m", "mr1fast", *args] if nproc == 1 else \
        [*TORCHRUN, "--nproc-per-node", str(nproc), "-m", "mr1fast", *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def assert_same_run(one: Path, two: Path, steps: list, tmp_path: Path):
    a, b = read_metrics(one / "metrics.jsonl"), read_metrics(two / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == steps
    for ra, rb in zip(a, b):
        for key in KEYS:
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), (ra["step"], key)
    wa = read_step_checkpoint(one / "checkpoints" / f"step-{steps[-1]:06d}", tmp_path / "a")
    wb = read_step_checkpoint(two / "checkpoints" / f"step-{steps[-1]:06d}", tmp_path / "b")
    assert wa["model"].keys() == wb["model"].keys()
    for name, value in wa["model"].items():
        assert_same_weights(value, wb["model"][name], name)


def assert_same_weights(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    """Equal within 1e-4, but for a few entries within 1e-3 (a tenth of these runs' lr):
    Adam turns a gradient at roundoff level (a sum that cancels, |g| ~ its eps) into an update
    of up to lr / 2 whose size depends on the summation order, which the layout and the
    number of ranks change."""
    err = (a - b).abs()
    off = int((err > 1e-4).sum())
    assert off <= 8 and err.max() <= 1e-3, f"{name}: {off} entries off, max {err.max():.3g}"


def test_the_sharded_loss_equals_the_whole_models(cache_dir):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run([*TORCHRUN, "--nproc-per-node", "2",
                           str(TESTS / "distributed_scripts" / "sharded_loss.py"),
                           str(cache_dir / "tiny-qwen2vl-seed0")], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "mismatches: none" in done.stdout


@pytest.mark.parametrize("loss_type,packing", [("grpo", "padded"), ("bnpo", "shared_prefix"),
                                               ("dr_grpo", "shared_prefix"), ("dapo", "packed")])
def test_two_ranks_train_what_one_process_trains(tmp_path, cache_dir, loss_type, packing):
    """mu = 2 and gradient accumulation: one step at 1 and 2 ranks (dr_grpo also with gradient
    checkpointing composing with FSDP2). Padded: micro-batches of 1 completion; packed layouts:
    a budget of 70 positions, so that groups split and the ranks plan different numbers of
    micro-batches (the shorter plan runs weight-0 copies: packing.equalize)."""
    extra = [f"grpo.loss_type={loss_type}", "grpo.updates_per_batch=2",
             f"model.packing={packing}", "grpo.micro_batch_size=1",
             "grpo.max_tokens_per_micro_batch=75"]
    if loss_type == "dr_grpo":
        extra.append("model.gradient_checkpointing=true")
    for n in (1, 2):
        done = launch(n, train_args(tmp_path / f"r{n}", cache_dir, *extra))
        assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(tmp_path / "r1", tmp_path / "r2", [1], tmp_path)


@pytest.mark.parametrize("freeze_vision", [False, True])
def test_a_rank_without_images_runs_the_vision_tower_with_the_others(tmp_path, cache_dir,
                                                                     freeze_vision):
    """One image row and three text-only rows, all four in every step: the rank without the
    image still runs the sharded vision tower in every pass (model.vision_keepalive), so the
    collectives pair up, and 2 ranks train what 1 process trains."""
    from mr1fast.trainer.data import make_counting, write_examples

    rows = make_counting(4, seed=0)
    for i, r in enumerate(rows):
        image = r.pop("image")
        r["images"] = [image] if i == 0 else []
    data = write_examples(rows, tmp_path / "mixed.jsonl")
    extra = [f"data.train={data}", "data.synthetic_size=4",
             f"model.freeze_vision={str(freeze_vision).lower()}"]
    for n in (1, 2):
        done = launch(n, train_args(tmp_path / f"r{n}", cache_dir, *extra), timeout=300)
        assert done.returncode == 0, done.stderr[-4000:]
    assert_same_run(tmp_path / "r1", tmp_path / "r2", [1], tmp_path)


def test_torchrun_runs_the_embedded_default_like_one_process(tmp_path, cache_dir):
    """`torchrun -m mr1fast train` with the embedded default (SFT warm-up, GRPO-D with its
    format and accuracy rewards, evaluation), shortened: metrics, weights and the exported
    checkpoints match the single-process run of the same command."""
    extra = ["grpo.max_steps=2", "grpo.sft_warmup_steps=3", "sft.batch_size=4",
             "grpo.rewards={accuracy: 1.0, format: 1.0}", "log.save_every=2"]
    for n in (1, 2):
        done = launch(n, train_args(tmp_path / f"r{n}", cache_dir, *extra))
        assert done.returncode == 0, done.stderr[-4000:]
        assert done.stdout.count("eval after GRPO-D") == 1  # rank 0 alone prints
    assert_same_run(tmp_path / "r1", tmp_path / "r2", [1, 2], tmp_path)
    for n in (1, 2):
        assert launch(1, ["export", str(tmp_path / f"r{n}" / "checkpoints" / "step-000002"),
                          str(tmp_path / f"hf{n}")]).returncode == 0
    import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers)
    from safetensors.torch import load_file

    a = load_file(tmp_path / "hf1" / "model.safetensors")
    b = load_file(tmp_path / "hf2" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert_same_weights(a[k], b[k], k)


def test_torchrun_sft_trains_what_one_process_trains(tmp_path, cache_dir):
    """`torchrun -m mr1fast sft` at 2 ranks: the same losses and final weights as one process."""
    for n in (1, 2):
        done = launch(n, ["sft", "--output-dir", str(tmp_path / f"r{n}"),
                          f"cache_dir={cache_dir}", "seed=0", "log.progress=false",
                          "sft.max_steps=3", "sft.batch_size=4", "sft.micro_batch_size=1",
                          "sft.max_tokens_per_micro_batch=75",
                          "sft.lr=3e-3", "data.synthetic_size=16", "eval.limit=2",
                          "eval.synthetic_size=2", "eval.max_new_tokens=4",
                          "log.save_every=3", "dist.timeout_s=120"])
        assert done.returncode == 0, done.stderr[-4000:]
    a = read_metrics(tmp_path / "r1" / "metrics.jsonl")
    b = read_metrics(tmp_path / "r2" / "metrics.jsonl")
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key
    import mr1fast.rollout  # noqa: F401
    from safetensors.torch import load_file

    wa = load_file(tmp_path / "r1" / "checkpoints" / "final" / "model.safetensors")
    wb = load_file(tmp_path / "r2" / "checkpoints" / "final" / "model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        assert_same_weights(wa[k].float(), wb[k].float(), k)


def stop_after(tmp_path, step: int) -> str:
    """A sitecustomize hook: every rank is interrupted (Ctrl-C) right after step `step`'s
    checkpoint, as a killed job would be. Returns the folder to put on PYTHONPATH."""
    hook = tmp_path / f"stop-after-{step}"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import mr1fast.trainer.run as run\n"
        "end_step = run.Run.end_step\n"
        "def interrupted(self, step, metrics, **state):\n"
        "    end_step(self, step, metrics, **state)\n"
        f"    if step + 1 == {step}:\n"
        "        raise KeyboardInterrupt\n"
        "run.Run.end_step = interrupted\n")
    return str(hook)


def test_a_two_rank_checkpoint_resumes_in_one_process(tmp_path, cache_dir):
    """2 ranks run steps 1-2, checkpoint and are stopped; one process resumes and runs step 3:
    the same as one process running steps 1-3. The exported step-3 checkpoint loads in
    transformers and gives the trainer's log-probs."""
    extra = ["grpo.max_steps=3"]
    assert launch(1, train_args(tmp_path / "one", cache_dir, *extra)).returncode == 0
    cut = launch(2, train_args(tmp_path / "mixed", cache_dir, *extra),
                 extra_path=stop_after(tmp_path, 2))
    assert cut.returncode != 0 and "interrupted" in cut.stderr
    done = launch(1, train_args(tmp_path / "mixed", cache_dir, *extra))
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resumed from" in done.stderr and "step-000002 at step 2" in done.stderr
    assert_same_run(tmp_path / "one", tmp_path / "mixed", [1, 2, 3], tmp_path)

    ckpt = tmp_path / "mixed" / "checkpoints" / "step-000003"
    assert launch(1, ["export", str(ckpt), str(tmp_path / "hf")]).returncode == 0
    import mr1fast.rollout  # noqa: F401
    from transformers import AutoModelForImageTextToText

    from mr1fast import token_logprobs
    from mr1fast.trainer.model import lm_head_weight, load_model

    hf = AutoModelForImageTextToText.from_pretrained(tmp_path / "hf", dtype=torch.float32)
    ours = load_model(str(ckpt), device=torch.device("cpu"), dtype=torch.float32)
    hidden = torch.randn(2, 5, hf.config.text_config.hidden_size)
    ids = torch.randint(0, 500, (2, 5))
    with torch.no_grad():
        want = token_logprobs(hidden, lm_head_weight(ours), ids)
        got = token_logprobs(hidden, lm_head_weight(hf), ids)
        full = torch.log_softmax(hf.lm_head(hidden), -1).gather(-1, ids[..., None])[..., 0]
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(full, want, atol=1e-4)
    for (n, p), (_, q) in zip(ours.named_parameters(), hf.named_parameters()):
        assert torch.equal(p, q), n


def test_a_failing_rank_stops_the_job_with_its_message(tmp_path, cache_dir):
    """Rank 1 raises at its first step while rank 0 waits in a collective: the job ends
    (torchrun stops rank 0) within seconds, not at the 120 s collective timeout, and rank 1's
    message is in the output."""
    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "if os.environ.get('RANK') == '1':\n"
        "    import mr1fast.trainer.grpo as grpo\n"
        "    def fail(*args, **kwargs):\n"
        "        raise RuntimeError('injected failure on rank 1')\n"
        "    grpo.group_advantages = fail\n")
    t0 = time.perf_counter()
    done = launch(2, train_args(tmp_path / "run", cache_dir, "grpo.max_steps=3"),
                  extra_path=str(hook))
    assert done.returncode != 0
    assert "injected failure on rank 1" in done.stderr
    assert "this is a bug in mr1fast" in done.stderr  # the CLI's verdict on rank 1
    assert time.perf_counter() - t0 < 100
