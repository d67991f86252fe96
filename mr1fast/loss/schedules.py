"""KL-coefficient (beta) schedules; grpo_d_beta is the "D" in GRPO-D (OThink-MR1, Eq. 5).

All schedules take the 0-based optimizer-step count `step` and the run's `total_steps`, and
return a Python float. Steps past the end hold the final value.
"""
from __future__ import annotations

import inspect
import math
from typing import Callable

# The paper's settings: (beta_min, beta_max) per task.
GRPO_D_PRESETS = {"counting": (0.04, 0.1), "geometry": (0.0, 0.02)}
# The tuned constant-beta GRPO baselines of the paper.
CONSTANT_BETA_PRESETS = {"counting": 0.04, "geometry": 0.01}


def _check(step, total_steps) -> int:
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps: expected an int > 0, got {total_steps!r}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step: expected an int >= 0 (0-based optimizer step), got {step!r}")
    return min(step, total_steps)


def _check_beta(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not value >= 0 \
            or not math.isfinite(value):
        raise ValueError(f"{name}: expected a finite float >= 0, got {value!r}")


def grpo_d_beta(step: int, total_steps: int, beta_min: float, beta_max: float,
                explore_ratio: float = 0.3) -> float:
    """The paper's V-shaped schedule.

    beta_mid = (beta_min + beta_max) / 2 at step 0, falling linearly to beta_min at
    w = explore_ratio * total_steps (exploration), then rising linearly to beta_max at
    total_steps (exploitation).
    """
    s = _check(step, total_steps)
    _check_beta("beta_min", beta_min)
    _check_beta("beta_max", beta_max)
    if not 0.0 <= explore_ratio <= 1.0:
        raise ValueError(f"explore_ratio: expected a float in [0, 1], got {explore_ratio!r}")
    mid = 0.5 * (beta_min + beta_max)
    w = explore_ratio * total_steps
    if w > 0 and s <= w:
        return mid - (mid - beta_min) * s / w
    return beta_min + (beta_max - beta_min) * (s - w) / (total_steps - w)


def constant_beta(step: int, total_steps: int, beta: float) -> float:
    _check(step, total_steps)
    _check_beta("beta", beta)
    return float(beta)


def linear_beta(step: int, total_steps: int, beta_start: float, beta_end: float) -> float:
    s = _check(step, total_steps)
    _check_beta("beta_start", beta_start)
    _check_beta("beta_end", beta_end)
    return beta_start + (beta_end - beta_start) * s / total_steps


def cosine_beta(step: int, total_steps: int, beta_start: float, beta_end: float) -> float:
    s = _check(step, total_steps)
    _check_beta("beta_start", beta_start)
    _check_beta("beta_end", beta_end)
    return beta_end + (beta_start - beta_end) * 0.5 * (1.0 + math.cos(math.pi * s / total_steps))


SCHEDULES = {"grpo_d": grpo_d_beta, "constant": constant_beta, "linear": linear_beta,
             "cosine": cosine_beta}


def schedule_parameters(kind: str) -> dict:
    """The parameters of schedule `kind` (beyond step and total_steps): name -> default, or
    inspect.Parameter.empty for a required one."""
    if kind not in SCHEDULES:
        raise ValueError(f"kind: expected one of {sorted(SCHEDULES)}, got {kind!r}")
    params = list(inspect.signature(SCHEDULES[kind]).parameters.values())[2:]
    return {p.name: p.default for p in params}


def beta_schedule(kind: str, total_steps: int, **params) -> Callable[[int], float]:
    """A step -> beta function. kind: "grpo_d" (params beta_min, beta_max, explore_ratio, or
    preset="counting"|"geometry"), "constant" (beta or preset), "linear" / "cosine"
    (beta_start, beta_end). Parameters are checked now, not at step 0 of a run."""
    known = schedule_parameters(kind)
    preset = params.pop("preset", None)
    if preset is not None:
        table = GRPO_D_PRESETS if kind == "grpo_d" else CONSTANT_BETA_PRESETS
        if kind not in ("grpo_d", "constant") or preset not in table:
            raise ValueError(f"preset: expected one of {sorted(table)} with kind 'grpo_d' or "
                             f"'constant', got preset={preset!r}, kind={kind!r}")
        if kind == "grpo_d":
            params.setdefault("beta_min", table[preset][0])
            params.setdefault("beta_max", table[preset][1])
        else:
            params.setdefault("beta", table[preset])
    unknown = sorted(set(params) - set(known))
    missing = sorted(n for n, d in known.items() if d is inspect.Parameter.empty
                     and n not in params)
    if unknown or missing:
        names = ", ".join(known)
        raise ValueError(f"{kind} schedule: takes {names}" + (" (or preset)" if kind in (
            "grpo_d", "constant") else "") + (f"; unknown {', '.join(unknown)}" if unknown else "")
            + (f"; missing {', '.join(missing)}" if missing else ""))
    fn = SCHEDULES[kind]
    fn(0, total_steps, **params)
    return lambda step: fn(step, total_steps, **params)
