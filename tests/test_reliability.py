"""Every failure a user can cause ends in a clear message, fails early and loses nothing.

One test per row of docs/RELIABILITY.md: the command line in-process (mr1fast.trainer.cli.main)
with the exit code and the message asserted, and what is on disk afterwards (no lost step, no
lost checkpoint). Exit codes: 2 usage, 1 runtime failure, 130 interrupted, 70 a bug in mr1fast.
"""
import errno
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import mr1fast.trainer.checkpoint as checkpoint_module
import mr1fast.trainer.preflight as preflight
from mr1fast.trainer.cli import main
from mr1fast.trainer.data import load_examples, make_counting, write_examples
from mr1fast.trainer.metrics import read_metrics

ROOT = Path(__file__).resolve().parent.parent


def tiny_args(run_dir, cache_dir, *extra):
    """`mr1fast train` on the embedded default's loop with the tiny random model (its
    checkpoints fit the small disks below), shrunk to a few seconds."""
    return ["train", "--output-dir", str(run_dir), f"cache_dir={cache_dir}", "seed=0",
            "model.name=tiny", "data.train=synthetic:counting",
            "eval.tasks={counting: synthetic:counting}",
            "sampler=hf", "log.progress=false", "grpo.max_steps=4", "grpo.sft_warmup_steps=0",
            "grpo.prompts_per_step=2", "grpo.num_generations=2",
            "grpo.max_completion_length=8", "data.synthetic_size=16", "eval.limit=2",
            "eval.synthetic_size=2", "eval.max_new_tokens=4", "log.save_every=2", *extra]


def run(capsys, args):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_clean_failure(code, err, want_code, *messages):
    assert code == want_code, err
    for m in messages:
        assert m in err, f"{m!r} not in:\n{err}"
    assert "Traceback" not in err, err


# -- usage errors: exit code 2, before anything is created -------------------------------------

@pytest.mark.parametrize("name, yaml_text, overrides, message", [
    ("unknown key", None, ["grpo.lrr=1e-5"], "unknown key grpo.lrr"),
    ("wrong type", None, ["grpo.num_generations=2.5"], "grpo.num_generations: expected int"),
    ("malformed YAML file", "grpo:\n  lr: [1e-5\n", [], "not a valid config at line 3"),
    ("malformed YAML override", None, ["grpo.lr=[1"], "override 'grpo.lr=[1': not a valid"),
    ("unsafe YAML tag", "grpo:\n  lr: !!python/object/apply:os.system ['touch PWNED']\n", [],
     "unsupported YAML tag !!python/object/apply:os.system"),
    ("duplicate YAML keys", "grpo:\n  lr: 1.0e-5\n  lr: 2.0e-5\n", [],
     "found the key 'lr' twice"),
    ("infinite learning rate", None, ["grpo.lr=.inf"], "grpo.lr: expected a finite number"),
    ("infinite temperature", None, ["grpo.temperature=inf"],
     "grpo.temperature: expected a finite number"),
    ("zero reward time limit", None, ["grpo.reward_timeout_s=0"],
     "grpo.reward_timeout_s: expected > 0"),
    ("empty reward set", None, ["grpo.rewards={}"], "grpo.rewards: expected at least one"),
    ("bad device name", None, ["model.device=gpu"], "model.device: expected auto, cpu"),
    ("bad beta schedule", None, ["grpo.beta_schedule.kind=constant"],
     "constant schedule: takes beta"),
    ("non-UTF-8 config file", b"grpo:\n  lr: \xff\n", [], "not UTF-8 text"),
])
def test_usage_errors_exit_2_with_the_key(tmp_path, capsys, monkeypatch, name, yaml_text,
                                          overrides, message):
    args = ["train", "--output-dir", str(tmp_path / "run"), *overrides]
    if yaml_text is not None:
        cfg = tmp_path / "recipe.yaml"
        cfg.write_bytes(yaml_text if isinstance(yaml_text, bytes) else yaml_text.encode())
        args[1:1] = ["--config", str(cfg)]
    monkeypatch.chdir(tmp_path)  # where an executed tag would have written PWNED
    code, _, err = run(capsys, args)
    assert_clean_failure(code, err, 2, message)
    assert not (tmp_path / "run").exists() and not (tmp_path / "PWNED").exists()


