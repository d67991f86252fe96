"""mr1fast: fused GRPO-D (OThink-MR1) training for vision-language models.

Four parts, dependencies pointing one way (README, "Architecture"):
  mr1fast.trainer -> mr1fast.rollout -> mr1fast.loss -> mr1fast.kernels (the kernels/ folder).
`import mr1fast` gives the loss library's public API and imports only torch.
"""
from .loss import (GRPO_D_PRESETS, GRPOLoss, LossOptions, beta_schedule, constant_beta,
                   cosine_beta, group_advantages, grpo_d_beta, grpo_loss, importance_weights,
                   linear_beta, token_logprobs)

__all__ = ["token_logprobs", "grpo_loss", "GRPOLoss", "LossOptions", "group_advantages", "grpo_d_beta",
           "constant_beta", "linear_beta", "cosine_beta", "beta_schedule", "GRPO_D_PRESETS",
           "importance_weights"]
__version__ = "0.1.0"
