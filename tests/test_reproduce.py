"""`mr1fast reproduce`: a tiny grid (2 seeds, both tasks, GRPO-D, tuned constant-beta GRPO, SFT)
run to the end through an interruption, and the grid file's checks."""
import json
import statistics

import pytest
import yaml

from mr1fast.trainer import reproduce as rp
from mr1fast.trainer.errors import UsageError

GRID = {
    "recipe": "embedded",
    "overrides": {"grpo": {"sft_warmup_steps": 0, "max_completion_length": 8,
                           "num_generations": 2, "prompts_per_step": 2},
                  "sft": {"batch_size": 4},
                  "data": {"synthetic_size": 16},
                  "log": {"save_every": 1, "eval_every": 1, "progress": False},
                  "eval": {"limit": 2, "synthetic_size": 2, "max_new_tokens": 4}},
    "base": {"sft": {"sft": {"max_steps": 2}}},
    "seeds": [0, 1],
    "examples": 4,
    "tasks": {"counting": "synthetic:counting", "geometry": "synthetic:geometry"},
    "methods": {
        "grpo-d": {"recipe": "grpo", "task_overrides": {"geometry": {"grpo": {"beta_schedule": {
            "kind": "grpo_d", "beta_min": 0.0, "beta_max": 0.02, "explore_ratio": 0.3}}}}},
        "grpo": {"recipe": "grpo", "overrides": {"grpo": {"beta_schedule": {
            "kind": "constant", "beta": 0.04}}}, "tune_beta": [0.0, 0.04]},
        "sft": {"recipe": "sft"}},
    "eval": {"validation": 3, "test": 4, "data_seed": 7, "max_new_tokens": 4, "batch_size": 4,
             "samples": 2},
    "paper": {"grpo-d": {"counting": 76.5}},
    "ablations": {"format_weight": {"method": "grpo-d", "task": "counting",
                                    "key": "grpo.rewards.format", "values": [0.0, 1.0]}},
}


def _files(tmp_path):
    """Geometry as the paper's tasks come: a training file (its first rows held out as the
    validation split) and a separate test file."""
    from mr1fast.trainer.data import GENERATORS, write_examples
    train = write_examples(GENERATORS["geometry"](24, 11), tmp_path / "geo-train" / "t.jsonl")
    test = write_examples(GENERATORS["geometry"](8, 12), tmp_path / "geo-test" / "t.jsonl")
    return {"train": str(train), "validation": {"holdout": 3},
            "test": {"source": str(test), "items": 5}}


def _grid(tmp_path, cache_dir=None, **changes):
    grid = {**GRID, **changes}
    if cache_dir is not None:   # the pre-placed tiny model (seed 0) and a shared data cache
        grid["overrides"] = {**grid["overrides"], "cache_dir": str(cache_dir), "seed": 0}
    path = tmp_path / "grid.yaml"
    path.write_text(yaml.safe_dump(grid))
    return str(path)


