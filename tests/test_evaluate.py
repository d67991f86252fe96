"""evaluate(): greedy accuracy, the answer confusion matrix and pass@k, with a scripted sampler
whose answers are known (the tiny model's are not), and the eval.samples config keys."""
import random
from types import SimpleNamespace

import pytest
import torch

from mr1fast.trainer import evaluate as ev
from mr1fast.trainer.config import load_config, validate
from mr1fast.trainer.data import Example
from mr1fast.trainer.errors import UsageError
from mr1fast.trainer.rewards import RewardRunner

GOLD = [1, 2, 3, 4, 5, 3, 2]
GREEDY = {0: "1", 1: "3", 2: "3", 3: None, 4: "6", 5: "3", 6: "2"}   # None: no <answer>


def _text(answer):
    return "<think> x </think> oops" if answer is None else \
        f"<think> x </think><answer> {answer} </answer>"


class ScriptedSampler:
    """generate() as HFSampler's, answering GREEDY greedily and, when sampling, the gold count
    with probability 0.3 (else gold + 1), drawn from each example's seed."""
    calls = []

    def __init__(self, *args):
        pass

    def generate(self, prompts, n, params, seeds=None):
        ScriptedSampler.calls.append((n, params.greedy, seeds))
        texts = []
        for k, e in enumerate(prompts):
            if params.greedy:
                texts.append(_text(GREEDY[e.index]))
                continue
            rng = random.Random(seeds[k])
            gold = GOLD[e.index]
            texts += [_text(gold if rng.random() < 0.3 else gold + 1) for _ in range(n)]
        return SimpleNamespace(completion_ids=texts, completion_mask=None)


class Encoder:
    stop_ids, multimodal_ids = [0], []
    tokenizer = SimpleNamespace(pad_token_id=0)

    def encode_examples(self, batch, device):
        return batch

    def decode(self, texts, mask):
        return texts


def _examples():
    return [Example(images=[], problem="How many?", solution=f"<answer> {g} </answer>", row={},
                    index=i) for i, g in enumerate(GOLD)]


def _expected_sampled(samples, seed):
    passed = right = 0
    for i, g in enumerate(GOLD):
        rng = random.Random(seed * 1_000_003 + i)
        hits = sum(rng.random() < 0.3 for _ in range(samples))
        passed += hits > 0
        right += hits
    return 100 * passed / len(GOLD), 100 * right / (len(GOLD) * samples)


@pytest.mark.parametrize("batch_size", [1, 3, 16])
def test_greedy_accuracy_confusion_and_pass_at_k(monkeypatch, batch_size):
    monkeypatch.setattr(ev, "HFSampler", ScriptedSampler)
    model = torch.nn.Linear(1, 1)
    with RewardRunner({"accuracy": 1.0, "format": 1.0}, isolate=False) as score:
        out = ev.evaluate(model, Encoder(), _examples(), score, max_new_tokens=8,
                          batch_size=batch_size, samples=8, seed=5)
        again = ev.evaluate(model, Encoder(), _examples(), score, max_new_tokens=8,
                            batch_size=2, samples=8, seed=5)
        other_seed = ev.evaluate(model, Encoder(), _examples(), score, max_new_tokens=8,
                                 batch_size=2, samples=8, seed=6)
        greedy_only = ev.evaluate(model, Encoder(), _examples(), score, max_new_tokens=8,
                                  batch_size=2)
    right = sum(GREEDY[i] == str(g) for i, g in enumerate(GOLD))   # 1, 3, 3 (idx 5), 2 (idx 6)
    assert out["accuracy"] == pytest.approx(100 * right / 7) and out["n"] == 7
    assert out["format"] == pytest.approx(100 * 6 / 7)
    assert out["confusion"] == {"1": {"1": 1}, "2": {"2": 1, "3": 1}, "3": {"3": 2},
                                "4": {"none": 1}, "5": {"6": 1}}
    assert list(out["confusion"]) == ["1", "2", "3", "4", "5"]
    want_pass, want_sampled = _expected_sampled(8, 5)
    assert out["pass@8"] == pytest.approx(want_pass)
    assert out["sampled_accuracy"] == pytest.approx(want_sampled)
    assert 0 < out["sampled_accuracy"] < out["pass@8"] <= 100
    # the draws depend on the seed and each example's index, not on the batching
    assert again["pass@8"] == out["pass@8"] and again["sampled_accuracy"] == out["sampled_accuracy"]
    assert (other_seed["pass@8"], other_seed["sampled_accuracy"]) == \
        pytest.approx(_expected_sampled(8, 6))
    assert "pass@8" not in greedy_only and "sampled_accuracy" not in greedy_only
    table = ev.confusion_table(out["confusion"])
    assert table.splitlines()[0] == "| gold \\ answer | 1 | 2 | 3 | 6 | none |"
    assert table.splitlines()[3] == "| 2 | 0 | 1 | 1 | 0 | 0 |"
    assert "(pass@8 " in ev.markdown_matrix({"m": {"counting": out}})


def test_eval_samples_config_is_checked():
    cfg = load_config(overrides=["eval.samples=8", "eval.temperature=0.7"])
    validate(cfg)
    assert (cfg.eval.samples, cfg.eval.temperature) == (8, 0.7)
    for key, bad in (("samples", "-1"), ("temperature", "0")):
        with pytest.raises(UsageError, match=f"eval.{key}"):
            validate(load_config(overrides=[f"eval.{key}={bad}"]))
