"""mr1fast.integrations.trl against TRL 1.16's own GRPOTrainer._compute_loss.

On identical micro-batches (the dict _generate_and_score_completions returns) TRL's loss path
and the drop-in must agree in the loss, in every model parameter's gradient and in the metrics
TRL logs, for every option both support; a few TRL training steps with the drop-in must train
what TRL trains; the beta schedule must set beta per step. Tiny Qwen2 text model (fp32, CPU,
built here: no downloads).
"""
import ast
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import mr1fast.rollout  # noqa: F401  (the torchvision shim, before transformers and trl)
from helpers import assert_close

pytest.importorskip("trl")
from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

import mr1fast  # noqa: E402
from mr1fast.integrations.trl import (BetaScheduleCallback, MR1GRPOTrainer,  # noqa: E402
                                      compute_loss, patch)
from mr1fast.loss.schedules import beta_schedule  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# One tolerance table: (rtol, atol relative to the largest magnitude) of the drop-in against
# TRL in fp32, for the loss, each parameter's gradient and the metrics.
TOL = {"loss": (1e-5, 1e-6), "grad": (1e-5, 1e-5), "metric": (1e-5, 1e-6)}
B, P, T = 4, 5, 7  # rows, prompt length, completion length of the test micro-batch
NOISE = 0.3        # spread of old / reference / sampler log-probs around the policy's


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """Folders untied/ and tied/: a saved tiny Qwen2 causal LM (vocab ~320; LM head untied
    from, or tied to, the embedding) and its locally trained tokenizer. TRL builds its
    reference model from the folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

    from mr1fast.trainer.model import _TOKENIZER_CORPUS, CHAT_TEMPLATE, SPECIAL_TOKENS

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(_TOKENIZER_CORPUS * 4, trainers.BpeTrainer(
        vocab_size=320, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>",
                                  pad_token="<|endoftext|>")
    tok.chat_template = CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("tiny-qwen2")
    for tied in (False, True):
        torch.manual_seed(0)
        model = Qwen2ForCausalLM(Qwen2Config(
            vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=tied,
            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
        model.save_pretrained(out / ("tied" if tied else "untied"))
        tok.save_pretrained(out / ("tied" if tied else "untied"))
    return out


def reward_len(completions, **_):
    return [float(len(c)) for c in completions]


def make_trainer(tiny_lm, tmp_path, cls=GRPOTrainer, tied=False, callbacks=None, **config):
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    path = tiny_lm / ("tied" if tied else "untied")
    model = Qwen2ForCausalLM.from_pretrained(path, dtype=torch.float32)
    data = Dataset.from_dict({"prompt": ["How many circles are there?",
                                         "find the angle x", "red green blue", "3 4 5"] * 4})
    config = {"per_device_train_batch_size": 4, "num_generations": 4,
              "max_completion_length": 8, "learning_rate": 1e-2, **config}
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                      bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
                      logging_steps=1, **config)
    return cls(model=model, reward_funcs=reward_len, args=args, train_dataset=data,
               processing_class=AutoTokenizer.from_pretrained(path), callbacks=callbacks)


def vllm_ratio(old, sampling, mask, mode, clip_min, clip_max):
    """The vLLM importance-sampling ratio as TRL's _generate_and_score_completions computes it
    (B, T) for token modes, (B, 1) for sequence modes."""
    d = torch.nan_to_num((old - sampling) * mask, nan=0.0)
    if mode.startswith("sequence"):
        d = d.sum(-1, keepdim=True)
    ratio = torch.exp(d)
    if mode.endswith("truncate"):
        return ratio.clamp(min=clip_min, max=clip_max)
    lo = -math.inf if clip_min is None else clip_min
    hi = math.inf if clip_max is None else clip_max
    return ratio.masked_fill((ratio < lo) | (ratio > hi), 0.0)


def micro_batch(trainer, seed=0, old=True, sampling=True, tool_mask=False, token_adv=False,
                empty_row=False, num_items_scale=3):
    """A micro-batch as _generate_and_score_completions returns it: left-padded prompts,
    right-padded completions, old / reference / sampler log-probs near the policy's."""
    g = torch.Generator().manual_seed(seed)
    V = trainer.model.config.vocab_size
    prompt_ids = torch.randint(10, V, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, :2] = 0
    completion_ids = torch.randint(10, V, (B, T), generator=g)
    completion_mask = torch.ones(B, T, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[2, 6:] = 0
    if empty_row:
        completion_mask[3] = 0
    adv = torch.randn((B, T) if token_adv else (B,), generator=g)
    adv[0] = 0.0  # A == 0: the sign conventions of sapo (A > 0) and vespo / OPSM (A >= 0)
    inputs = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                  completion_mask=completion_mask, advantages=adv)
    mask = completion_mask
    if tool_mask:
        inputs["tool_mask"] = torch.ones(B, T, dtype=torch.long)
        inputs["tool_mask"][0, 2:4] = 0
        mask = mask * inputs["tool_mask"]
    inputs["num_items_in_batch"] = mask.sum() * num_items_scale
    with torch.no_grad():
        logp, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1),
            torch.cat([prompt_mask, completion_mask], 1), T)
    near = lambda: (logp + NOISE * torch.randn(B, T, generator=g)) * completion_mask  # noqa
    if old:
        inputs["old_per_token_logps"] = near()
    if trainer.beta != 0.0:
        inputs["ref_per_token_logps"] = near()
    if sampling:
        inputs["sampling_per_token_logps"] = near()
    if trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        inputs["importance_sampling_ratio"] = vllm_ratio(
            inputs["old_per_token_logps"], inputs["sampling_per_token_logps"], mask,
            trainer.vllm_importance_sampling_mode, trainer.vllm_importance_sampling_clip_min,
            trainer.vllm_importance_sampling_clip_max)
    return inputs


