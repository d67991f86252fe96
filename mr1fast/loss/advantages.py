"""Group-relative advantages (GRPO): A_i = (r_i - mean(group)) / (std + eps)."""
from __future__ import annotations

import torch

SCALES = ("group", "batch", "none")
# The epsilon in (std + eps), R1-V's and TRL's value. The fused kernel takes it from here too.
ADVANTAGE_EPS = 1e-4


def group_advantages(rewards: torch.Tensor, group_size: int, *, scale: str = "group",
                     eps: float = ADVANTAGE_EPS) -> torch.Tensor:
    """Advantages of the completions of each prompt, relative to their group.

    rewards: [B] float, the G = group_size completions of a prompt contiguous (B = prompts * G).
    scale: "group" divides by the group's std (R1-V, TRL), "batch" by the std of the whole batch,
    "none" only centres. std is unbiased (Bessel), as in R1-V and TRL. A group of equal rewards
    gives zeros, never NaN. Returns fp32 [B] (fp64 for fp64 rewards).
    """
    if not isinstance(rewards, torch.Tensor) or rewards.dim() != 1 or not rewards.is_floating_point():
        raise ValueError(f"rewards: expected a 1-D float tensor [B], got "
                         f"{type(rewards).__name__} {getattr(rewards, 'shape', '')}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 2:
        raise ValueError(f"group_size: expected an int >= 2, got {group_size!r}")
    if rewards.numel() % group_size:
        raise ValueError(f"group_size: {group_size} does not divide the number of rewards "
                         f"{rewards.numel()} (rewards must hold whole groups)")
    if scale not in SCALES:
        raise ValueError(f"scale: expected one of {SCALES}, got {scale!r}")
    r = rewards if rewards.dtype == torch.float64 else rewards.float()
    groups = r.view(-1, group_size)
    centred = (groups - groups.mean(dim=1, keepdim=True)).view(-1)
    if scale == "none":
        return centred
    if scale == "group":
        std = groups.std(dim=1, keepdim=True).expand(-1, group_size).reshape(-1)
    else:
        std = r.std() if r.numel() > 1 else torch.zeros((), dtype=r.dtype, device=r.device)
    return centred / (std + eps)
