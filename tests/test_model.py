"""The tiny Qwen2-VL, prompt encoding, the logits-free forward and the HF sampler."""
import json

import pytest
import torch

from mr1fast import token_logprobs
from helpers import tiny_policy_and_prompts
from mr1fast.rollout import HFSampler, SamplingParams, completion_mask
from mr1fast.trainer.model import completion_hidden, encode_images, lm_head_weight, load_model


@pytest.fixture(scope="module")
def setup(tiny_model_dir):
    return tiny_policy_and_prompts(tiny_model_dir, 3, seed=1)


def test_tiny_model_files_load_offline(tiny_model_dir, monkeypatch):
    from transformers import AutoModelForImageTextToText, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = json.loads((tiny_model_dir / "config.json").read_text())
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    # Naming Qwen2Tokenizer would re-tokenize differently (../shared/ENV.md).
    tok_cfg = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert "Qwen2" not in tok_cfg.get("tokenizer_class", "")
    for key, token in (("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                       ("vision_start_token_id", "<|vision_start|>")):
        assert cfg[key] == tok.convert_tokens_to_ids(token)
    text = cfg["text_config"]
    head_dim = text["hidden_size"] // text["num_attention_heads"]
    assert head_dim >= 32 and sum(text["rope_parameters"]["mrope_section"]) == head_dim // 2
    model = AutoModelForImageTextToText.from_pretrained(tiny_model_dir)
    assert lm_head_weight(model) is model.get_input_embeddings().weight  # tied, as in 2B
    pp = json.loads((tiny_model_dir / "preprocessor_config.json").read_text())
    assert pp["image_processor_type"] == "Qwen2VLImageProcessor"


def test_prompt_encoding_expands_image_tokens(setup):
    model, encoder, prompts = setup
    per_prompt = (prompts.input_ids == prompts.image_token_id).sum(1)
    assert per_prompt.tolist() == (prompts.image_grid_thw.prod(-1) // 4).tolist()
    sub = prompts.select(torch.tensor([2, 0]))
    assert torch.equal(sub.input_ids, prompts.input_ids[[2, 0]])
    n0 = int(prompts.image_grid_thw[0].prod())
    assert torch.equal(sub.pixel_values[-n0:], prompts.pixel_values[:n0])


def test_prompts_with_any_number_of_images(tiny_model_dir):
    """0, 1 and 2 images per prompt: each image's tokens expanded to its grid, prompt_length
    counts them, select keeps each prompt's own images, the HF sampler generates."""
    from PIL import Image

    from mr1fast.trainer.model import PromptEncoder

    encoder = PromptEncoder(str(tiny_model_dir))
    a, b, c = (Image.new("RGB", size, colour) for size, colour in
               (((56, 112), "red"), ((112, 84), "blue"), ((84, 84), "green")))
    questions = ["no image", "one", "two images here"]
    prompts = encoder.encode([[], [a], [b, c]], questions, torch.device("cpu"))
    assert prompts.image_counts == [0, 1, 2] and prompts.num_images == 3
    tokens = (prompts.image_grid_thw.prod(-1) // 4).tolist()
    per_prompt = (prompts.input_ids == prompts.image_token_id).sum(1).tolist()
    assert per_prompt == [0, tokens[0], tokens[1] + tokens[2]]
    lengths = prompts.attention_mask.sum(1).tolist()
    assert [encoder.prompt_length(x, q) for x, q in zip([[], a, [b, c]], questions)] == lengths
    sub = prompts.select(torch.tensor([2, 0]))
    assert sub.image_counts == [2, 0] and torch.equal(sub.image_grid_thw,
                                                      prompts.image_grid_thw[1:])
    assert sub.pixel_values.shape[0] == int(prompts.image_grid_thw[1:].prod(-1).sum())
    text_only = prompts.select(torch.tensor([0]))
    assert text_only.num_images == 0 and text_only.vision_inputs() == {}
    torch.manual_seed(0)
    model = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32)
    sampler = HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id)
    for batch in (prompts, text_only):
        out = sampler.generate(batch, 2, SamplingParams(max_new_tokens=4), seeds=list(
            range(len(batch))))
        assert out.completion_ids.shape[0] == 2 * len(batch)


def test_completion_hidden_matches_the_full_model(setup):
    """The logits-free path (hidden states of the completion positions + token_logprobs)
    gives the log-probs and gradients of transformers' own forward with pixel values."""
    model, encoder, prompts = setup
    torch.manual_seed(1)
    C, index = 5, torch.tensor([0, 0, 1, 2])
    ids = torch.randint(10, 100, (4, C))
    mask = torch.ones(4, C)
    mask[1, 3:] = 0

    feats = encode_images(model, prompts)
    hidden = completion_hidden(model, prompts, feats, index, ids, mask)
    ours = token_logprobs(hidden, lm_head_weight(model), ids, impl="torch")
    g_ours = torch.autograd.grad((ours * mask).sum(), lm_head_weight(model))[0]

    seq = torch.cat([prompts.input_ids[index], ids], 1)
    attn = torch.cat([prompts.attention_mask[index], mask.long()], 1)
    sel = prompts.select(index)
    logits = model(input_ids=seq, attention_mask=attn, pixel_values=sel.pixel_values,
                   image_grid_thw=sel.image_grid_thw,
                   mm_token_type_ids=(seq == prompts.image_token_id).int()).logits
    lp = prompts.input_ids.shape[1]
    theirs = torch.log_softmax(logits[:, lp - 1:-1].float(), -1).gather(-1, ids[..., None])[..., 0]
    g_theirs = torch.autograd.grad((theirs * mask).sum(), lm_head_weight(model))[0]
    assert (ours - theirs)[mask > 0].abs().max() < 1e-5
    assert (g_ours - g_theirs).abs().max() < 1e-4


def test_images_are_encoded_once_per_prompt(setup):
    model, encoder, prompts = setup
    seen = []
    hook = model.model.visual.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    try:
        feats = encode_images(model, prompts)
        G = 4
        index = torch.arange(len(prompts)).repeat_interleave(G)
        ids = torch.randint(10, 100, (len(index), 3))
        completion_hidden(model, prompts, feats, index, ids, torch.ones(len(index), 3))
    finally:
        hook.remove()
    assert seen == [prompts.pixel_values.shape[0]]  # one pass over each prompt's patches


def test_hf_sampler_logprobs_match_the_policy(setup):
    model, encoder, prompts = setup
    sampler = HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                        encoder.multimodal_ids)
    torch.manual_seed(3)
    out = sampler.generate(prompts, 4, SamplingParams(max_new_tokens=12))
    assert out.completion_ids.shape[0] == 12 and out.prompt_index.tolist() == \
        [0] * 4 + [1] * 4 + [2] * 4
    assert not torch.isin(out.completion_ids, torch.tensor(encoder.multimodal_ids)).any()
    with torch.no_grad():
        hidden = completion_hidden(model, prompts, encode_images(model, prompts),
                                   out.prompt_index, out.completion_ids, out.completion_mask)
        policy = token_logprobs(hidden, lm_head_weight(model), out.completion_ids, impl="torch")
    m = out.completion_mask > 0
    # The sampler suppresses the multimodal tokens, so its distribution is the policy's
    # renormalized over the other tokens: equal up to that (tiny) mass.
    assert (policy - out.logprobs)[m].abs().max() < 5e-2
    assert (policy - out.logprobs)[m].max() <= 1e-5

    greedy = SamplingParams(max_new_tokens=8, greedy=True)
    a, b = sampler.generate(prompts, 1, greedy), sampler.generate(prompts, 1, greedy)
    assert torch.equal(a.completion_ids, b.completion_ids)
    fixed = sampler.generate(prompts, 2, SamplingParams(max_new_tokens=6, ignore_eos=True))
    assert fixed.completion_mask.sum() == 6 * 6


def test_completion_mask_stops_after_the_stop_token():
    ids = torch.tensor([[5, 2, 9, 9], [5, 6, 7, 8], [0, 9, 9, 9]])
    assert completion_mask(ids, [0, 2]).tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]]


