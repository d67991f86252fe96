"""The trainer: what `mr1fast train | sft | eval` runs.

cli.py (the entry point), config.py (one typed dataclass, YAML recipes), data.py (R1-V-schema
datasets, synthetic tasks), rewards.py (accuracy + format, user rewards, contained in a worker),
model.py (loading Qwen2-VL, the prompt encoder, the forward that stops at the LM head's input),
run.py (the scaffolding every loop shares), grpo.py (the GRPO-D loop, one step read top to
bottom), sft.py (the SFT baseline and warm-up), evaluate.py (greedy accuracy, the cross-task
matrix), checkpoint.py, metrics.py. It uses the rollout engines and the loss library; nothing
below it imports it.
"""
# mr1fast.rollout applies the torchvision shim (rollout/compat.py) on import: first, before any
# trainer module imports transformers.
from .. import rollout  # noqa: F401
