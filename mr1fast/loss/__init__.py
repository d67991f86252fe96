"""The loss library: what other trainers import.

The public API (`token_logprobs`, `grpo_loss`, `GRPOLoss`, `group_advantages`, the beta
schedules, `importance_weights`, `micro_batch_weight`), the pure-torch reference that specifies
it (reference.py, options.py, normalizers.py), the torch (chunked.py) and naive (naive.py)
implementations, input validation (inputs.py), and the wrapper of the Triton kernels
(fused.py -> mr1fast.kernels). It imports torch and, only when impl="triton" runs, the
kernels: never transformers, vLLM or the trainer.
"""
from .advantages import ADVANTAGE_EPS, group_advantages
from .api import IMPLS, GRPOLoss, grpo_loss, resolve_impl, token_logprobs
from .importance import importance_weights
from .normalizers import micro_batch_weight
from .options import KL_ESTIMATORS, LEVELS, LOSS_TYPES, OPTION_NAMES, LossOptions
from .schedules import (CONSTANT_BETA_PRESETS, GRPO_D_PRESETS, SCHEDULES, beta_schedule,
                        constant_beta, cosine_beta, grpo_d_beta, linear_beta)

__all__ = ["token_logprobs", "grpo_loss", "GRPOLoss", "group_advantages", "ADVANTAGE_EPS",
           "grpo_d_beta", "constant_beta", "linear_beta", "cosine_beta", "beta_schedule",
           "SCHEDULES", "GRPO_D_PRESETS", "CONSTANT_BETA_PRESETS", "importance_weights",
           "micro_batch_weight", "LOSS_TYPES", "LEVELS", "KL_ESTIMATORS", "LossOptions",
           "OPTION_NAMES", "IMPLS", "resolve_impl"]