def test_a_missing_config_file_and_a_wrong_command_line(tmp_path, capsys):
    code, _, err = run(capsys, ["sft", "--config", str(tmp_path / "missing.yaml")])
    assert_clean_failure(code, err, 2, "no such file")
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2


# -- runtime failures the user can fix: exit code 1, in seconds, before the model loads --------

def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.mark.parametrize("case", ["missing model folder", "folder without config.json",
                                  "wrong dataset schema", "empty dataset",
                                  "fewer rows than a step", "rows held out",
                                  "missing data file",
                                  "missing reward module", "reward signature",
                                  "missing eval set", "output path is a file",
                                  "unavailable device"])
def test_runtime_failures_exit_1_early_with_what_to_do(tmp_path, cache_dir, capsys, case):
    run_dir = tmp_path / "run"
    extra = {
        "missing model folder": ([f"model.name={tmp_path / 'nope'}"], "no such folder"),
        "folder without config.json": ([f"model.name={tmp_path}"], "has no config.json"),
        "wrong dataset schema": ([f"data.train={_jsonl(tmp_path / 'q.jsonl', [{'question': 'a', 'answer': '1'}] * 4)}"],
                                 "a row needs R1-V's columns image (or images), problem and solution"),
        "empty dataset": ([f"data.train={_jsonl(tmp_path / 'e.jsonl', [])}"],
                          "the source is empty"),
        "fewer rows than a step": (["grpo.prompts_per_step=32", "data.synthetic_size=8"],
                                   "8 usable rows, fewer than the 32 that one step takes "
                                   "(grpo.prompts_per_step)"),
        "rows held out": (["grpo.prompts_per_step=8", "data.synthetic_size=10",
                           "data.holdout=4"],   # a validation hold-out is never trained on
                          "6 usable rows, fewer than the 8 that one step takes"),
        "missing data file": ([f"data.train={tmp_path / 'missing.jsonl'}"], "does not exist"),
        "missing reward module": (["grpo.rewards.nope_module_x:fn=1.0",
                                   "grpo.sft_warmup_steps=50"],
                                  "cannot import module 'nope_module_x'"),
        "reward signature": (["grpo.rewards.reward_fixtures:takes_no_columns=1.0"],
                             "cannot be called as f(completions"),
        "missing eval set": ([f"eval.tasks={{geometry: {tmp_path / 'geo.jsonl'}}}"],
                             "eval.tasks.geometry"),
        "output path is a file": ([], "is a file"),
        "unavailable device": (["model.device=cuda"], "no CUDA GPU is visible"),
    }[case]
    if case == "output path is a file":
        run_dir.write_text("not a folder")
    if case == "unavailable device" and torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    t0 = time.perf_counter()
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir, *extra[0]))
    assert_clean_failure(code, err, 1, extra[1], "what to do:")
    assert time.perf_counter() - t0 < 30, "must fail before any training"
    if run_dir.is_dir():
        assert not (run_dir / "metrics.jsonl").exists()
        assert not (run_dir / "sft_warmup").exists()


def test_init_model_into_a_path_under_a_file(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run(capsys, ["init-model", str(tmp_path / "afile" / "model")])
    assert_clean_failure(code, err, 1, "a file already stands where a folder is needed",
                         str(tmp_path / "afile"))


def test_a_read_only_output_folder(tmp_path, cache_dir, capsys, monkeypatch):
    """EROFS while probing the folder (root ignores permission bits, so it is injected)."""
    def read_only(self, data):
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(preflight.Path, "write_bytes", read_only)
    code, _, err = run(capsys, tiny_args(tmp_path / "run", cache_dir))
    assert_clean_failure(code, err, 1, "cannot write into the output folder",
                         "read-only file system", "what to do: choose a writable path")


def test_too_little_disk_for_a_checkpoint_fails_before_training(tmp_path, cache_dir, capsys,
                                                                 monkeypatch):
    monkeypatch.setattr(preflight, "free_bytes", lambda path: 1000)
    code, _, err = run(capsys, tiny_args(tmp_path / "run", cache_dir))
    assert_clean_failure(code, err, 1, "not enough free disk space", "1000 B are free")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_missing_model_with_debug_shows_the_traceback(tmp_path, cache_dir, capsys):
    code, _, err = run(capsys, tiny_args(tmp_path / "run", cache_dir,
                                         f"model.name={tmp_path / 'nope'}", "--debug"))
    assert code == 1 and "Traceback" in err and "no such folder" in err


def test_a_bug_in_mr1fast_shows_its_traceback(tmp_path, cache_dir, capsys, monkeypatch):
    import mr1fast.trainer.grpo as grpo

    def broken(*args, **kwargs):
        raise RuntimeError("an internal invariant broke")

    monkeypatch.setattr(grpo, "group_advantages", broken)
    code, _, err = run(capsys, tiny_args(tmp_path / "run", cache_dir))
    assert code == 70
    assert "Traceback" in err and "an internal invariant broke" in err
    assert "this is a bug in mr1fast" in err


# -- nothing lost -------------------------------------------------------------------------------

def test_disk_full_while_checkpointing_keeps_the_previous_one(tmp_path, cache_dir, capsys,
                                                              monkeypatch):
    real_save = checkpoint_module.dcp.save
    calls = {"n": 0}

    def full_disk_second_time(*args, **kwargs):  # while writing step-000004's weights
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint_module.dcp, "save", full_disk_second_time)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir))
    assert_clean_failure(code, err, 1, "no space left on device while writing checkpoint "
                         "step-000004", "the previous checkpoint step-000002 is intact",
                         "rerun the same command")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-000002"]
    monkeypatch.setattr(checkpoint_module.dcp, "save", real_save)
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir))
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