def test_update_weights_copies_into_a_separate_sampler_model(tiny_model_dir, setup):
    policy = setup[0]
    other = load_model(str(tiny_model_dir), device=torch.device("cpu"), dtype=torch.float32,
                       trainable=False)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(1.0)
    sampler = HFSampler(other, [0], 0)
    sampler.update_weights(policy.named_parameters())
    for (n, p), (_, q) in zip(policy.named_parameters(), other.named_parameters()):
        assert torch.equal(p, q), n
    with pytest.raises(KeyError, match="no parameter"):
        sampler.update_weights([("nope.weight", torch.zeros(1))])


def test_load_model_names_a_missing_checkpoint(tmp_path):
    from mr1fast.trainer.errors import UserError

    with pytest.raises(UserError, match="model=.*missing'?: no such folder"):
        load_model(str(tmp_path / "missing"), device=torch.device("cpu"), dtype=torch.float32)


def test_hf_sampler_logprobs_follow_the_temperature(setup):
    """The recorded log-probs are those of the distribution each token was drawn from: the
    policy's at temperature 0.7 with the multimodal tokens suppressed (a -1e9 bias here)."""
    model, encoder, prompts = setup
    sampler = HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                        encoder.multimodal_ids)
    torch.manual_seed(4)
    out = sampler.generate(prompts, 2, SamplingParams(max_new_tokens=8, temperature=0.7))
    W = lm_head_weight(model)
    suppressed = torch.zeros(W.shape[0])
    suppressed[encoder.multimodal_ids] = -1e9
    with torch.no_grad():
        hidden = completion_hidden(model, prompts, encode_images(model, prompts),
                                   out.prompt_index, out.completion_ids, out.completion_mask)
        policy = token_logprobs(hidden, W, out.completion_ids, bias=suppressed.detach(),
                                temperature=0.7, impl="torch")
    m = out.completion_mask > 0
    assert (policy - out.logprobs)[m].abs().max() < 1e-5


