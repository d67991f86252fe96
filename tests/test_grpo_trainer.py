"""End-to-end trainer runs on the tiny model: GRPO-D learns, resume reproduces, NaN steps are
skipped, checkpoints are atomic, SFT and the eval matrix work."""
import json

import pytest
import torch

import mr1fast.trainer.grpo as train_module
from helpers import read_step_checkpoint

from mr1fast.trainer.checkpoint import STATE_FILE, latest_checkpoint
from mr1fast.trainer.config import embedded_default, from_dict
from mr1fast.trainer.evaluate import run_eval
from mr1fast.trainer.grpo import train_grpo
from mr1fast.trainer.metrics import read_metrics
from mr1fast.trainer.model import load_model
from mr1fast.trainer.sft import run_sft


def tiny_config(run_dir, cache_dir, **sections):
    """The embedded default's loop on the tiny random model (the earlier default: the
    embedded base takes a minute to build), shrunk for tests, with per-section overrides."""
    base = {"seed": 0, "output_dir": str(run_dir), "cache_dir": str(cache_dir), "sampler": "hf",
            "model": {"name": "tiny"},
            "data": {"train": "synthetic:counting", "synthetic_size": 64},
            "grpo": {"max_steps": 4, "sft_warmup_steps": 0, "prompts_per_step": 2,
                     "num_generations": 4, "max_completion_length": 12, "lr": 1.5e-3},
            "eval": {"tasks": {"counting": "synthetic:counting"}, "limit": 8,
                     "synthetic_size": 8, "max_new_tokens": 32},
            "log": {"progress": False, "save_every": 2}}
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return from_dict(base, base=embedded_default())


def test_grpo_d_beats_the_lr0_control(tmp_path, cache_dir):
    """Same seed, same SFT warm-up; only GRPO-D's learning rate differs. The reward of the
    last steps must be higher with learning than without, so the warm-up alone cannot pass."""
    def last_rewards(name, lr):
        cfg = tiny_config(tmp_path / name, cache_dir,
                          grpo={"max_steps": 60, "sft_warmup_steps": 50, "prompts_per_step": 4,
                                "num_generations": 8, "max_completion_length": 32, "lr": lr})
        out = train_grpo(cfg)
        rows = read_metrics(tmp_path / name / "metrics.jsonl")
        assert len(rows) == 60 and out["eval"]["after_sft"] is not None
        return [r["reward_mean"] for r in rows[-20:]], out

    trained, out = last_rewards("grpo_d", 2e-3)
    control, _ = last_rewards("control", 0.0)
    mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
    assert mean(trained) > mean(control) + 0.2, (mean(trained), mean(control))
    assert set(out["eval"]) == {"after_sft", "final"}