def test_ctrl_c_keeps_the_checkpoints_and_the_same_command_resumes(tmp_path, cache_dir, capsys,
                                                                   monkeypatch):
    import mr1fast.trainer.run as run_module

    real_end_step = run_module.Run.end_step

    def interrupt_after_step_3(self, step, metrics, **state):
        real_end_step(self, step, metrics, **state)
        if step + 1 == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(run_module.Run, "end_step", interrupt_after_step_3)
    run_dir = tmp_path / "run"
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir))
    assert code == 130
    assert f"interrupted; the newest checkpoint is {run_dir / 'checkpoints' / 'step-000002'}" \
        in err and "rerunning the same command resumes from it" in err
    monkeypatch.setattr(run_module.Run, "end_step", real_end_step)
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir))
    assert code == 0, err
    assert "resumed from" in err and "step-000002" in err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4]


@pytest.mark.parametrize("damage", ["truncated", "corrupted"])
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, cache_dir, capsys,
                                                               damage):
    run_dir = tmp_path / "run"
    assert run(capsys, tiny_args(run_dir, cache_dir))[0] == 0
    weights = run_dir / "checkpoints" / "step-000004" / "weights" / "__0_0.distcp"
    data = bytearray(weights.read_bytes())
    if damage == "truncated":
        weights.write_bytes(data[: len(data) // 2])
        why = "weights/__0_0.distcp has"
    else:
        data[len(data) // 2] ^= 0xFF
        weights.write_bytes(bytes(data))
        why = "weights/__0_0.distcp does not match its checksum"
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir, "grpo.max_steps=6"))
    assert code == 0, err
    assert f"checkpoint {run_dir / 'checkpoints' / 'step-000004'} is damaged ({why}" in err
    assert "resumed from" in err and "step-000002 at step 2" in err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]


def test_a_second_run_into_the_same_folder_refuses(tmp_path, cache_dir, capsys):
    """Two real runs: the first (a process) holds the folder; the second refuses, naming it;
    the first finishes with every step and checkpoint."""
    run_dir = tmp_path / "run"
    args = tiny_args(run_dir, cache_dir, "grpo.max_steps=12", "log.save_every=4")
    first = subprocess.Popen([sys.executable, "-m", "mr1fast", *args], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ, PYTHONPATH=str(ROOT / "tests")))
    lock = run_dir / preflight.LOCK_FILE
    deadline = time.time() + 120
    while not (lock.exists() and f'"pid": {first.pid}' in lock.read_text()):
        assert first.poll() is None, first.communicate()
        assert time.time() < deadline, "the first run never took the lock"
        time.sleep(0.1)
    code, _, err = run(capsys, args)
    assert_clean_failure(code, err, 1, f"output folder {run_dir} is in use by another mr1fast "
                         f"run (pid {first.pid}", "what to do: wait for it")
    out, err_first = first.communicate(timeout=600)
    assert first.returncode == 0, err_first
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(1, 13))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["step-000008", "step-000012"]


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, cache_dir, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run_dir / preflight.LOCK_FILE).write_text(json.dumps(
        {"pid": dead.pid, "host": "h", "started": "earlier", "command": "mr1fast train"}))
    code, _, err = run(capsys, tiny_args(run_dir, cache_dir, "grpo.max_steps=1"))
    assert code == 0, err
    assert f"taking over the lock of {run_dir} from a run that is no longer running " \
           f"(pid {dead.pid}" in err
    assert (run_dir / preflight.LOCK_FILE).read_text() == ""  # released cleanly


