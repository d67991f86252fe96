"""mr1fast's Triton kernels (the top-level kernels/ folder, installed as `mr1fast.kernels`).

One op per file: `token_logprobs.py` (fused LM-head log-probs and entropy) and `grpo_loss.py`
(the GRPO family's O(N) epilogue on top of it), each with its @triton.jit kernels, the launchers, and one
explicit torch.autograd.Function; `gemm.py` holds the fp32-accumulating GEMMs of the backward.
They take and return plain tensors and import nothing from the rest of mr1fast: the loss
library (mr1fast.loss) validates inputs, builds the per-token tensors and the stats, and calls
these. The package is installed as `mr1fast.kernels`, not as a top-level `kernels`, because a
top-level module of that name would shadow the Hugging Face `kernels` package that transformers
probes. This file imports nothing, so `import mr1fast.kernels.gemm` does not import Triton.
"""