def loss_grads_metrics(trainer, loss_fn, inputs):
    model = trainer.model
    model.zero_grad(set_to_none=True)
    for mode in ("train", "eval"):
        trainer._metrics[mode].clear()
    loss = loss_fn(trainer, model, inputs)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    mode = "train" if model.training else "eval"
    return loss.detach(), grads, {k: list(v) for k, v in trainer._metrics[mode].items()}


def assert_same(name, got, want, tol):
    rtol, atol = TOL[tol]
    assert_close(name, got, want, atol=atol * max(want.abs().max().item(), 1e-30), rtol=rtol)


# id -> (GRPOConfig overrides, trainer attributes set after construction, micro_batch options).
# The vLLM cases set use_vllm on the built trainer: GRPOConfig(use_vllm=True) would start vLLM.
VLLM = {"use_vllm": True, "vllm_importance_sampling_correction": True}
CASES = {
    **{lt: ({"loss_type": lt}, {}, {}) for lt in
       ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")},
    "cispo-eps5": ({"loss_type": "cispo", "epsilon_high": 1.1}, {}, {}),
    "luspo-sequence": ({"loss_type": "luspo", "importance_sampling_level": "sequence"}, {}, {}),
    **{f"{lt}-sequence": ({"loss_type": lt, "importance_sampling_level": "sequence"}, {}, {})
       for lt in ("grpo", "dapo", "cispo", "sapo")},
    "grpo-eps-high": ({"loss_type": "grpo", "epsilon": 0.1, "epsilon_high": 0.28}, {}, {}),
    "grpo-delta": ({"loss_type": "grpo", "delta": 1.2}, {}, {}),
    "dapo-delta-sequence": ({"loss_type": "dapo", "delta": 1.1,
                             "importance_sampling_level": "sequence"}, {}, {}),
    "grpo-beta-bias-corrected": ({"loss_type": "grpo", "beta": 0.1}, {}, {}),
    "grpo-beta-k3": ({"loss_type": "grpo", "beta": 0.1, "use_bias_correction_kl": False}, {},
                     {}),
    "dapo-beta-sequence": ({"loss_type": "dapo", "beta": 0.2,
                            "importance_sampling_level": "sequence"}, {}, {}),
    "vespo-beta": ({"loss_type": "vespo", "beta": 0.1}, {}, {}),
    "top-entropy": ({"loss_type": "bnpo", "top_entropy_quantile": 0.3}, {}, {}),
    "top-entropy-beta": ({"loss_type": "grpo", "top_entropy_quantile": 0.5, "beta": 0.05}, {},
                         {}),
    "entropy-bonus-grpo": ({"loss_type": "grpo", "entropy_coef": 0.05}, {}, {}),
    "entropy-bonus-dapo-ga": ({"loss_type": "dapo", "entropy_coef": -0.1,
                               "gradient_accumulation_steps": 2}, {}, {}),
    "entropy-bonus-top-entropy": ({"loss_type": "dapo", "entropy_coef": 0.05,
                                   "top_entropy_quantile": 0.4}, {}, {}),
    "off-policy-mask": ({"loss_type": "grpo", "off_policy_mask_threshold": 0.05}, {}, {}),
    "off-policy-mask-old": ({"loss_type": "dapo", "off_policy_mask_threshold": 0.0}, {},
                            {"sampling": False}),
    **{f"vllm-{mode}": ({"loss_type": "grpo", "vllm_importance_sampling_clip_min": 0.5,
                         "vllm_importance_sampling_clip_max": 1.5},
                        {**VLLM, "vllm_importance_sampling_mode": mode}, {})
       for mode in ("token_truncate", "token_mask", "sequence_truncate", "sequence_mask")},
    "vllm-dapo-beta-opsm": ({"loss_type": "dapo", "beta": 0.1,
                             "off_policy_mask_threshold": 0.02},
                            {**VLLM, "vllm_importance_sampling_mode": "sequence_mask"}, {}),
    **{f"vllm-vespo-{mode}": ({"loss_type": "vespo", "vllm_importance_sampling_clip_max": 2.0},
                              {**VLLM, "vllm_importance_sampling_mode": mode}, {})
       for mode in ("token_truncate", "token_mask")},
    "vllm-vespo-clip-min-above-1": ({"loss_type": "vespo",
                                     "vllm_importance_sampling_clip_min": 1.05,
                                     "vllm_importance_sampling_clip_max": 2.0},
                                    {**VLLM, "vllm_importance_sampling_mode": "token_truncate"},
                                    {}),
    "temperature": ({"loss_type": "grpo", "temperature": 0.7, "beta": 0.1,
                     "entropy_coef": 0.02}, {}, {}),
    "ga3-grpo": ({"loss_type": "grpo", "gradient_accumulation_steps": 3}, {}, {}),
    "ga2-dapo-spg4": ({"loss_type": "dapo", "gradient_accumulation_steps": 2,
                       "steps_per_generation": 4}, {}, {}),
    "ga2-cispo": ({"loss_type": "cispo", "gradient_accumulation_steps": 2}, {}, {}),
    "ga2-luspo-eval": ({"loss_type": "luspo", "gradient_accumulation_steps": 2}, {"eval": True},
                       {}),
    "ga2-dapo-eval": ({"loss_type": "dapo", "gradient_accumulation_steps": 2}, {"eval": True},
                      {}),
    "on-policy": ({"loss_type": "grpo", "beta": 0.1}, {}, {"old": False, "sampling": False}),
    "tool-mask": ({"loss_type": "dapo", "beta": 0.1}, {}, {"tool_mask": True}),
    "token-advantages": ({"loss_type": "grpo", "importance_sampling_level": "sequence"}, {},
                         {"token_adv": True}),
    "empty-row": ({"loss_type": "grpo", "beta": 0.1}, {}, {"empty_row": True}),
    "tied-head": ({"loss_type": "dapo", "beta": 0.1, "tied": True}, {}, {}),
}
# Metrics the drop-in cannot log (module doc of mr1fast.integrations.trl).
NOT_LOGGED = {"entropy-bonus-top-entropy": {"policy_loss"}}
# Where mr1fast's specification and TRL's code disagree.
DISAGREE = {"vllm-vespo-clip-min-above-1": (
    "VESPO's sequence weight with a token-level vLLM ratio: TRL sums log(ratio) over all T "
    "positions, padding included (get_gamma_weights, grpo_trainer.py:3000-3003); mr1fast's "
    "reference multiplies it by (mask != 0). At padding TRL's ratio is exp(0) = 1 clipped to "
    "[clip_min, clip_max], so they differ when clip_min > 1 or clip_max < 1: here clip_min "
    "1.05, rows with 3 and 1 padding tokens, loss -0.751616 (mr1fast) vs -0.753477 (TRL)")}
PHI_EMPTY_ROW = (
    "VESPO's phi of a sequence without unmasked tokens: mr1fast's stats['phi_mean'] "
    "(reference.make_stats) counts it as 0, TRL's vespo/phi_seq_mean (grpo_trainer.py:3288) "
    "as phi(w = 1) = 1; test batch with row 4 of 4 empty: 0.467380 vs 0.717380")


@pytest.mark.parametrize("case", [
    pytest.param(c, marks=pytest.mark.xfail(strict=True, reason=DISAGREE[c]))
    if c in DISAGREE else c for c in CASES])
def test_loss_gradients_metrics_equal_trl(case, tiny_lm, tmp_path):
    config, attrs, batch_opts = CASES[case]
    config = dict(config)
    tied = config.pop("tied", False)
    attrs = dict(attrs)
    evaluate = attrs.pop("eval", False)
    trainer = patch(make_trainer(tiny_lm, tmp_path, tied=tied, **config))
    for k, v in attrs.items():
        setattr(trainer, k, v)
    trainer.current_gradient_accumulation_steps = trainer.args.gradient_accumulation_steps
    trainer.model.train(not evaluate)
    inputs = micro_batch(trainer, **batch_opts)

    assert_drop_in_equals_trl(trainer, inputs, NOT_LOGGED.get(case, set()))


def assert_drop_in_equals_trl(trainer, inputs, not_logged=frozenset()):
    want_loss, want_grads, want_metrics = loss_grads_metrics(trainer, GRPOTrainer._compute_loss,
                                                             inputs)
    got_loss, got_grads, got_metrics = loss_grads_metrics(trainer, compute_loss, inputs)

    assert want_loss.abs() > 1e-4, "a degenerate case: TRL's loss is ~0"
    assert_same("loss", got_loss, want_loss, "loss")
    assert set(got_grads) == set(want_grads) and len(want_grads) > 0
    for name, want in want_grads.items():
        assert want.abs().max() > 0, f"{name}: TRL's gradient is zero"
        assert_same(f"grad {name}", got_grads[name], want, "grad")
    assert set(got_metrics) == set(want_metrics) - set(not_logged)
    for key, got in got_metrics.items():
        got, want = torch.tensor(got), torch.tensor(want_metrics[key])
        assert torch.equal(got.isnan(), want.isnan()), f"metric {key}: {got} vs {want}"
        assert_same(f"metric {key}", got.nan_to_num(), want.nan_to_num(), "metric")
    return want_grads


def test_vision_language_model_equals_trl(tiny_model_dir, tmp_path):
    """The tiny Qwen2-VL with image prompts: the micro-batch comes from TRL's own
    _generate_and_score_completions (pixel_values, image_grid_thw, mm_token_type_ids,
    num_images), and the vision tower's gradients are compared too."""
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from mr1fast.trainer.data import make_counting

    rows = make_counting(2, seed=0)
    data = Dataset.from_list([{"prompt": [{"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": r["problem"]}]}], "image": r["image"]}
        for r in rows])
    args = GRPOConfig(output_dir=str(tmp_path / "out"), report_to="none", use_cpu=True,
                      bf16=False, save_strategy="no", disable_tqdm=True, seed=0,
                      per_device_train_batch_size=4, num_generations=4, max_completion_length=6,
                      loss_type="dapo", beta=0.1, top_entropy_quantile=0.5)
    trainer = patch(GRPOTrainer(
        model=Qwen2VLForConditionalGeneration.from_pretrained(tiny_model_dir,
                                                              dtype=torch.float32),
        reward_funcs=reward_len, args=args, train_dataset=data,
        processing_class=AutoProcessor.from_pretrained(tiny_model_dir)))
    trainer.current_gradient_accumulation_steps = 1
    inputs = trainer._generate_and_score_completions([data[0], data[0], data[1], data[1]])
    assert inputs["pixel_values"].numel() and inputs["image_grid_thw"].shape == (4, 3)
    g = torch.Generator().manual_seed(0)
    inputs["advantages"] = torch.randn(4, generator=g)
    inputs["old_per_token_logps"] = inputs["ref_per_token_logps"] + NOISE * torch.randn(
        inputs["ref_per_token_logps"].shape, generator=g) * inputs["completion_mask"]
    trainer.model.train()
    grads = assert_drop_in_equals_trl(trainer, inputs)
    assert any(name.startswith("model.visual.") for name in grads)


