"""mr1fast's fused GRPO loss inside TRL 1.16's GRPOTrainer.

    from trl import GRPOConfig
    from mr1fast.integrations.trl import BetaScheduleCallback, MR1GRPOTrainer

    trainer = MR1GRPOTrainer(model=..., reward_funcs=..., train_dataset=...,
                             args=GRPOConfig(beta=0.04, ...),
                             callbacks=[BetaScheduleCallback("grpo_d", preset="counting")])
    trainer.train()

or `patch(trainer)` on a GRPOTrainer (or a subclass of it) already built.

The seam. TRL 1.16 scores completions with its own fused LM head (trl.trainer.utils.
add_fused_lm_head): `model(..., labels=, fused_lm_head=True)` runs the backbone, then chunked
log-probs and entropies [B, T] from the last hidden state and `lm_head.weight`, and
`_compute_loss` builds the objective on those. The drop-in wraps that forward once more: a call
with `mr1fast_loss=fn` runs the same backbone and returns fn(last hidden state, weight, bias),
which slices the completion positions [B, T, d] and calls mr1fast.grpo_loss: log-probs,
objective and gradients in one fused pass, no [B, T, V] logits. The loss runs inside the
model's forward, so DDP sees an ordinary forward and an FSDP2 head is gathered as TRL gathers
it. TRL builds the model inputs (images included) as for its own loss: the drop-in calls TRL's
_get_per_token_logps_and_entropies with a stand-in for the model. Every other forward
(generation, old and reference log-probs) is TRL's own.

Kept as TRL defines them: every loss_type and its normaliser (num_items_in_batch, processes,
steps_per_generation and gradient accumulation scaled as TRL scales them; eval unscaled),
importance_sampling_level, epsilon / epsilon_high, delta, beta with k3 and
use_bias_correction_kl, top_entropy_quantile, entropy_coef, off_policy_mask_threshold, the vLLM
importance-sampling ratio (-> importance_weights; vespo folds it into its weight), temperature,
cast_lm_head_to_fp32, the loss mask completion_mask * tool_mask, and the metrics kl, entropy,
clip_ratio/*, cispo_clip_ratio, vespo/phi_seq_mean, policy_loss and entropy_coef.

Differences, by design: the log-ratios logp - old and ref - logp are clamped to +-20 before
exp (mr1fast's log_ratio_clamp; TRL clamps neither): the same wherever |log-ratio| <= 20,
finite where TRL's overflow. Under autocast the head runs in the autocast dtype, as TRL's.
Not logged: policy_loss when the entropy bonus and top_entropy_quantile < 1 are both on
(mr1fast's stats hold the entropy's mean over the loss mask, not over the top-entropy tokens).
Refused, with an error naming the option (check_supported): anything else that would make the
loss differ from TRL's.
"""
from __future__ import annotations

import functools
import types
import warnings
from typing import Callable, Optional, Union

import torch
from accelerate.utils import is_peft_model
from torch.distributed.tensor import DTensor
from transformers import TrainerCallback
from trl import GRPOTrainer
from trl.trainer.utils import nanmax, nanmin

from ..loss import LEVELS, LOSS_TYPES, LossOptions, grpo_loss
from ..loss.schedules import beta_schedule

TESTED_TRL = "1.16"
# Loss types TRL normalises by num_items_in_batch; the others it divides by the accumulation.
TOKEN_NORMALISED = ("dapo", "cispo", "vespo")
# Model-config fields with which TRL's head transforms the logits (softcap, scales): mr1fast's
# loss takes the plain (h @ W^T + b) / temperature.
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "output_multiplier",
                    "lm_head_multiplier", "logits_scaling")
# The model inputs _compute_loss passes to _get_per_token_logps_and_entropies besides the ids.
MODEL_INPUT_KEYS = ("pixel_values", "image_grid_thw", "num_images", "pixel_attention_mask",
                    "spatial_shapes", "num_tiles", "image_sizes", "token_type_ids",
                    "mm_token_type_ids", "image_position_ids")
# mr1fast option -> TRL's name for it, for error messages.
TRL_NAMES = {"eps_low": "epsilon", "eps_high": "epsilon_high"}


