"""Packed forwards (mr1fast/trainer/packing.py): the shared-prefix and plain packed layouts give
the padded per-completion forward's log-probs and gradients; the native data path (csrc/)
equals its Python reference and transformers' get_rope_index; FlexAttention's forward equals
SDPA's; token-budget micro-batches."""
import os
import random
import shutil
import warnings

import pytest
import torch
from PIL import Image

from mr1fast import token_logprobs
from mr1fast.rollout.sampler import Rollout
from mr1fast.trainer import packing as pk
from mr1fast.trainer.distributed import World
from mr1fast.trainer.forward import StepBatch
from mr1fast.trainer.grpo import logprobs
from mr1fast.trainer.model import (Policy, PromptEncoder, completion_hidden, encode_images,
                                   lm_head_weight, load_model)
from mr1fast.trainer.run import MicroBatchFit

CPU = torch.device("cpu")


def random_images(rng: random.Random, n: int) -> list:
    """n solid-colour images of varied sizes (the tiny processor's grids: 4x4 .. 8x8)."""
    return [Image.new("RGB", (rng.choice([56, 84, 112]), rng.choice([56, 84, 112])),
                      tuple(rng.randrange(256) for _ in range(3))) for _ in range(n)]


def random_batch(encoder, vocab: int, seed: int, counts=(0, 1, 2), G: int = 3, C: int = 9):
    """Prompts with `counts` images each and varied text, G completions per prompt of random
    lengths 1..C (ids [B, C] right-padded, lengths [B], prompt_of [B])."""
    rng = random.Random(seed)
    words = "how many objects circles squares are there in the picture count".split()
    questions = [" ".join(rng.choices(words, k=rng.randint(1, 12))) for _ in counts]
    prompts = encoder.encode([random_images(rng, k) for k in counts], questions, CPU)
    g = torch.Generator().manual_seed(seed)
    B = len(counts) * G
    ids = torch.randint(10, vocab, (B, C), generator=g)
    lengths = torch.tensor([rng.randint(1, C) for _ in range(B)])
    prompt_of = torch.arange(len(counts)).repeat_interleave(G)
    return prompts, ids, lengths, prompt_of


@pytest.fixture(scope="module")
def models(tiny_model_dir):
    """The tiny model loaded for the padded forward and for the packed ones (same weights)."""
    padded = load_model(str(tiny_model_dir), device=CPU, dtype=torch.float32)
    packed = load_model(str(tiny_model_dir), device=CPU, dtype=torch.float32,
                        packing="shared_prefix")
    packed.load_state_dict(padded.state_dict())
    return padded, packed, PromptEncoder(str(tiny_model_dir))


def test_packed_model_uses_the_registered_attention_for_text_only(models):
    _, packed, _ = models
    assert packed.config.text_config._attn_implementation == "mr1fast"
    assert packed.config.vision_config._attn_implementation == "sdpa"


# ---------------------------------------------------------------------------------------------
# The native data path.

def test_native_extension_is_built_where_a_compiler_exists():
    """setup.sh builds csrc/ wherever a C++ compiler exists (CI has one): not skipped there."""
    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the Python fallback runs")
    if os.environ.get("MR1FAST_NATIVE") == "0":
        pytest.skip("MR1FAST_NATIVE=0: the native extensions are switched off")
    assert pk.native() is not None, "mr1fast.trainer._native is not built: run `bash setup.sh`"


def _qwen25_model():
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLModel

    cfg = Qwen2_5_VLConfig(text_config=dict(vocab_size=64, hidden_size=32, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2,
                                            num_key_value_heads=1),
                           vision_config=dict(depth=1, hidden_size=32, out_hidden_size=32,
                                              num_heads=2, intermediate_size=32),
                           image_token_id=7, video_token_id=8, vision_start_token_id=5)
    return Qwen2_5_VLModel(cfg)