def test_clip_metrics_fire(tiny_lm, tmp_path):
    """The test micro-batch clips on both sides, so the clip metrics compared above are not
    all zeros."""
    trainer = patch(make_trainer(tiny_lm, tmp_path, loss_type="grpo"))
    trainer.current_gradient_accumulation_steps = 1
    _, _, metrics = loss_grads_metrics(trainer, compute_loss, micro_batch(trainer))
    assert metrics["clip_ratio/low_mean"][0] > 0 and metrics["clip_ratio/high_mean"][0] > 0


@pytest.mark.parametrize("empty_row", [False, pytest.param(True, marks=pytest.mark.xfail(
    strict=True, reason=PHI_EMPTY_ROW))])
def test_vespo_phi_mean_stat_matches_trl(tiny_lm, tmp_path, empty_row):
    """grpo_loss's stats["phi_mean"] against TRL's vespo/phi_seq_mean (the drop-in logs TRL's,
    from GRPOTrainer.get_gamma_weights)."""
    trainer = patch(make_trainer(tiny_lm, tmp_path, loss_type="vespo"))
    trainer.current_gradient_accumulation_steps = 1
    inputs = micro_batch(trainer, empty_row=empty_row)
    _, _, metrics = loss_grads_metrics(trainer, GRPOTrainer._compute_loss, inputs)
    ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
    am = torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], 1)
    with torch.no_grad():
        hidden = trainer.model.base_model(input_ids=ids, attention_mask=am).last_hidden_state
        _, stats = mr1fast.grpo_loss(
            hidden[:, -T - 1:-1], trainer.model.lm_head.weight, inputs["completion_ids"],
            inputs["advantages"], mask=inputs["completion_mask"],
            old_logp=inputs["old_per_token_logps"], loss_type="vespo", check_values=False)
    assert stats["phi_mean"].item() == pytest.approx(metrics["vespo/phi_seq_mean"][0], rel=1e-5)