def test_seeded_completions_do_not_depend_on_the_rest_of_the_batch(setup):
    """A prompt's completions come from generators seeded by its seed alone: the same with
    other prompts beside it or alone, in another position (world-size independence)."""
    model, encoder, prompts = setup
    sampler = HFSampler(model, encoder.stop_ids, encoder.tokenizer.pad_token_id,
                        encoder.multimodal_ids)
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    both = sampler.generate(prompts.select(torch.tensor([0, 2])), 3, params, seeds=[11, 22])
    alone = sampler.generate(prompts.select(torch.tensor([2])), 3, params, seeds=[22])
    assert torch.equal(both.completion_ids[3:], alone.completion_ids)
    assert torch.allclose(both.logprobs[3:], alone.logprobs, atol=1e-5)
    other = sampler.generate(prompts.select(torch.tensor([2])), 3, params, seeds=[23])
    assert not torch.equal(other.completion_ids, alone.completion_ids)
    assert not torch.equal(alone.completion_ids[0], alone.completion_ids[1])  # j differs


def test_gumbel_max_draws_from_the_softmax():
    """The seeded sampler's draws follow softmax(scores / T) after top-k: frequencies over
    20000 rows within 4 standard errors, nothing outside the top k."""
    from mr1fast.rollout.hf_sampler import _SeededSampling

    torch.manual_seed(0)
    logits = torch.randn(1, 12) * 2
    rows = 20000
    params = SamplingParams(temperature=0.7, top_k=6)
    sampler = _SeededSampling(range(rows), params, torch.device("cpu"))
    draws = sampler(None, logits.expand(rows, -1)).argmax(-1)
    top = logits[0].topk(6).indices
    want = torch.zeros(12)
    want[top] = torch.softmax(logits[0, top] / 0.7, -1)
    freq = torch.bincount(draws, minlength=12).float() / rows
    assert (freq[want == 0] == 0).all()
    se = (want * (1 - want) / rows).sqrt()
    assert ((freq - want).abs() <= 4 * se + 1e-9).all(), (freq, want)