@pytest.mark.parametrize("arch", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("seed", range(4))
def test_rope_positions_equal_get_rope_index(models, arch, seed):
    """Random batches: 0-3 images per prompt of random grids, text of random length between
    them, left padding; native and Python both equal transformers' get_rope_index."""
    _, packed, _ = models
    model = packed.model if arch == "qwen2_vl" else _qwen25_model()
    rng = random.Random(seed)
    image_token, rows, grids = 7, [], []
    for _ in range(rng.randint(1, 5)):
        row = [rng.randrange(10, 60) for _ in range(rng.randint(1, 6))]
        for _ in range(rng.choice([0, 0, 1, 2, 3])):
            t, h, w = 1, 2 * rng.randint(1, 6), 2 * rng.randint(1, 6)
            grids.append([t, h, w])
            row += [1] + [image_token] * (t * h * w // 4) + [2]
            row += [rng.randrange(10, 60) for _ in range(rng.randint(0, 4))]
        rows.append(row)
    L = max(map(len, rows))
    ids = torch.tensor([[0] * (L - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (L - len(r)) + [1] * len(r) for r in rows])
    grid = torch.tensor(grids, dtype=torch.long).reshape(-1, 3)
    want, _ = model.get_rope_index(ids, (ids == image_token).int(),
                                   grid if len(grids) else None, attention_mask=mask)
    ref, ref_next = pk.rope_positions_reference(ids, mask, grid, image_token, 2)
    assert torch.equal(ref, want)
    assert ref_next.tolist() == [int(want[:, p].max()) + 1 for p in range(len(rows))]
    if pk.native() is not None:
        got, got_next = pk.rope_positions(ids, mask, grid, image_token, 2, use_native=True)
        assert torch.equal(got, want) and torch.equal(got_next, ref_next)


@pytest.mark.parametrize("seed", range(6))
def test_pack_layout_native_equals_the_reference(seed):
    if pk.native() is None:
        pytest.skip("the native extension is not built")
    g = torch.Generator().manual_seed(seed)
    P, G, L, C = 4, 5, 11, 8
    prompt_len = torch.randint(1, L + 1, (P,), generator=g)
    positions = torch.randint(0, 50, (3, P, L), generator=g)
    next_pos = torch.randint(50, 60, (P,), generator=g)
    lengths = torch.randint(1, C + 1, (P * G,), generator=g)
    prompt_of = torch.arange(P).repeat_interleave(G)
    rows = torch.randperm(P * G, generator=g)[:13].sort().values
    for shared in (True, False):
        args = (rows, prompt_of, lengths, prompt_len, positions, next_pos, C, shared)
        got = pk.pack_layout(*args, use_native=True)
        want = pk.pack_layout(*args, use_native=False)
        for name, a, b in zip(("source", "positions", "segment", "kind", "predictors",
                               "token_index", "cu_seqlens", "seq_cu", "seq_prompt"), got, want):
            assert torch.equal(a, b), name


def test_native_errors_name_the_argument():
    if pk.native() is None:
        pytest.skip("the native extension is not built")
    ids = torch.tensor([[1, 7, 7, 2]])
    with pytest.raises(RuntimeError, match="image_grid_thw"):
        pk.rope_positions(ids, torch.ones_like(ids), torch.zeros(0, 3, dtype=torch.long), 7, 2,
                          use_native=True)
    with pytest.raises(RuntimeError, match="lengths"):
        pk.pack_layout(torch.tensor([0]), torch.tensor([0]), torch.tensor([0]),
                       torch.tensor([2]), torch.zeros(3, 1, 2, dtype=torch.long),
                       torch.tensor([2]), 4, True, use_native=True)


@pytest.mark.parametrize("use_native", [False, True])
def test_grids_must_match_the_image_runs(use_native):
    """A grid left over, or one with an axis below 1 after the merge, is an error in the
    reference and the native op alike."""
    if use_native and pk.native() is None:
        pytest.skip("the native extension is not built")
    error = RuntimeError if use_native else ValueError
    ids = torch.tensor([[1, 7, 2]])
    mask = torch.ones_like(ids)
    with pytest.raises(error, match="image_grid_thw: 2 grids"):
        pk.rope_positions(ids, mask, torch.tensor([[1, 2, 2], [1, 2, 2]]), 7, 2,
                          use_native=use_native)
    with pytest.raises(error, match="axis below 1"):
        pk.rope_positions(ids, mask, torch.tensor([[-1, -2, 2]]), 7, 2, use_native=use_native)
    got, _ = pk.rope_positions(ids, mask, torch.tensor([[1, 2, 2]]), 7, 2, use_native=use_native)
    assert got[:, 0].tolist() == [[0, 1, 2], [0, 1, 2], [0, 1, 2]]


def test_layout_marks_prompts_completions_and_predictors():
    """Two prompts (2 and 3 tokens), three completions: the positions of the shared row."""
    positions = torch.tensor([[[0, 0, 1, 2], [0, 10, 11, 12]]] * 3)
    source, pos, seg, kind, pred, tok, cu, seq_cu, seq_prompt = pk.pack_layout(
        [0, 1, 2], [0, 0, 1], [2, 1, 3], [2, 3], positions, [3, 13], 4, True,
        use_native=False)
    # row: p0 p0 | c0 c0 | c1 | p1 p1 p1 | c2 c2 c2
    assert seg.tolist() == [0] * 5 + [1] * 6
    assert kind.tolist() == [-1, -1, 0, 0, 1, -1, -1, -1, 0, 0, 0]
    assert pred.tolist() == [1, 2, 1, 7, 8, 9]
    assert tok.tolist() == [0, 1, 4, 8, 9, 10]
    assert cu.tolist() == [0, 2, 3, 6] and seq_cu.tolist() == [0, 5, 11]
    assert seq_prompt.tolist() == [0, 1]
    assert pos[0].tolist() == [1, 2, 3, 4, 3, 10, 11, 12, 13, 14, 15]
    assert source.tolist() == [2, 3, 8, 9, 12, 5, 6, 7, 16, 17, 18]


# ---------------------------------------------------------------------------------------------
# The forwards.

def _logprobs_and_grads(model, hidden_fn, ids, lengths, weights):
    """Per-token log-probs of the valid tokens (flattened in row order) and every parameter's
    gradient of sum(logp * weights)."""
    model.zero_grad(set_to_none=True)
    logp = hidden_fn(model)
    loss = (logp * weights).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()
             if p.grad is not None}
    return logp.detach(), grads


@pytest.mark.parametrize("mode", ["shared_prefix", "packed"])
@pytest.mark.parametrize("seed,rows", [(0, True), (1, True), (2, False)])
def test_packed_forward_equals_the_padded_forward(models, mode, seed, rows):
    """fp32, 0, 1 and 2 images per prompt, varied prompt and completion lengths: the same
    per-token log-probs (max abs 1e-5) and the same gradient for every parameter, the vision
    tower's included (relative 1e-4 of the largest entry). SDPA over the segments as rows
    (the default) and over the packed row with one [T, T] mask (rows=False)."""
    padded, packed, encoder = models
    vocab = lm_head_weight(padded).shape[0]
    prompts, ids, lengths, prompt_of = random_batch(encoder, vocab, seed,
                                                    counts=((0, 1, 2), (2, 0, 1), (1, 2))[seed])
    B, C = ids.shape
    mask = (torch.arange(C)[None] < lengths[:, None]).float()
    valid = mask.reshape(-1) > 0
    weights = torch.randn(int(valid.sum()), generator=torch.Generator().manual_seed(seed))

    def padded_logp(m):
        h = completion_hidden(m, prompts, encode_images(m, prompts), prompt_of, ids, mask)
        return token_logprobs(h, lm_head_weight(m), ids).reshape(-1)[valid]

    layout = pk.PromptLayout.of(prompts, 2)
    packing = pk.pack(prompts, layout, ids, prompt_of, lengths, list(range(B)),
                      shared=mode == "shared_prefix")
    assert torch.equal(packing.token_index, valid.nonzero()[:, 0])

    def packed_logp(m):
        h = pk.packed_hidden(m, prompts, None, packing, "sdpa", rows=rows)
        return token_logprobs(h, lm_head_weight(m), ids.reshape(-1)[packing.token_index][None])[0]

    want, want_g = _logprobs_and_grads(padded, padded_logp, ids, lengths, weights)
    got, got_g = _logprobs_and_grads(packed, packed_logp, ids, lengths, weights)
    assert (got - want).abs().max() <= 1e-5
    assert set(got_g) == set(want_g) and any("visual" in n for n in want_g)
    for name, g in want_g.items():
        err = (got_g[name] - g).abs().max()
        assert err <= 1e-4 * g.abs().max() + 1e-9, f"{name}: {err:.3g}"
    if mode == "shared_prefix":  # the prompt once per group, no padding
        lens = layout.lengths.tolist()
        assert packing.length == sum(lens) + int(lengths.sum())


def test_flex_attention_forward_equals_sdpa_on_cpu(models):
    _, packed, encoder = models
    prompts, ids, lengths, prompt_of = random_batch(encoder, 600, 3)
    layout = pk.PromptLayout.of(prompts, 2)
    packing = pk.pack(prompts, layout, ids, prompt_of, lengths, list(range(len(ids))), True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # eager flex: "called without torch.compile()"
        feats = encode_images(packed, prompts)
        sdpa = pk.packed_hidden(packed, prompts, feats, packing, "sdpa")
        flex = pk.packed_hidden(packed, prompts, feats, packing, "flex")
    assert (flex - sdpa).abs().max() <= 1e-5


def test_varlen_rejects_a_shared_prefix():
    packing = pk.Packing(*[torch.zeros(1)] * 8, max_seqlen=1, prompts=[], shared=True)
    with pytest.raises(ValueError, match="plain packing only"):
        pk.attention_inputs(packing, "varlen")
    with pytest.raises(ValueError, match="expected one of"):
        pk.attention_inputs(packing, "dense")


@pytest.mark.cuda
@pytest.mark.parametrize("backend", ["flex", "varlen"])
def test_cuda_backends_forward_and_backward_equal_sdpa(tiny_model_dir, backend):
    """CUDA: FlexAttention (shared prefix) and flash-attn varlen (plain packing) give SDPA's
    hidden states and gradients."""
    if backend == "varlen":
        pytest.importorskip("flash_attn")
    cuda = torch.device("cuda")
    model = load_model(str(tiny_model_dir), device=cuda, dtype=torch.float32,
                       packing="shared_prefix")
    encoder = PromptEncoder(str(tiny_model_dir))
    prompts, ids, lengths, prompt_of = random_batch(encoder, 600, 4)
    prompts = prompts.select(torch.arange(len(prompts)))
    prompts.input_ids, prompts.attention_mask = prompts.input_ids.cuda(), \
        prompts.attention_mask.cuda()
    prompts.pixel_values, prompts.image_grid_thw = prompts.pixel_values.cuda(), \
        prompts.image_grid_thw.cuda()
    layout = pk.PromptLayout.of(prompts, 2)
    packing = pk.pack(prompts, layout, ids.cuda(), prompt_of, lengths, list(range(len(ids))),
                      shared=backend == "flex")
    results = {}
    for name in ("sdpa", backend):
        model.zero_grad(set_to_none=True)
        h = pk.packed_hidden(model, prompts, None, packing, name)
        h.pow(2).mean().backward()
        results[name] = (h.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                      if p.grad is not None})
    (h0, g0), (h1, g1) = results["sdpa"], results[backend]
    assert (h1 - h0).abs().max() <= 2e-4
    for n in g0:
        assert (g1[n] - g0[n]).abs().max() <= 1e-3 * g0[n].abs().max() + 1e-7, n


# ---------------------------------------------------------------------------------------------
# Micro-batches.

@pytest.mark.parametrize("shared", [True, False])
@pytest.mark.parametrize("budget", [0, 10, 25, 60, 1000])
def test_micro_batches_fill_a_token_budget_with_whole_groups(shared, budget):
    rng = random.Random(budget)
    P, G = 5, 4
    prompt_len = [rng.randint(3, 12) for _ in range(P)]
    prompt_of = [p for p in range(P) for _ in range(G)]
    lengths = [rng.randint(1, 9) for _ in prompt_of]
    rows = list(range(P * G))
    micro = pk.plan_micro_batches(rows, prompt_of, lengths, prompt_len, budget, shared)
    assert [r for m in micro for r in m] == rows  # every completion once, in order

    def cost(part):
        groups = {}
        for r in part:
            groups.setdefault(prompt_of[r], []).append(r)
        return sum((prompt_len[p] if shared else prompt_len[p] * len(g))
                   + sum(lengths[r] for r in g) for p, g in groups.items())

    if budget <= 0:
        assert len(micro) == 1
    for m in micro:
        single = len(m) == 1
        assert cost(m) <= budget or budget <= 0 or single
    if budget == 1000:
        assert len(micro) == 1
    if budget == 60:  # whole groups whenever a group fits: no group split across two
        for p in range(P):
            rows_p = [r for r in rows if prompt_of[r] == p]
            if cost(rows_p) <= budget:
                assert sum(any(r in m for r in rows_p) for m in micro) == 1


def test_equalize_splits_then_pads():
    micro, real = pk.equalize([[0, 1, 2, 3], [4]], 4)
    assert real == 4 and [r for m in micro for r in m] == [0, 1, 2, 3, 4]
    micro, real = pk.equalize([[0], [1]], 3)
    assert real == 2 and micro == [[0], [1], [0]]



class _MorePasses(World):
    """A process whose peer planned 2 more micro-batches (World.max over the job)."""

    def max(self, n: int) -> int:
        return n + 2


@pytest.mark.parametrize("mode", ["shared_prefix", "packed"])
def test_step_batch_log_probs_equal_the_padded_ones_at_any_budget(models, mode):
    """forward.StepBatch end to end (split, hidden, take, put) through grpo.logprobs: the
    padded log-probs [B, C] in one micro-batch or at budgets of 40 positions (groups split)
    and 1 (a completion per micro-batch); with a peer that plans 2 more passes, this process
    splits its largest micro-batches or (nothing left to split) runs weight-0 copies."""
    padded, packed, encoder = models
    vocab = lm_head_weight(padded).shape[0]
    prompts, ids, lengths, prompt_of = random_batch(encoder, vocab, 5, counts=(1, 0, 2))
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float()
    rollout = Rollout(ids, mask, torch.zeros_like(mask), prompt_of)
    want = logprobs(StepBatch(prompts, rollout, None), Policy(padded), MicroBatchFit(0),
                    "torch", 1.0)
    assert (want != 0).sum() == lengths.sum()
    for budget in (0, 40, 1):
        batch = StepBatch(prompts, rollout, None, mode, "sdpa", 2, _MorePasses())
        planned = pk.plan_micro_batches(range(len(ids)), prompt_of.tolist(), lengths.tolist(),
                                        batch.layout.lengths.tolist(), budget,
                                        mode == "shared_prefix")
        micro = batch.split(budget)
        assert len(micro) == len(planned) + 2
        assert sum(mb.real for mb in micro) == min(len(micro), len(ids))
        got = logprobs(batch, Policy(packed), MicroBatchFit(budget), "torch", 1.0)
        assert (got - want).abs().max() <= 1e-5, budget


def test_the_backend_and_layout_that_run_here(tmp_path, tiny_model_dir):
    from transformers import LlamaConfig

    from mr1fast.trainer.errors import UsageError
    from mr1fast.trainer.model import packing_mode

    assert pk.resolve_backend("auto", CPU, "shared_prefix") == "sdpa"
    assert pk.resolve_backend("sdpa", CPU, "packed") == "sdpa"
    assert pk.resolve_backend("flex", CPU, "padded") == "sdpa"  # padded: the setting is unused
    cuda = torch.device("cuda")  # a device object; nothing runs on it
    assert pk.default_backend(cuda, True) == "flex"
    assert pk.default_backend(cuda, False, torch.float32) == "flex"  # flash-attn: bf16 / fp16
    with pytest.raises(UsageError, match="no backward on the CPU"):
        pk.resolve_backend("flex", CPU, "shared_prefix")
    with pytest.raises(UsageError, match="varlen needs"):  # flash-attn, then CUDA
        pk.resolve_backend("varlen", CPU, "packed")
    with pytest.raises(UsageError, match="plain packing only"):
        pk.resolve_backend("varlen", CPU, "shared_prefix")
    notes = []
    assert packing_mode("shared_prefix", str(tiny_model_dir), notes.append) == "shared_prefix"
    LlamaConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1,
                num_attention_heads=1).save_pretrained(tmp_path)
    assert packing_mode("packed", str(tmp_path), notes.append) == "padded"
    assert notes == ["model.packing=packed: not available for model type 'llama' (only "
                     "qwen2_vl, qwen2_5_vl); running padded"]


def test_step_batch_rejects_mask_holes_and_skips_empty_completions(models):
    padded, packed, encoder = models
    vocab = lm_head_weight(padded).shape[0]
    prompts, ids, lengths, prompt_of = random_batch(encoder, vocab, 7, counts=(1, 0))
    lengths[0], lengths[1] = ids.shape[1], 0  # a full completion, one without tokens
    mask = (torch.arange(ids.shape[1])[None] < lengths[:, None]).float()
    rollout = Rollout(ids, mask, torch.zeros_like(mask), prompt_of)
    want = logprobs(StepBatch(prompts, rollout, None), Policy(padded), MicroBatchFit(0),
                    "torch", 1.0)
    got = logprobs(StepBatch(prompts, rollout, None, "shared_prefix"), Policy(packed),
                   MicroBatchFit(0), "torch", 1.0)
    assert (got - want).abs().max() <= 1e-5 and not got[1].any()
    holed = mask.clone()
    holed[0, 2] = 0.0
    with pytest.raises(RuntimeError, match="a 0 before a 1"):
        StepBatch(prompts, Rollout(ids, holed, torch.zeros_like(mask), prompt_of), None,
                  "packed")