@pytest.mark.parametrize("config, attrs, message", [
    ({"use_adaptive_entropy": True}, {}, "use_adaptive_entropy"),
    ({"epsilon": 1.0}, {}, "GRPOConfig.epsilon"),
    ({"delta": 0.9}, {}, "GRPOConfig.delta"),
    ({}, {"loss_type": "ppo"}, "loss_type='ppo'"),
    ({}, {"importance_sampling_level": "chunk"}, "importance_sampling_level='chunk'"),
    ({}, {"aux_loss_enabled": True}, "router_aux_loss_coef"),
])
def test_unsupported_options_raise(tiny_lm, tmp_path, config, attrs, message):
    trainer = make_trainer(tiny_lm, tmp_path, **config)
    for k, v in attrs.items():
        setattr(trainer, k, v)
    with pytest.raises(ValueError, match=message):
        patch(trainer)


def test_logit_softcap_raises(tiny_lm, tmp_path):
    trainer = make_trainer(tiny_lm, tmp_path)
    trainer.model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        patch(trainer)


def test_import_mr1fast_does_not_import_trl():
    out = subprocess.run([sys.executable, "-c", "import sys, mr1fast, mr1fast.integrations; "
                          "print(sorted(m for m in sys.modules if m.split('.')[0] in "
                          "('trl', 'transformers')))"], capture_output=True, text=True,
                         cwd=ROOT, check=True)
    assert out.stdout.strip() == "[]"