def loss_options(trainer: GRPOTrainer) -> dict:
    """grpo_loss's options, read where TRL's _compute_loss reads them (the trainer's attributes
    for what it copies at construction, trainer.args for the rest)."""
    args = trainer.args
    return dict(
        loss_type=trainer.loss_type, importance_sampling_level=trainer.importance_sampling_level,
        eps_low=trainer.epsilon_low, eps_high=trainer.epsilon_high, delta=args.delta,
        kl_estimator="k3", use_bias_correction_kl=args.use_bias_correction_kl,
        entropy_coef=trainer.entropy_coef,
        top_entropy_quantile=trainer.top_entropy_quantile,
        off_policy_mask_threshold=trainer.off_policy_mask_threshold,
        sapo_temperature_neg=args.sapo_temperature_neg,
        sapo_temperature_pos=args.sapo_temperature_pos, vespo_k_pos=args.vespo_k_pos,
        vespo_lambda_pos=args.vespo_lambda_pos, vespo_k_neg=args.vespo_k_neg,
        vespo_lambda_neg=args.vespo_lambda_neg)


def check_supported(trainer: GRPOTrainer) -> None:
    """Raises ValueError naming each option with which the drop-in's loss would differ from
    TRL's; warns when TRL is not the tested release."""
    import trl
    from transformers.integrations.deepspeed import is_deepspeed_zero3_enabled

    if not trl.__version__.startswith(TESTED_TRL + "."):
        warnings.warn(f"mr1fast.integrations.trl mirrors TRL {TESTED_TRL}'s GRPO loss; TRL "
                      f"{trl.__version__} is installed: its loss may differ", stacklevel=3)
    if trainer.loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type={trainer.loss_type!r}: mr1fast's loss has {LOSS_TYPES}")
    if trainer.importance_sampling_level not in LEVELS:
        raise ValueError(f"importance_sampling_level={trainer.importance_sampling_level!r}: "
                         f"mr1fast's loss has {LEVELS}")
    try:
        LossOptions(**loss_options(trainer))
    except ValueError as e:
        name = str(e).split(":")[0]
        raise ValueError(f"GRPOConfig.{TRL_NAMES.get(name, name)}: mr1fast's loss rejects it "
                         f"({e})") from e
    if trainer.use_adaptive_entropy:
        raise ValueError("use_adaptive_entropy=True: not supported by the drop-in (TRL's "
                         "controller sums each micro-batch's per-token entropies over its "
                         "entropy mask; mr1fast's loss returns their mean over the loss mask "
                         "only); use a constant entropy_coef")
    if trainer.aux_loss_enabled:
        raise ValueError("router_aux_loss_coef != 0 (a MoE load-balancing loss): not supported "
                         "by mr1fast's loss; set GRPOConfig(router_aux_loss_coef=0.0)")
    if trainer.top_entropy_quantile < 1.0 and trainer.accelerator.num_processes > 1:
        raise ValueError("top_entropy_quantile < 1 on several processes: TRL takes the entropy "
                         "quantile over every process's tokens, mr1fast's loss over the local "
                         "micro-batch's; set top_entropy_quantile=1.0 or run one process")
    if is_deepspeed_zero3_enabled():
        raise ValueError("DeepSpeed ZeRO-3: not supported (mr1fast's backward may read the LM "
                         "head's weight outside the forward, where ZeRO-3 has partitioned it)")
    text_config = trainer.model.config.get_text_config()
    for name in LOGIT_TRANSFORMS:
        value = getattr(text_config, name, None)
        if value is not None and value != 1.0:
            raise ValueError(f"model config {name}={value}: TRL's head transforms the logits "
                             "with it, mr1fast's loss does not")


def _head_dtype(weight: torch.Tensor, device: torch.device, cast_fp32: bool) -> torch.dtype:
    """The dtype TRL's head computes the logits in: fp32 with cast_lm_head_to_fp32, else the
    autocast dtype when autocast is on, else the weight's."""
    if cast_fp32:
        return torch.float32
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return weight.dtype


