"""The documentation's code runs: every ```python block of docs/API.md (each in a fresh namespace),
and examples/plain_pytorch.py end to end on a tiny model. Also: API.md has a section or table row
for every public name, grpo_loss argument and LossOptions field, so that the reference cannot
silently fall behind the code."""
import inspect
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest

import mr1fast
import mr1fast.loss
from mr1fast.loss import OPTION_NAMES, grpo_loss

ROOT = Path(__file__).resolve().parents[1]
API_MD = ROOT / "docs" / "API.md"


def python_blocks(text: str):
    """(heading, n-th block under it, code) of every ```python block, in order."""
    blocks, heading, count = [], "(top)", {}
    lines = iter(text.splitlines())
    for line in lines:
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        elif line.strip() == "```python":
            code = []
            for body in lines:
                if body.strip() == "```":
                    break
                code.append(body)
            count[heading] = count.get(heading, 0) + 1
            blocks.append((heading, count[heading], "\n".join(code)))
    return blocks


BLOCKS = python_blocks(API_MD.read_text())


@pytest.mark.parametrize("heading,index,code", BLOCKS,
                         ids=[f"{h}-{i}" for h, i, _ in BLOCKS])
def test_api_example_runs(heading, index, code):
    try:
        exec(compile(code, f"docs/API.md: {heading} (block {index})", "exec"),
             {"__name__": "__api_example__"})
    except Exception as e:
        raise AssertionError(f"docs/API.md, section {heading!r}, python block {index} failed: "
                             f"{type(e).__name__}: {e}") from e


def documented(name: str, text: str) -> bool:
    """A heading naming it, or a table row that starts with it in backticks."""
    return bool(re.search(rf"^#+ .*\b{re.escape(name)}\b", text, re.M) or
                re.search(rf"^\| `{re.escape(name)}` \|", text, re.M))


def test_api_reference_covers_the_api():
    text = API_MD.read_text()
    assert len(BLOCKS) >= 20, "docs/API.md lost its examples"
    public = set(mr1fast.__all__) | set(mr1fast.loss.__all__)
    grpo_args = set(inspect.signature(grpo_loss).parameters) - set(OPTION_NAMES)
    missing = sorted(n for n in public | set(OPTION_NAMES) | grpo_args if not documented(n, text))
    # grpo_loss's option arguments are LossOptions' fields (api.py builds LossOptions from them).
    assert set(OPTION_NAMES) <= set(inspect.signature(grpo_loss).parameters)
    assert not missing, f"docs/API.md does not document {missing}"


def run_example(*args: str, steps: int = 3):
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "plain_pytorch.py"), "--steps", str(steps),
         "--group-size", "4", "--max-new-tokens", "8", "--impl", "torch", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"exit {out.returncode}\n{out.stdout}\n{out.stderr[-4000:]}"
    losses = [float(x) for x in re.findall(r"\bloss (\S+)", out.stdout)]
    rewards = [float(x) for x in re.findall(r"\breward (\S+)", out.stdout)]
    assert len(losses) == len(rewards) == steps, out.stdout
    assert all(math.isfinite(x) for x in losses + rewards), out.stdout


def test_plain_pytorch_example_trains():
    run_example()


def test_plain_pytorch_example_loads_a_model(tmp_path, tiny_model_dir):
    """--model: a saved text-only causal LM with a real tokenizer (left-padded prompts of
    different lengths, EOS masks, AutoModelForCausalLM in bf16)."""
    import mr1fast.rollout  # noqa: F401  (before transformers: the torchvision shim)
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    run_example("--model", str(tmp_path), "--target", " the", steps=2)