def test_grid_runs_resumes_and_reports(tmp_path, cache_dir):
    grid = _grid(tmp_path, cache_dir, tasks={"counting": "synthetic:counting",
                                             "geometry": _files(tmp_path)})
    out = tmp_path / "out"
    seen = []

    class Stop(Exception):
        pass

    def stop_after_three(sub, result):
        seen.append(sub.id)
        if len(seen) == 3:
            raise Stop

    with pytest.raises(Stop):
        rp.reproduce(grid, str(out), on_done=stop_after_three)
    first = sorted(p.parent for p in (out / "runs").rglob("result.json"))
    assert len(first) == 3
    mtimes = {p: (p / "result.json").stat().st_mtime_ns for p in first}

    done = rp.reproduce(grid, str(out))
    # finished sub-runs were not run again
    assert all((p / "result.json").stat().st_mtime_ns == t for p, t in mtimes.items())
    results = done["results"]
    # 2 tasks x (grpo-d 2 seeds + grpo 2 betas on seed 0 + the chosen beta on seed 1 + sft 2)
    assert len(results) == 2 * (2 + 2 + 1 + 2)
    assert not any(r["method"].startswith("ablation") for r in results.values())
    # the constant beta is chosen per task on validation, never on test
    beta = done["aggregate"]["beta"]["grpo"]
    for task, b in beta.items():
        val = {c: results[f"grpo-beta{c:g}/{task}/seed0"]["validation"][task] for c in (0.0, 0.04)}
        assert val[b] == max(val.values()) and (val[0.0] != val[0.04] or b == 0.0)
        assert f"grpo-beta{b:g}/{task}/seed1" in results
    # the table's cells are the mean and std of the sub-runs' test accuracy
    row = done["aggregate"]["rows"]["grpo-d"]
    xs = [results[f"grpo-d/geometry/seed{s}"]["test"]["counting"] for s in (0, 1)]
    assert row["geometry->counting"][:2] == pytest.approx((statistics.fmean(xs),
                                                          statistics.stdev(xs)))
    assert row["counting"][2] == 2
    for r in results.values():
        assert set(r["test"]) == {"counting", "geometry"}
        assert set(r["validation_pass@2"]) == {"counting", "geometry"}
        assert 0.0 <= r["test"]["counting"] <= 100.0
    assert [s for s, _ in results["grpo-d/counting/seed0"]["curve"]] == [1]
    table = (out / "table.md").read_text()
    assert table.splitlines()[0].startswith("| method | counting (test %) | geometry (test %) |")
    assert "[paper 76.5]" in table and "Constant beta chosen on validation" in table
    assert (out / "figure.png").stat().st_size > 0
    saved = json.loads((out / "results.json").read_text())
    assert set(saved["results"]) == set(results)
    base = json.loads((out / "base" / "result.json").read_text())
    assert set(base["test"]) == {"counting", "geometry"}
    # the base every sub-run started from is the grid's SFT base
    cfg = yaml.safe_load((out / "runs" / "sft" / "counting" / "seed0" / "config.yaml").read_text())
    assert cfg["model"]["name"] == str(out / "base" / "train" / "checkpoints" / "final")
    assert cfg["sft"]["max_steps"] == 1 and cfg["seed"] == 0
    # geometry trains on its file without the held-out rows, validates on them, tests on the
    # other file (its own item count)
    cfg = yaml.safe_load((out / "runs" / "sft" / "geometry" / "seed0" / "config.yaml")
                         .read_text())
    assert cfg["data"]["train"].endswith("geo-train/t.jsonl") and cfg["data"]["holdout"] == 3
    evals = {p.parent.name: json.loads(p.read_text())["model"]
             for p in (out / "base").glob("eval-*/eval.json")}
    assert {(k, t, r["n"]) for k, m in evals.items() for t, r in m.items()} == {
        ("eval-validation", "counting", 3), ("eval-validation-1", "geometry", 3),
        ("eval-test", "counting", 4), ("eval-test-1", "geometry", 5)}


@pytest.mark.parametrize("change, message", [
    ({"seeds": []}, "seeds"),
    ({"examples": 0}, "examples"),
    ({"methods": {"x": {"recipe": "ppo"}}}, "methods.x.recipe"),
    ({"methods": {"x": {"recipe": "sft", "tune_beta": [0.1]}}}, "tune_beta"),
    ({"methods": {"x": {"recipe": "grpo", "task_overrides": {"ocr": {}}}}}, "task_overrides"),
    ({"eval": {"validation": 3}}, "eval.test"),
    ({"ablations": {"a": {"method": "nope", "task": "counting", "key": "grpo.lr",
                          "values": [1]}}}, "ablations.a"),
    ({"overrides": {"grpo": {"lrr": 1}}}, "grpo.lrr"),
    ({"colour": 1}, "unknown key"),
    ({"examples": {"counting": 4}}, "examples"),
    ({"methods": {"x": {"recipe": "sft", "examples": -1}}}, "methods.x.examples"),
    ({"tasks": {"counting": {"train": "a.jsonl"}}}, "tasks.counting"),
    ({"tasks": {"counting": {"train": "a.jsonl", "test": {"source": "b.jsonl", "colour": 1}}}},
     "tasks.counting.test"),
    ({"tasks": {"counting": {"train": "a.jsonl", "test": "b.jsonl",
                             "validation": {"holdout": 0}}}}, "tasks.counting.validation.holdout"),
    ({"tasks": {"counting": {"train": {"source": "a.jsonl", "limit": "all"}, "test": "b"}}},
     "tasks.counting.train.limit"),
    ({"tasks": {"counting": 3}}, "tasks.counting"),
    ({"tasks": {"counting": {"train": "a.jsonl", "test": "b.jsonl",
                             "validation": {"source": "a.jsonl", "split": "train"}}}},
     "the training rows themselves"),
    ({"tasks": {"counting": {"train": "a.jsonl", "test": "b.jsonl"}},
      "overrides": {"data": {"limit": 5}}}, r"overrides: sets \['data.limit'\], which tasks.counting"),
    ({"tasks": {"counting": {"train": "a.jsonl", "test": "b.jsonl"}},
      "methods": {"s": {"recipe": "sft", "task_overrides": {"counting": {"data": {"holdout": 1}}}}},
      "ablations": {}},
     "methods.s.task_overrides.counting: sets"),
    ({"overrides": {"data": {"train": "x.jsonl"}}}, "which tasks.counting decides"),
])
def test_bad_grids_name_the_key(tmp_path, change, message):
    if "tasks" in change:   # one bad task beside the grid's good ones
        change = {**change, "tasks": {**GRID["tasks"], **change["tasks"]}}
    with pytest.raises(UsageError, match=message):
        rp.load_grid(_grid(tmp_path, **change))