def test_run_directory_holds_config_metrics_plot_eval(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path, cache_dir)
    out = train_grpo(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    required = {"step", "reward_mean", "acc_reward", "format_reward", "beta", "kl", "loss",
                "clip_frac", "entropy", "tokens_per_s", "step_seconds"}
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert required <= set(rows[0])
    betas = [r["beta"] for r in rows]
    assert betas[0] == pytest.approx(0.07) and min(betas) >= 0.04 - 1e-9  # counting GRPO-D
    assert (tmp_path / "metrics.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "counting" in json.loads((tmp_path / "eval.json").read_text())["final"]
    assert (tmp_path / "config.yaml").is_file()
    ckpt = latest_checkpoint(tmp_path)
    assert ckpt.name == "step-000004" and out["steps"] == 4
    state = torch.load(ckpt / STATE_FILE, weights_only=True)  # safe format
    assert state["step"] == 4 and state["data"] and "rng" in state
    weights = read_step_checkpoint(ckpt, tmp_path)
    trainable = {n for n, p in load_model(str(ckpt), device=torch.device("cpu"),
                                          dtype=torch.float32).named_parameters()
                 if "visual" not in n}  # the embedded default freezes the vision tower
    assert trainable and trainable == set(weights["optim"])
    assert {"exp_avg", "exp_avg_sq", "step"} == set(weights["optim"][next(iter(trainable))])


def test_resume_reproduces_the_next_steps(tmp_path, cache_dir):
    """Kill a run after step 3 (checkpoint at step 2): the resumed run's steps 3 and 4 equal
    those of an uninterrupted run."""
    full = tiny_config(tmp_path / "full", cache_dir, grpo={"updates_per_batch": 2})
    train_grpo(full)
    expected = read_metrics(tmp_path / "full" / "metrics.jsonl")

    def kill_after_3(step, metrics):
        if step == 3:
            raise KeyboardInterrupt

    cut = tiny_config(tmp_path / "cut", cache_dir, grpo={"updates_per_batch": 2})
    with pytest.raises(KeyboardInterrupt):
        train_grpo(cut, on_step=kill_after_3)
    assert latest_checkpoint(tmp_path / "cut").name == "step-000002"
    train_grpo(cut)
    got = read_metrics(tmp_path / "cut" / "metrics.jsonl")
    assert [r["step"] for r in got] == [1, 2, 3, 4]
    for key in ("reward_mean", "loss", "kl", "beta", "clip_frac", "entropy", "grad_norm"):
        for a, b in zip(expected[2:], got[2:]):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), key
    # mu = 2: the second update of a batch sees a ratio != 1, so clipping can fire
    assert any(r["clip_frac"] is not None for r in expected)


def test_nonfinite_steps_are_skipped_then_stop_the_run(tmp_path, cache_dir, monkeypatch):
    real = train_module.grpo_loss
    calls = {"n": 0}

    def flaky(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls["n"] += 1
        return (loss * float("nan") if calls["n"] in (2, 4, 5, 6) else loss), stats

    monkeypatch.setattr(train_module, "grpo_loss", flaky)
    cfg = tiny_config(tmp_path, cache_dir, grpo={"max_steps": 8, "max_bad_steps": 3})
    with pytest.raises(RuntimeError, match="3 consecutive steps"):
        train_grpo(cfg)
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["skipped_steps"] for r in rows] == [0, 1, 1, 2, 3][:len(rows)]
    assert rows[1]["loss"] is None  # NaN written as null, never silently averaged


def test_a_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, cache_dir, monkeypatch):
    import mr1fast.trainer.checkpoint as ckpt_module

    cfg = tiny_config(tmp_path, cache_dir)
    real_save = ckpt_module.dcp.save
    calls = {"n": 0}

    def dies_second_time(*args, **kwargs):  # while writing step-000004's weights
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("the machine broke")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(ckpt_module.dcp, "save", dies_second_time)
    with pytest.raises(OSError, match="the machine broke"):
        train_grpo(cfg)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert ckpts == ["step-000002"]  # no half-written step-000004, no temp folder left
    monkeypatch.setattr(ckpt_module.dcp, "save", real_save)
    train_grpo(cfg)  # resumes from step 2 and finishes
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4]


def test_sft_lowers_the_nll_and_eval_gives_the_cross_task_matrix(tmp_path, cache_dir):
    cfg = tiny_config(tmp_path / "sft", cache_dir, sft={"max_steps": 40, "batch_size": 16,
                                                        "lr": 3e-3})
    out = run_sft(cfg)
    rows = read_metrics(tmp_path / "sft" / "metrics.jsonl")
    assert len(rows) == 40 and rows[-1]["loss"] < rows[0]["loss"] * 0.3
    assert out["eval"]["final"]["counting"]["n"] == 8

    final = tmp_path / "sft" / "checkpoints" / "final"
    ev = tiny_config(tmp_path / "eval", cache_dir,
                     eval={"models": {"base": "tiny", "sft-counting": str(final)},
                           "tasks": {"counting": "synthetic:counting",
                                     "geometry": "synthetic:geometry"}})
    matrix = run_eval(ev)
    assert set(matrix) == {"base", "sft-counting"}
    assert set(matrix["base"]) == {"counting", "geometry"}
    table = (tmp_path / "eval" / "eval.md").read_text()
    assert table.splitlines()[0] == "| model | counting | geometry |"
    assert json.loads((tmp_path / "eval" / "eval.json").read_text()) == matrix
    assert matrix["sft-counting"]["counting"]["format"] > matrix["base"]["counting"]["format"]


LAYOUTS = [("padded", 3), ("packed", 0), ("packed", 120), ("shared_prefix", 0),
           ("shared_prefix", 120)]