def _install_forward(trainer: GRPOTrainer) -> None:
    """Wraps the forward TRL patched with its fused head (once): with `mr1fast_loss=fn` the
    forward runs the backbone and returns fn(last hidden state [B, L, d], weight, bias)."""
    model = trainer.model.get_base_model() if is_peft_model(trainer.model) else trainer.model
    if getattr(model, "_mr1fast_loss_forward", False):
        return
    fused_forward = model.forward

    @functools.wraps(type(model).forward)
    def forward(self, *args, mr1fast_loss=None, **kwargs):
        if mr1fast_loss is None:
            return fused_forward(*args, **kwargs)
        kwargs["use_cache"] = False
        # As TRL's head: backbone and head looked up per call (FSDP and PEFT replace them).
        hidden = self.base_model(*args, **kwargs).last_hidden_state
        head = self.get_output_embeddings()
        weight, bias = head.weight, head.bias
        if isinstance(weight, DTensor):  # FSDP2: the whole head
            weight = weight.full_tensor()
            bias = None if bias is None else bias.full_tensor()
        return mr1fast_loss(hidden.to(weight.device), weight, bias)

    model.forward = types.MethodType(forward, model)
    model._mr1fast_loss_forward = True


class _ModelWithLoss:
    """Stands in for the model in TRL's _get_per_token_logps_and_entropies, so that TRL builds
    the model inputs as for its own loss; the call runs the model's forward with mr1fast's
    loss inside and keeps its (loss, stats)."""

    def __init__(self, model, loss_fn: Callable):
        self.model, self.loss_fn, self.result = model, loss_fn, None

    def __call__(self, *, labels, fused_lm_head, **model_inputs):
        if self.result is not None:
            raise RuntimeError("mr1fast.integrations.trl: TRL split the loss's forward into "
                               "chunks; the drop-in needs the micro-batch in one forward")
        self.result = self.model(**model_inputs, mr1fast_loss=self.loss_fn)
        return types.SimpleNamespace(log_probs=self.result[1]["logp"], entropy=None,
                                     aux_loss=None)


def compute_loss(trainer: GRPOTrainer, model, inputs: dict) -> torch.Tensor:
    """GRPOTrainer._compute_loss computed by mr1fast.grpo_loss: the same loss (and gradients)
    and the same metrics in trainer._metrics, on a micro-batch dict as
    _generate_and_score_completions returns it."""
    prompt_ids, completion_ids = inputs["prompt_ids"], inputs["completion_ids"]
    T = completion_ids.size(1)
    mask = inputs["completion_mask"]
    if "tool_mask" in inputs:
        mask = mask * inputs["tool_mask"]
    mode = "train" if trainer.model.training else "eval"
    accumulation = trainer.current_gradient_accumulation_steps if mode == "train" else 1
    options = loss_options(trainer)
    loss_type, beta = options["loss_type"], trainer.beta
    if loss_type == "vespo":
        weights = inputs.get("importance_sampling_ratio")
    elif trainer.use_vllm and trainer.vllm_importance_sampling_correction:
        weights = inputs["importance_sampling_ratio"]
    else:
        weights = None
    num_items = None
    if loss_type in TOKEN_NORMALISED:
        # TRL divides by N / processes * accumulation / steps_per_generation (N: the
        # generation batch's tokens); here the loss is divided by the accumulation below.
        num_items = inputs["num_items_in_batch"].float().clamp(min=1.0) \
            / trainer.accelerator.num_processes
        if mode == "train":
            num_items = num_items / trainer.args.steps_per_generation
    cast_fp32 = trainer.args.cast_lm_head_to_fp32

    def loss_fn(hidden, weight, bias):
        hidden = hidden[:, -T - 1:-1]  # the positions that predict the completion tokens
        dtype = _head_dtype(weight, hidden.device, cast_fp32)
        with torch.autocast(hidden.device.type, enabled=False):
            return grpo_loss(
                hidden.to(dtype), weight.to(dtype), completion_ids, inputs["advantages"],
                bias=None if bias is None else bias.to(dtype), mask=mask,
                old_logp=inputs.get("old_per_token_logps"),
                ref_logp=inputs["ref_per_token_logps"] if beta != 0.0 else None,
                importance_weights=weights,
                sampling_logp=inputs.get("sampling_per_token_logps")
                if options["off_policy_mask_threshold"] is not None else None,
                beta=beta, temperature=trainer.temperature,
                max_completion_length=trainer.max_completion_length,
                num_items_in_batch=num_items, return_entropy=True, impl="auto",
                check_values=False, **options)

    call = _ModelWithLoss(model, loss_fn)
    trainer._get_per_token_logps_and_entropies(
        call, torch.cat([prompt_ids, completion_ids], dim=1),
        torch.cat([inputs["prompt_mask"], inputs["completion_mask"]], dim=1), T,
        compute_entropy=False, compute_aux_loss=False,
        **{k: inputs.get(k) for k in MODEL_INPUT_KEYS})
    loss, stats = call.result
    _log_metrics(trainer, mode, loss.detach(), stats, inputs, mask, options, accumulation)
    return loss / accumulation


