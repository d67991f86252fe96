"""The memory plan (mr1fast plan): the paper's recipes fit the GPUs they state, the estimate can
say no, FSDP shards scale with the process count, and the communication estimate shows why the
LM head is gathered (tied 2B) while a vocabulary-parallel loss would pay for the 7B."""
from pathlib import Path

import pytest
import torch

import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers)
from mr1fast.trainer.cli import main
from mr1fast.trainer.config import load_config
from mr1fast.trainer.plan import GB, communication, fits, memory_plan, micro_batch, model_shape

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p for p in (ROOT / "configs").rglob("*.yaml")   # reproduce/: grids of them
                 if ("qwen2vl" in p.name or p.parent.name == "ablations")
                 and "reproduce" not in p.parts)


@pytest.fixture(scope="module")
def shapes():
    return {name: model_shape(name) for name in ("Qwen/Qwen2-VL-2B-Instruct",
                                                 "Qwen/Qwen2-VL-7B-Instruct")}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.stem)
def test_every_recipe_fits_the_gpus_it_states(path, shapes):
    cfg = load_config(str(path))
    assert (cfg.dist.gpus, cfg.dist.gpu_gb) == ((8, 80) if "7b" in path.name else (1, 80))
    assert fits(cfg, cfg.dist.gpus, shapes[cfg.model.name], cfg.dist.gpu_gb), path.name


def test_the_plan_can_say_no(shapes):
    cfg = load_config(str(ROOT / "configs" / "qwen2vl-7b-counting-grpo-d.yaml"))
    assert not fits(cfg, 1, shapes[cfg.model.name], 80)  # 8.3 B parameters on one GPU


def test_shards_scale_with_the_process_count_and_the_paper_counts(shapes):
    two_b, seven_b = shapes.values()
    assert two_b.params == 2_208_985_600 and two_b.tied      # Qwen2-VL-2B-Instruct
    assert seven_b.params == 8_291_375_616 and not seven_b.tied  # Qwen2-VL-7B-Instruct
    cfg = load_config(str(ROOT / "configs" / "qwen2vl-7b-counting-grpo-d.yaml"))
    four, eight = (dict(memory_plan(cfg, n, seven_b, 1000)) for n in (4, 8))
    assert four["fp32 master weight shards"] == pytest.approx(
        2 * eight["fp32 master weight shards"])
    assert eight["fp32 master weight shards"] == pytest.approx(seven_b.params * 4 / 8)


def test_the_preset_count_is_the_built_models(tiny_model_dir):
    from mr1fast.trainer.model import load_model

    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    assert model_shape(str(tiny_model_dir)).params == sum(p.numel() for p in model.parameters())


def test_the_lm_head_options_by_their_bytes(shapes):
    """7B (untied): a vocabulary-parallel loss would move ~3x fewer bytes for the LM head than
    gathering it. 2B (tied): the embedding needs the whole weight anyway, so it would not."""
    for name, recipe in (("Qwen/Qwen2-VL-7B-Instruct", "qwen2vl-7b-counting-grpo-d"),
                         ("Qwen/Qwen2-VL-2B-Instruct", "qwen2vl-2b-counting-grpo-d")):
        cfg = load_config(str(ROOT / "configs" / f"{recipe}.yaml"))
        rows = memory_plan(cfg, 8, shapes[name], 80)
        comm = communication(cfg, 8, shapes[name], micro_batch(rows))
        if "7B" in name:
            assert comm["lm_head_vocab_parallel"] < comm["lm_head_gathered"] / 2
        else:
            assert comm["lm_head_vocab_parallel"] > comm["lm_head_gathered"]
        assert comm["fsdp"] > comm["lm_head_gathered"] > 0.5 * GB


def test_the_plan_command(capsys):
    recipe = str(ROOT / "configs" / "qwen2vl-7b-counting-grpo-d.yaml")
    assert main(["plan", "--config", recipe]) == 0
    out = capsys.readouterr().out
    assert "8 processes" in out and "fits a 80 GB GPU" in out and "vocabulary-parallel" in out
    assert main(["plan", "--config", recipe, "--nproc", "1"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_the_layouts_set_the_activations_and_the_micro_batch(shapes):
    """The whole batch in one micro-batch: the shared prefix holds each group's prompt once
    (fewer activation bytes); packed equals padded at the maximum lengths. A budget of 8192
    positions holds 8192 // (positions per completion) completions."""
    recipe = str(ROOT / "configs" / "qwen2vl-2b-counting-grpo-d.yaml")
    acts = {}
    for mode in ("padded", "packed", "shared_prefix"):
        cfg = load_config(recipe, [f"model.packing={mode}", "grpo.micro_batch_size=0",
                                   "grpo.max_tokens_per_micro_batch=0"])
        rows = memory_plan(cfg, 1, shapes[cfg.model.name], 1000)
        acts[mode] = next(b for w, b in rows if w.startswith("activations"))
        assert micro_batch(rows) == cfg.grpo.prompts_per_step * cfg.grpo.num_generations
    assert acts["shared_prefix"] < 0.75 * acts["padded"] and acts["packed"] == acts["padded"]
    cfg = load_config(recipe, ["grpo.max_tokens_per_micro_batch=8192"])
    P, C, G = (cfg.data.max_prompt_length, cfg.grpo.max_completion_length,
               cfg.grpo.num_generations)
    assert micro_batch(memory_plan(cfg, 1, shapes[cfg.model.name], 80)) == \
        min(cfg.grpo.prompts_per_step * G, int(8192 // (P / G + C)))