def test_micro_batches_and_layouts_train_the_same(tmp_path, cache_dir):
    """One step (mu = 2: old log-probs, reference, two updates) with the whole batch padded in
    one micro-batch, against padded micro-batches of 3 completions (3, 3, 2), and the packed
    and shared-prefix layouts in one micro-batch or with a budget of 120 positions (smaller
    than one group: a group's completions split over micro-batches, its prompt in each). The
    same loss, stats and gradients (bnpo: micro-batches weigh by their tokens;
    tests/test_grpo_loss.py checks micro_batch_weight for every loss type)."""
    def one_step(name, packing, size):
        cfg = tiny_config(tmp_path / name, cache_dir,
                          model={"packing": packing},
                          grpo={"max_steps": 1, "micro_batch_size": size,
                                "max_tokens_per_micro_batch": size, "loss_type": "bnpo",
                                "updates_per_batch": 2, "lr": 1e-3},
                          eval={"limit": 2, "max_new_tokens": 4})
        metrics = train_grpo(cfg)["metrics"]
        ckpt = tmp_path / name / "checkpoints" / "step-000001"
        return metrics, read_step_checkpoint(ckpt, tmp_path)["optim"]

    whole, adam1 = one_step("whole", "padded", 0)
    for packing, size in LAYOUTS:
        split, adam2 = one_step(f"{packing}-{size}", packing, size)
        for key in ("loss", "kl", "entropy", "clip_frac", "grad_norm", "reward_mean"):
            assert whole[key] == pytest.approx(split[key], rel=1e-4, abs=1e-6), \
                (packing, size, key)
        assert adam1.keys() == adam2.keys() and len(adam1) > 0
        for k in adam1:  # Adam's moments: the gradients of the two updates
            assert torch.allclose(adam1[k]["exp_avg"], adam2[k]["exp_avg"], rtol=1e-3,
                                  atol=1e-8), (packing, size, k)


@pytest.mark.parametrize("packing", ["packed", "shared_prefix"])
def test_sft_trains_the_same_in_every_layout(tmp_path, cache_dir, packing):
    """Two SFT steps padded (micro-batches of 2) and packed (a budget of 150 positions): the
    same losses and gradient norms."""
    def run(name, mode):
        cfg = tiny_config(tmp_path / name, cache_dir, model={"packing": mode},
                          sft={"max_steps": 2, "batch_size": 6, "micro_batch_size": 2,
                               "max_tokens_per_micro_batch": 150, "lr": 3e-3},
                          eval={"limit": 2, "max_new_tokens": 4})
        run_sft(cfg)
        return read_metrics(tmp_path / name / "metrics.jsonl")

    a, b = run("padded", "padded"), run(packing, packing)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    for ra, rb in zip(a, b):
        for key in ("loss", "grad_norm"):
            assert ra[key] == pytest.approx(rb[key], rel=1e-4, abs=1e-6), key


def test_micro_batch_fit_halves_on_out_of_memory():
    from mr1fast.trainer.run import MicroBatchFit

    fit, seen, retries = MicroBatchFit(0), [], []

    def run(n, on_retry=None):
        for attempt in fit.attempts(n, on_retry=on_retry):
            with attempt:
                sizes = [m.stop - m.start for m in attempt.micro_batches]
                seen.append(sizes[0])
                if sizes[0] > 4:
                    raise torch.cuda.OutOfMemoryError("CUDA out of memory")
                total = sum(sizes)
        return total

    assert run(16, on_retry=lambda: retries.append(1)) == 16
    assert seen == [16, 8, 4] and fit.size == 4 and len(retries) == 2
    assert run(16) == 16 and seen[-1] == 4  # the size found is kept
    with pytest.raises(ValueError):  # anything but out-of-memory propagates
        for attempt in fit.attempts(4):
            with attempt:
                raise ValueError("not memory")