def test_integration_imports_only_the_loss():
    """Dependency direction: integrations -> loss (never the trainer or the rollout)."""
    tree = ast.parse((ROOT / "mr1fast" / "integrations" / "trl.py").read_text())
    modules = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            modules |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = ("", "mr1fast.integrations.", "mr1fast.")[node.level]
            modules.add(base + (node.module or ""))
    internal = {m for m in modules if m.split(".")[0] == "mr1fast"}
    assert internal and all(m.startswith("mr1fast.loss") for m in internal), internal


def params(trainer):
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters()}


def test_training_steps_equal_trl(tiny_lm, tmp_path):
    """Three TRL training steps (generation, rewards, reference model, two accumulated
    micro-batches per step, gradient checkpointing, SGD) with the drop-in train the same
    weights as TRL's own loss."""
    config = dict(loss_type="dapo", beta=0.04, gradient_accumulation_steps=2, max_steps=3,
                  optim="sgd", entropy_coef=0.01, gradient_checkpointing=True)
    runs, before = {}, None
    for name, cls in (("trl", GRPOTrainer), ("mr1fast", MR1GRPOTrainer)):
        trainer = make_trainer(tiny_lm, tmp_path / name, cls=cls, **config)
        before = before or params(trainer)
        trainer.train()
        runs[name] = trainer
    want, got = params(runs["trl"]), params(runs["mr1fast"])
    assert any(not torch.equal(before[n], want[n]) for n in want), "TRL did not train"
    for n in want:
        assert_close(f"param {n}", got[n], want[n], atol=1e-6, rtol=1e-5)
    logs = [{k: v for k, v in h.items() if k in ("loss", "kl", "entropy", "policy_loss")}
            for h in runs["trl"].state.log_history[:3]]
    got_logs = [{k: h[k] for k in want_h} for want_h, h in
                zip(logs, runs["mr1fast"].state.log_history[:3])]
    assert len(logs) == 3 and all("kl" in h and "loss" in h for h in logs)
    for a, b in zip(got_logs, logs):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7)