def test_shipped_grid_loads():
    first = open("configs/reproduce/embedded.yaml").readline()
    assert first.startswith("# mr1fast reproduce")
    grid = rp.load_grid("configs/reproduce/embedded.yaml")
    assert len(rp.sub_runs(grid, beta={})) == 18
    assert len(rp.sub_runs(grid, beta={"grpo": {"counting": 0.0, "geometry": 0.01}})) == 22


def test_the_paper_scale_grid_plans_the_real_recipes():
    """configs/reproduce/qwen2vl-2b.yaml (not run here: GPU work, hub data): each task trains
    on its own training set less a held-out validation slice and is tested on its own test
    set; GRPO runs R1-V's 2 epochs, SFT its 1 epoch; every sub-run's config validates."""
    grid = rp.load_grid("configs/reproduce/qwen2vl-2b.yaml")
    plan = rp.sub_runs(grid, beta={})
    assert len(plan) == 2 * 3 + 2 * 6 + 2 * 3       # GRPO-D, 6 betas on seed 0, SFT
    assert len(rp.sub_runs(grid, beta={"grpo": {"counting": 0.04, "geometry": 0.01}})) == 28
    subs = {s.id: s for s in plan}
    counting = rp.base_config(grid, subs["grpo-d/counting/seed1"].overrides)
    assert (counting.data.train, counting.data.split, counting.data.limit,
            counting.data.holdout) == ("leonardPKU/clevr_cogen_a_train", "train", 100, 200)
    assert counting.grpo.max_steps == 12 and counting.seed == 1          # 2 epochs of 6 x 16
    assert counting.log.eval_every == 4
    assert counting.grpo.beta_schedule["beta_max"] == 0.1
    assert counting.model.name == "Qwen/Qwen2-VL-2B-Instruct"
    geometry = rp.base_config(grid, subs["sft/geometry/seed0"].overrides)
    assert (geometry.data.train, geometry.data.limit, geometry.data.holdout,
            geometry.sft.max_steps) == ("leonardPKU/GEOQA_R1V_Train_8K", 0, 256, 486)
    assert rp.eval_overrides(grid, "counting", "validation") == {
        "eval.tasks": {"counting": "leonardPKU/clevr_cogen_a_train"}, "eval.split": "train",
        "eval.rows": 200}
    assert rp.eval_overrides(grid, "geometry", "test") == {
        "eval.tasks": {"geometry": "data/geoqa_test.jsonl"}, "eval.split": "test",
        "eval.rows": 0}
    assert grid.tasks["geometry"].test.items == 754 and grid.tasks["counting"].test.items == 200


def test_a_task_given_as_one_source_keeps_the_recipes_rows(tmp_path):
    """Only a task given as a mapping decides data.split, data.limit and data.holdout; one
    given as a source string leaves them to the recipe and the overrides."""
    grid = rp.load_grid(_grid(tmp_path, overrides={**GRID["overrides"],
                                                   "data": {"synthetic_size": 16, "limit": 7}}))
    sub = rp.sub_runs(grid, beta={})[0]
    assert sub.overrides["data.train"] == "synthetic:counting"
    assert not {"data.split", "data.limit", "data.holdout"} & set(sub.overrides)
    assert rp.base_config(grid, sub.overrides).data.limit == 7