def _log_metrics(trainer, mode, loss, stats, inputs, mask, options, accumulation) -> None:
    """The metrics TRL's _compute_loss appends to trainer._metrics[mode], from mr1fast's stats
    (means over the micro-batch's loss mask) and its per-token log-probs."""
    metrics, acc = trainer._metrics[mode], trainer.accelerator
    m = mask.float()
    tokens, rows = m.sum(), torch.tensor(float(m.size(0)), device=m.device)

    def global_mean(local_sum, local_count):  # over every process, as TRL's global_masked_mean
        totals = acc.reduce(torch.stack([local_sum, local_count]), reduction="sum")
        return (totals[0] / totals[1].clamp(min=1.0)).item()

    def global_masked_mean(x):  # x [B, 1] (one value per sequence) or [B, T]
        return global_mean(x.sum(), rows) if x.shape[1] == 1 else global_mean((x * m).sum(),
                                                                               tokens)

    def masked_seq_mean(x):  # per sequence, no clamp: NaN for an empty row (as TRL)
        return x.squeeze(1) if x.shape[1] == 1 else (x * m).sum(-1) / m.sum(-1)

    if trainer._entropy_bonus_enabled:
        if options["top_entropy_quantile"] >= 1.0:
            policy = loss + options["entropy_coef"] * stats["entropy"]
            if options["loss_type"] in TOKEN_NORMALISED:
                policy = policy / accumulation
            metrics["policy_loss"].append(acc.gather(policy).nanmean().item())
        if mode == "train" and acc.sync_gradients:
            metrics["entropy_coef"].append(trainer.entropy_coef)
    if trainer.beta != 0.0:
        metrics["kl"].append(global_mean(stats["kl"] * tokens, tokens))
    metrics["entropy"].append(global_mean(stats["entropy"] * tokens, tokens))

    loss_type = options["loss_type"]
    if loss_type == "sapo":
        return
    # The ratios as TRL's metrics see them, from the log-probs the loss computed.
    old = inputs.get("old_per_token_logps")
    log_ratio = stats["logp"] - old if old is not None else torch.zeros_like(m)
    adv = inputs["advantages"]
    adv = adv.unsqueeze(1) if adv.dim() == 1 else adv
    if loss_type == "vespo":  # TRL's own weight function (stats["phi_mean"] would count padding)
        phi = trainer.get_gamma_weights(
            adv, log_ratio, mask, inputs.get("importance_sampling_ratio"),
            options["vespo_k_pos"], options["vespo_lambda_pos"], options["vespo_k_neg"],
            options["vespo_lambda_neg"])
        metrics["vespo/phi_seq_mean"].append(global_masked_mean(phi))
        return
    if options["importance_sampling_level"] == "sequence":
        log_ratio = ((log_ratio * m).sum(-1) / m.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    ratio = torch.exp(log_ratio)
    if loss_type == "cispo":
        metrics["cispo_clip_ratio"].append(
            global_masked_mean(((ratio > options["eps_high"]) & (adv > 0)).float()))
        return
    if options["delta"] is not None:
        ratio = ratio.clamp(max=options["delta"])
    low = ((ratio < 1 - options["eps_low"]) & (adv < 0)).float()
    high = ((ratio > 1 + options["eps_high"]) & (adv > 0)).float()
    metrics["clip_ratio/low_mean"].append(global_masked_mean(low))
    metrics["clip_ratio/high_mean"].append(global_masked_mean(high))
    metrics["clip_ratio/region_mean"].append(global_masked_mean(torch.maximum(low, high)))
    metrics["clip_ratio/low_min"].append(nanmin(acc.gather(masked_seq_mean(low))).item())
    metrics["clip_ratio/high_max"].append(nanmax(acc.gather(masked_seq_mean(high))).item())


def _score_with_reference(trainer: GRPOTrainer, score: Callable, inputs):
    """TRL computes the reference log-probs of a generation batch only while trainer.beta != 0.
    A scheduled beta can be 0 at the step that generates a batch and > 0 at a later step that
    trains on it (steps_per_generation > gradient_accumulation_steps, num_iterations > 1), so
    they are computed whenever the run has a reference model (args.beta != 0)."""
    beta = trainer.beta
    if beta != 0.0 or trainer.args.beta == 0.0:
        return score(inputs)
    trainer.beta = trainer.args.beta
    try:
        return score(inputs)
    finally:
        trainer.beta = beta


class BetaScheduleCallback(TrainerCallback):
    """Sets the trainer's KL coefficient (trainer.beta) at the start of every optimizer step
    from a schedule, and logs it as the metric "beta".

    schedule: a kind of mr1fast.loss.schedules ("grpo_d": the paper's V-shaped GRPO-D schedule,
    "constant", "linear", "cosine") with its parameters as keywords (preset="counting" |
    "geometry" for grpo_d; total_steps defaults to the run's max_steps), or a callable
    0-based optimizer step -> beta (float >= 0). Bound to the trainer by MR1GRPOTrainer
    (callbacks=[...]) or patch(trainer); the run's GRPOConfig must have beta != 0, since TRL
    builds no reference model when beta == 0 (ValueError at binding).
    """

    def __init__(self, schedule: Union[str, Callable[[int], float]] = "grpo_d", **params):
        if callable(schedule):
            if params:
                raise ValueError(f"BetaScheduleCallback: parameters {sorted(params)} are only "
                                 "for a schedule kind, not a callable schedule")
        else:
            beta_schedule(schedule, params.get("total_steps", 1),  # checks kind and params now
                          **{k: v for k, v in params.items() if k != "total_steps"})
        self.schedule, self.params = schedule, params
        self.trainer: Optional[GRPOTrainer] = None
        self.step_beta: Optional[Callable[[int], float]] = None

    def bind(self, trainer: GRPOTrainer) -> None:
        if trainer.args.beta == 0.0:
            raise ValueError("BetaScheduleCallback with GRPOConfig(beta=0.0): TRL builds no "
                             "reference model when beta == 0, so a scheduled KL term has no "
                             "reference log-probs; set beta to a non-zero value (the schedule "
                             "overrides it at every step)")
        self.trainer = trainer

    def on_train_begin(self, args, state, control, **kwargs):
        if self.trainer is None:
            raise RuntimeError("BetaScheduleCallback is not bound to a trainer: pass it in "
                               "MR1GRPOTrainer(callbacks=[...]), or call "
                               "mr1fast.integrations.trl.patch(trainer) after add_callback")
        if callable(self.schedule):
            self.step_beta = self.schedule
        else:
            params = dict(self.params)
            total = params.pop("total_steps", state.max_steps)
            self.step_beta = beta_schedule(self.schedule, total, **params)

    def on_step_begin(self, args, state, control, **kwargs):
        beta = float(self.step_beta(state.global_step))
        if not beta >= 0.0:
            raise ValueError(f"BetaScheduleCallback: the schedule gave beta={beta} at step "
                             f"{state.global_step}; expected a float >= 0")
        self.trainer.beta = beta
        self.trainer._metrics["train"]["beta"].append(beta)


def _prepare(trainer: GRPOTrainer) -> None:
    check_supported(trainer)
    _install_forward(trainer)
    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, BetaScheduleCallback):
            callback.bind(trainer)


