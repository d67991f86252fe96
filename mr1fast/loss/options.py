"""The objective's options: names, defaults and validation, in one place.

Names follow TRL 1.16's GRPOConfig where TRL has the option (loss_type,
importance_sampling_level, delta, use_bias_correction_kl, top_entropy_quantile, entropy_coef,
off_policy_mask_threshold, sapo_*, vespo_*); eps_low / eps_high are TRL's epsilon /
epsilon_high. Defaults are mr1fast's (the paper's GRPO-D: loss_type "grpo", k3 KL without bias
correction); TRL's differ in two places (loss_type "dapo", use_bias_correction_kl True), and
mr1fast.integrations.trl passes TRL's. Every option is a runtime value for the kernels: a new
value never recompiles anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Optional

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
# The loss types whose policy term clips the ratio to [1 - eps_low, 1 + eps_high].
CLIPPED = ("grpo", "bnpo", "dr_grpo", "dapo", "luspo")
LEVELS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k2", "k3")
# TRL 1.16's VESPO clamps (get_gamma_weights): per-token log-ratios to [-20, 20], the sequence
# log-weight and the log of an importance weight to [log 1e-8, 20].
VESPO_LOG_MIN = math.log(1e-8)
VESPO_LOG_MAX = 20.0


@dataclass(frozen=True)
class LossOptions:
    """Every scalar option of grpo_loss except beta (which may be a device tensor)."""
    loss_type: str = "grpo"
    importance_sampling_level: str = "token"
    eps_low: float = 0.2
    eps_high: Optional[float] = None        # None: eps_low (cispo: the absolute cap on the ratio)
    delta: Optional[float] = None           # two-sided clipping: the ratio capped at delta
    dual_clip: Optional[float] = None       # c > 1: loss <= -c * A for A < 0
    kl_estimator: str = "k3"
    use_bias_correction_kl: bool = False
    log_ratio_clamp: float = 20.0
    entropy_coef: float = 0.0
    top_entropy_quantile: float = 1.0
    off_policy_mask_threshold: Optional[float] = None
    advantage_eps: float = 1e-4
    sapo_temperature_neg: float = 1.05
    sapo_temperature_pos: float = 1.0
    vespo_k_pos: float = 2.0
    vespo_lambda_pos: float = 3.0
    vespo_k_neg: float = 3.0
    vespo_lambda_neg: float = 2.0

    def __post_init__(self):
        def number(name, lo=None, hi=None, lo_open=False, optional=False):
            v = getattr(self, name)
            if v is None and optional:
                return
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
            if lo is not None and (v <= lo if lo_open else v < lo):
                raise ValueError(f"{name}: expected a value {'>' if lo_open else '>='} {lo}, "
                                 f"got {v}")
            if hi is not None and v > hi:
                raise ValueError(f"{name}: expected a value <= {hi}, got {v}")
            object.__setattr__(self, name, float(v))

        for name, allowed in (("loss_type", LOSS_TYPES),
                              ("importance_sampling_level", LEVELS),
                              ("kl_estimator", KL_ESTIMATORS)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {allowed}, got "
                                 f"{getattr(self, name)!r}")
        if not isinstance(self.use_bias_correction_kl, bool):
            raise ValueError(f"use_bias_correction_kl: expected True or False, got "
                             f"{self.use_bias_correction_kl!r}")
        number("eps_low", 0.0)
        if self.eps_low >= 1 and self.loss_type in CLIPPED:  # (cispo, sapo, vespo ignore it)
            raise ValueError(f"eps_low: expected a value in [0, 1) (the ratio is clipped below "
                             f"at 1 - eps_low), got {self.eps_low}")
        if self.eps_high is None:
            object.__setattr__(self, "eps_high", self.eps_low)
        number("eps_high", 0.0)
        number("delta", 1.0, lo_open=True, optional=True)
        number("dual_clip", 1.0, lo_open=True, optional=True)
        number("log_ratio_clamp", 0.0, lo_open=True)
        number("entropy_coef")
        number("top_entropy_quantile", 0.0, 1.0)
        number("off_policy_mask_threshold", optional=True)
        number("advantage_eps", 0.0)
        for name in ("sapo_temperature_neg", "sapo_temperature_pos", "vespo_lambda_pos",
                     "vespo_lambda_neg"):
            number(name, 0.0, lo_open=True)
        number("vespo_k_pos")
        number("vespo_k_neg")

    @property
    def sequence_level(self) -> bool:
        return self.importance_sampling_level == "sequence"

    @property
    def token_separable(self) -> bool:
        """Whether the loss is a sum of per-token terms, each a function of its own token's
        log-prob and entropy only: then an implementation can form each token's gradient as
        soon as its log-prob is known. Sequence-level ratios, VESPO's sequence weight, the
        off-policy mask (a sequence mean) and the top-entropy mask (a quantile over all
        tokens) couple the tokens."""
        return (not self.sequence_level and self.loss_type != "vespo"
                and self.off_policy_mask_threshold is None
                and self.top_entropy_quantile >= 1.0)

    @property
    def needs_entropy_grad(self) -> bool:
        return self.entropy_coef != 0.0

    def replace(self, **changes) -> "LossOptions":
        return LossOptions(**{**{f.name: getattr(self, f.name) for f in fields(self)},
                              **changes})


OPTION_NAMES = tuple(f.name for f in fields(LossOptions))