def test_the_shared_base_never_trains_on_a_validation_holdout(tmp_path):
    files = _files(tmp_path)
    grid = rp.load_grid(_grid(tmp_path, tasks={"counting": "synthetic:counting",
                                               "geometry": files},
                              base={"sft": {"data": {"train": files["train"]}}}))
    keys = rp.base_sft_keys(grid, tmp_path / "base")
    assert keys["data.holdout"] == 3 and keys["data.train"] == files["train"]
    grid = rp.load_grid(_grid(tmp_path))      # the base's own data: nothing held out
    assert "data.holdout" not in rp.base_sft_keys(grid, tmp_path / "base")


def test_a_sub_run_with_the_config_of_a_finished_one_takes_its_result(tmp_path):
    """An ablation value equal to its method's setting is the method's own run: the same
    config digest, and run_sub takes the finished run's result instead of training again."""
    grid = rp.load_grid(_grid(tmp_path))
    subs = {s.id: s for s in rp.sub_runs(grid, beta={}, ablations=True)}

    def digest(i):
        return rp.config_digest(grid, subs[i])
    assert digest("ablation-format_weight-1/counting/seed0") == digest("grpo-d/counting/seed0")
    assert digest("ablation-format_weight-0/counting/seed0") != digest("grpo-d/counting/seed0")
    assert digest("grpo-d/counting/seed1") != digest("grpo-d/counting/seed0")
    assert digest("grpo-d/geometry/seed0") != digest("grpo-d/counting/seed0")
    first = {"id": "grpo-d/counting/seed0", "method": "grpo-d", "task": "counting", "seed": 0,
             "test": {"counting": 12.5}, "validation": {"counting": 25.0}, "seconds": 30.0}
    sub = subs["ablation-format_weight-1/counting/seed0"]
    out = rp.run_sub(grid, sub, tmp_path / "out", same=first)
    assert out["same_as"] == "grpo-d/counting/seed0" and out["test"] == first["test"]
    assert out["method"] == "ablation-format_weight-1" and out["seconds"] == 0.0
    saved = tmp_path / "out" / "runs" / sub.id / "result.json"
    assert json.loads(saved.read_text()) == out
    assert not (saved.parent / "checkpoints").exists()      # nothing trained


def test_the_command_reports_a_missing_grid(capsys):
    from mr1fast.trainer.cli import main
    assert main(["reproduce", "--grid", "no/such/grid.yaml"]) == 2
    err = capsys.readouterr().err
    assert "mr1fast reproduce: error: --grid no/such/grid.yaml: no such file" in err


def test_ablations_plan_their_sub_runs_and_tables(tmp_path):
    """--ablations adds each ablation's values x seeds, with the ablated key set on its
    method's config (the shipped grid's two sweeps: the format weight and constant beta), and
    its table holds the mean and std of each value's test accuracy."""
    grid = rp.load_grid(_grid(tmp_path))
    plain = rp.sub_runs(grid, beta={})
    subs = [s for s in rp.sub_runs(grid, beta={}, ablations=True) if s not in plain]
    assert [(s.method, s.seed) for s in subs] == [
        ("ablation-format_weight-0", 0), ("ablation-format_weight-0", 1),
        ("ablation-format_weight-1", 0), ("ablation-format_weight-1", 1)]
    for s in subs:
        cfg = rp.base_config(grid, {k: v for k, v in s.overrides.items()})
        assert cfg.grpo.rewards["format"] == float(s.method.rsplit("-", 1)[1])
        assert cfg.grpo.rewards["accuracy"] == 1.0 and s.task == "counting"
    results = {f"{s.method}/{s.task}/seed{s.seed}": {"method": s.method,
                                                    "test": {"counting": 10.0 * (i + 1)}}
               for i, s in enumerate(subs)}
    table = rp.ablation_tables(grid, results)
    assert "| 0.0 | 15.0 ± 7.1 (n=2) |" in table and "| 1.0 | 35.0 ± 7.1 (n=2) |" in table
    shipped = rp.load_grid("configs/reproduce/embedded.yaml")
    assert set(shipped.ablations) == {"format_weight", "constant_beta"}
    beta_runs = [s for s in rp.sub_runs(shipped, beta={}, ablations=True)
                 if s.method.startswith("ablation-constant_beta")]
    assert len(beta_runs) == 6 * len(shipped.seeds)
    cfg = rp.base_config(shipped, beta_runs[-1].overrides)
    assert cfg.grpo.beta_schedule == {"kind": "constant", "beta": 0.05}