# -- values that enter: rows and rewards --------------------------------------------------------

def test_a_non_utf8_line_is_one_bad_row_and_a_bom_is_read(tmp_path):
    good = tmp_path / "good.jsonl"
    write_examples(make_counting(2, seed=1), good)
    lines = good.read_bytes().splitlines(keepends=True)
    data = tmp_path / "mixed.jsonl"
    (tmp_path / "good_images").rename(tmp_path / "mixed_images")
    data.write_bytes(b"\xef\xbb\xbf" + lines[0].replace(b"good_images", b"mixed_images")
                     + b'{"problem": "\xff\xfe", "solution": "1"}\n'
                     + b"\xef\xbb\xbf" + lines[1].replace(b"good_images", b"mixed_images"))
    warnings = []
    result = load_examples(data, warn=warnings.append)
    assert len(result.examples) == 2
    assert result.skipped == {"bad_encoding": 1}
    assert any("bad_encoding" in w for w in warnings)


def test_a_reward_beyond_float32_counts_as_missing():
    from mr1fast.trainer.rewards import RewardRunner

    messages = []
    with RewardRunner({"reward_fixtures:huge": 1.0}, isolate=False, log=messages.append) as r:
        result = r(["a", "b"], [{"solution": "1"}, {"solution": "2"}])
    assert result.values["reward_fixtures:huge"] == [None, 1.0]
    assert result.total == [0.0, 1.0] and result.failures["reward_fixtures:huge"] == 1
    assert any("outside float32's range" in m for m in messages)


def test_a_hub_id_that_cannot_be_loaded_says_both_what_was_tried(monkeypatch):
    """A name that is not a local folder is tried as a hub id; offline or unknown, both are
    named (AutoConfig's error stands in for the hub's)."""
    import transformers

    from mr1fast.trainer.errors import UserError

    def offline(name, *args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", offline)
    with pytest.raises(UserError, match="no such local folder, and the hub id cannot be loaded "
                                        r"\(We couldn't connect"):
        preflight.check_model("some-org/some-model")


def test_cuda_out_of_memory_says_what_to_change(tmp_path, cache_dir, capsys, monkeypatch):
    import mr1fast.trainer.grpo as grpo

    def oom(*args, **kwargs):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(grpo, "group_advantages", oom)
    code, _, err = run(capsys, tiny_args(tmp_path / "run", cache_dir))
    assert_clean_failure(code, err, 1, "CUDA out of memory (CUDA out of memory. Tried",
                         "model.gradient_checkpointing=true")


@pytest.fixture
def small_disk(tmp_path):
    """A 6 MiB tmpfs: a real file system that fills up (needs mount rights, else skipped)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mount_point)],
                          capture_output=True)
    if made.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {made.stderr.decode().strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def test_a_really_full_disk_keeps_the_previous_checkpoint(small_disk, cache_dir, capsys):
    """A real ENOSPC: a step checkpoint of the tiny model is ~2.2 MiB, two are kept, so the
    third does not fit in 6 MiB. The writers report it in their own ways (DCP wraps the
    OSError); the message must still say the disk is full and name the intact checkpoint. After freeing space the same command
    resumes and finishes, with every metrics row."""
    run_dir = small_disk / "run"
    args = tiny_args(run_dir, cache_dir, "grpo.max_steps=6", "log.keep_checkpoints=2")
    code, _, err = run(capsys, args)
    assert_clean_failure(code, err, 1, "no space left on device while writing checkpoint "
                         "step-000006", "the previous checkpoint step-000004 is intact")
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == \
        ["step-000002", "step-000004"]
    import shutil
    shutil.rmtree(run_dir / "checkpoints" / "step-000002")  # the user frees some space
    code, _, err = run(capsys, args)
    assert code == 0, err
    assert [r["step"] for r in read_metrics(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