def test_micro_batch_fit_halves_a_token_budget_down_to_single_completions():
    """Packed layouts: the budget (positions) halves on each out-of-memory error until every
    micro-batch holds one completion; then the error goes through."""
    from mr1fast.trainer.forward import MicroBatch
    from mr1fast.trainer.run import MicroBatchFit

    fit, seen = MicroBatchFit(0), []

    def split(size):  # 100 positions per completion, 8 completions
        per = max(1, size // 100)
        return [MicroBatch(list(range(i, min(i + per, 8)))) for i in range(0, 8, per)]

    with pytest.raises(torch.cuda.OutOfMemoryError):
        for attempt in fit.attempts(800, split=split):
            with attempt:
                seen.append(attempt.size)
                raise torch.cuda.OutOfMemoryError("CUDA out of memory")
    assert seen == [800, 400, 200, 100]


def test_bf16_master_weights_start_from_the_warmed_up_policy(tmp_path, cache_dir):
    """bf16 weights train through fp32 masters (run.MasterWeightsAdamW). The GRPO optimizer is
    built after the SFT warm-up, so its masters copy the warmed-up policy: with lr = 0 the
    policy after one GRPO step is exactly the warm-up's result, not the model it started from."""
    cfg = tiny_config(tmp_path, cache_dir, model={"dtype": "bf16"},
                      grpo={"max_steps": 1, "sft_warmup_steps": 2, "lr": 0.0},
                      sft={"batch_size": 4}, eval={"limit": 2, "max_new_tokens": 4})
    train_grpo(cfg)

    def weights(path):
        model = load_model(str(path), device=torch.device("cpu"), dtype=torch.bfloat16)
        return dict(model.named_parameters())

    warm = weights(tmp_path / "sft_warmup" / "checkpoints" / "final")
    after = weights(tmp_path / "checkpoints" / "step-000001")  # the fp32 masters, rounded
    start = weights(cache_dir / "tiny-qwen2vl-seed0")
    assert warm.keys() == after.keys()
    assert all(torch.equal(warm[k], after[k]) for k in warm)
    moved = [k for k in warm if not torch.equal(warm[k], start[k])]
    assert moved, "the warm-up must have changed the weights for this test to mean anything"


def test_loss_options_reach_the_loss_and_micro_batches_agree(tmp_path, cache_dir):
    """grpo.loss_type and grpo.loss's options (here cispo with sequence-level ratios, the k2
    KL with bias correction and an entropy bonus) change the step, and micro-batches of 3
    completions give the whole batch's loss and gradients."""
    family = {"loss_type": "cispo", "eps_high": 2.0,
              "loss": {"importance_sampling_level": "sequence", "kl_estimator": "k2",
                       "use_bias_correction_kl": True, "entropy_coef": 0.05}}

    def one_step(name, size, **grpo):
        cfg = tiny_config(tmp_path / name, cache_dir, model={"packing": "padded"},
                          grpo=dict({"max_steps": 1, "micro_batch_size": size,
                                     "updates_per_batch": 2, "lr": 1e-3}, **grpo),
                          eval={"limit": 2, "max_new_tokens": 4})
        return train_grpo(cfg)["metrics"]

    whole = one_step("whole", 0, **family)
    split = one_step("split", 3, **family)
    default = one_step("default", 0)
    for key in ("loss", "kl", "entropy", "clip_frac", "grad_norm"):
        assert whole[key] == pytest.approx(split[key], rel=1e-4, abs=1e-6), key
    assert whole["reward_mean"] == default["reward_mean"]  # the same rollout ...
    assert whole["loss"] != pytest.approx(default["loss"], rel=1e-3)  # ... another objective


def test_the_default_run_learns_the_task(tmp_path, cache_dir):
    """`mr1fast train` with no arguments (the embedded default; only its folders moved here, and
    the final evaluation on counting alone, with 8 samples per item): on the test split's 256
    held-out images, the sampled accuracy (8 completions per item at temperature 1: what GRPO
    optimises) rises by at least 5 points over the embedded base's on the same items, and the
    greedy accuracy does not fall. Seeds 0-2 on validation items: greedy +5.9, +19.6, +26.2;
    this test's seed 42: greedy +1.6, sampled +9.1 (39.3% -> 48.4%): the greedy gain's spread is
    too wide for a margin above 0 at one seed (docs/notes/embedded-base.md)."""
    cfg = embedded_default()
    cfg.output_dir, cfg.cache_dir = str(tmp_path / "run"), str(cache_dir)
    cfg.log.progress = False
    cfg.eval.tasks = {"counting": cfg.eval.tasks["counting"]}
    cfg.eval.samples = 8
    after = train_grpo(cfg)["eval"]["final"]["counting"]
    ev = embedded_default()
    ev.output_dir, ev.cache_dir = str(tmp_path / "eval"), str(cache_dir)
    ev.eval.tasks, ev.eval.samples = cfg.eval.tasks, cfg.eval.samples
    base = run_eval(ev)["embedded-base"]["counting"]
    assert base["n"] == after["n"] == 256
    assert after["sampled_accuracy"] >= base["sampled_accuracy"] + 5.0, (base, after)
    assert after["accuracy"] >= base["accuracy"], (base["accuracy"], after["accuracy"])