class MR1GRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with its loss computed by mr1fast.grpo_loss (module doc). Takes
    GRPOTrainer's arguments; binds the BetaScheduleCallback instances among `callbacks`."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _prepare(self)

    def _compute_loss(self, model, inputs):
        return compute_loss(self, model, inputs)

    def _generate_and_score_completions(self, inputs):
        return _score_with_reference(self, super()._generate_and_score_completions, inputs)


def patch(trainer: GRPOTrainer) -> GRPOTrainer:
    """Makes a GRPOTrainer already built (or an instance of a subclass) compute its loss with
    mr1fast.grpo_loss, as MR1GRPOTrainer does, and binds its BetaScheduleCallbacks (call again
    after add_callback). Returns the trainer."""
    if not isinstance(trainer, GRPOTrainer):
        raise TypeError(f"patch: expected a trl.GRPOTrainer, got {type(trainer).__name__}")
    _prepare(trainer)
    if not isinstance(trainer, MR1GRPOTrainer) and not getattr(trainer, "_mr1fast_patched",
                                                               False):
        trainer._compute_loss = types.MethodType(compute_loss, trainer)
        trainer._generate_and_score_completions = functools.partial(
            _score_with_reference, trainer, trainer._generate_and_score_completions)
        trainer._mr1fast_patched = True
    return trainer