def test_beta_schedule_callback_sets_beta_per_step(tiny_lm, tmp_path):
    """A linear schedule 0 -> 0.09 over 3 steps, one generation batch per 2 steps: beta is 0 at
    the step that generates the first batch and > 0 at the next, which trains on it with the
    reference log-probs the drop-in had TRL compute anyway."""
    callback = BetaScheduleCallback("linear", beta_start=0.0, beta_end=0.09)
    trainer = make_trainer(tiny_lm, tmp_path, cls=MR1GRPOTrainer, callbacks=[callback],
                           beta=0.5, max_steps=3, steps_per_generation=2, loss_type="grpo")
    trainer.train()
    fn = beta_schedule("linear", 3, beta_start=0.0, beta_end=0.09)
    steps = [h for h in trainer.state.log_history if "loss" in h]
    assert [h["beta"] for h in steps] == pytest.approx([fn(0), fn(1), fn(2)])
    assert [h["beta"] for h in steps] == pytest.approx([0.0, 0.03, 0.06])
    assert "kl" not in steps[0] and steps[1]["kl"] > 0 and steps[2]["kl"] > 0
    assert trainer.beta == pytest.approx(0.06)


def test_beta_schedule_grpo_d_preset(tiny_lm, tmp_path):
    callback = BetaScheduleCallback("grpo_d", preset="geometry")
    trainer = make_trainer(tiny_lm, tmp_path, callbacks=[callback], beta=0.01, max_steps=2)
    patch(trainer)
    trainer.train()
    fn = beta_schedule("grpo_d", 2, preset="geometry")
    assert [h["beta"] for h in trainer.state.log_history if "loss" in h] == \
        pytest.approx([fn(0), fn(1)])


def test_beta_schedule_rejects_beta_zero(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="beta=0.0"):
        make_trainer(tiny_lm, tmp_path, cls=MR1GRPOTrainer, beta=0.0,
                     callbacks=[BetaScheduleCallback("grpo_d", preset="counting")])


def test_beta_schedule_checks_its_arguments(tiny_lm, tmp_path):
    with pytest.raises(ValueError, match="unknown beta_top"):
        BetaScheduleCallback("grpo_d", beta_top=1.0)
    with pytest.raises(ValueError, match="only for a schedule kind"):
        BetaScheduleCallback(lambda step: 0.1, preset="counting")
    trainer = make_trainer(tiny_lm, tmp_path, beta=0.1, max_steps=1,
                           callbacks=[BetaScheduleCallback(lambda step: 0.1)])
    with pytest.raises(RuntimeError, match="not bound"):
        trainer.train()
