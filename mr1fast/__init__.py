"""mr1fast: fused GRPO-D (OThink-MR1) training for vision-language models."""
from .compat import torchvision_shim as _torchvision_shim

_torchvision_shim()  # before anything imports transformers (see compat.py)

from .advantages import group_advantages  # noqa: E402
from .loss import GRPOLoss, grpo_loss, token_logprobs
from .schedules import (GRPO_D_PRESETS, beta_schedule, constant_beta, cosine_beta, grpo_d_beta,
                        linear_beta)

__all__ = ["token_logprobs", "grpo_loss", "GRPOLoss", "group_advantages", "grpo_d_beta",
           "constant_beta", "linear_beta", "cosine_beta", "beta_schedule", "GRPO_D_PRESETS"]
__version__ = "0.1.0"
