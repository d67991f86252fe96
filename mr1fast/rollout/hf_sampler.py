"""transformers' generate as a sampler (sampler=hf): colocated, on the policy itself.

Sampling is seeded per completion: completion j of a prompt with seed s draws its tokens from
its own generator, seeded by (s, j), by Gumbel-max (argmax(scores / T + Gumbel noise) is a draw
from softmax(scores / T)) in a logits processor, with generate itself running greedy. So a
completion does not depend on which other prompts share its batch: the trainer's samples are
the same at every world size. It also avoids torch.multinomial's cumulative sum over a
151936-entry vocabulary.
"""
from __future__ import annotations

import hashlib
from typing import Iterable, Optional, Sequence

import torch

from .sampler import PromptBatch, Rollout, SamplingParams, completion_mask


class _SampledLogprobs:
    """A logits processor that records the log-prob of each sampled token without keeping
    the [B, V] scores of every step (which output_scores would: ~40 GB at B=128, V=151936,
    512 tokens). It keeps a reference to one step's scores (no copy: the processors after it
    and the sampling step are out-of-place) until the next call shows the sampled token, then
    takes score/T - logsumexp(scores/T) of that token alone: no [B, V] log-softmax per step.
    transformers applies temperature / top-k / top-p after custom processors, so the
    temperature is applied here; the log-probs are those of the suppressed, temperature-scaled
    distribution (top-k / top-p truncation, off by default, is not reflected)."""

    def __init__(self, temperature: float):
        self.temperature = temperature
        self.previous = None
        self.steps: list[torch.Tensor] = []

    def _record(self, tokens: torch.Tensor) -> None:
        scores = self.previous.float()
        if self.temperature != 1.0:
            scores = scores / self.temperature
        self.steps.append(scores.gather(-1, tokens).squeeze(-1) - torch.logsumexp(scores, -1))
        self.previous = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.previous is not None:
            self._record(input_ids[:, -1:])
        self.previous = scores
        return scores

    def finish(self, ids: torch.Tensor) -> torch.Tensor:
        """[B, C] fp32 log-probs of the generated ids."""
        if self.previous is not None:
            self._record(ids[:, -1:])
        if not self.steps:
            return torch.zeros(ids.shape, dtype=torch.float32, device=ids.device)
        return torch.stack(self.steps, 1)


def completion_seed(seed: int, j: int) -> int:
    """The generator seed of completion j of a prompt with seed `seed` (63 bits)."""
    digest = hashlib.blake2b(f"{seed}/{j}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class _SeededSampling:
    """A logits processor that samples each row from softmax(scores / T), after top-k and
    top-p, with the row's own generator, by Gumbel-max: it returns scores / T + G where
    G = -log(-log(U)) is Gumbel noise, so generate's greedy argmax is the sample (and -inf
    where a token may not be drawn)."""

    def __init__(self, seeds: Sequence[int], params: SamplingParams, device: torch.device):
        from transformers import TopKLogitsWarper, TopPLogitsWarper

        self.generators = [torch.Generator(device).manual_seed(s) for s in seeds]
        self.temperature = params.temperature
        self.warpers = ([TopKLogitsWarper(params.top_k)] if params.top_k > 0 else []) + \
            ([TopPLogitsWarper(params.top_p)] if params.top_p < 1.0 else [])

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        z = scores.float() / self.temperature
        for warp in self.warpers:
            z = warp(input_ids, z)
        u = torch.stack([torch.rand(z.shape[1], generator=g, device=z.device)
                         for g in self.generators])
        gumbel = -torch.log(-torch.log(u.clamp(min=torch.finfo(torch.float32).tiny)))
        return z + gumbel


class HFSampler:
    """transformers' generate on `model` (colocated: by default the policy itself, so
    update_weights has nothing to copy; given a separate model it copies the tensors in)."""

    def __init__(self, model, stop_ids: Sequence[int], pad_id: int,
                 suppress_ids: Sequence[int] = ()):
        self.model = model
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.suppress_ids = list(suppress_ids)
        self.needs_full_sync = True  # a separate model gets every weight once, then trainables

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, n: int, params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """n completions per prompt; `seeds` (one per prompt) make each completion's draw its
        own (default: seeds drawn from torch's global generator)."""
        from transformers import GenerationConfig, LogitsProcessorList

        # A fresh generation config: nothing from the checkpoint's generation_config.json
        # (a repetition penalty, say) changes the distribution the samples come from. Greedy
        # decoding (sampling happens in _SeededSampling), on the prompts repeated n times
        # (greedy generate takes no num_return_sequences).
        index = torch.arange(len(prompts)).repeat_interleave(n)
        rows = prompts.select(index) if n > 1 else prompts
        config = GenerationConfig(
            max_new_tokens=params.max_new_tokens, do_sample=False, num_beams=1,
            repetition_penalty=1.0,
            pad_token_id=self.pad_id, eos_token_id=None if params.ignore_eos else self.stop_ids,
            min_new_tokens=params.max_new_tokens if params.ignore_eos else 0,
            suppress_tokens=self.suppress_ids or None, use_cache=True)
        recorder = _SampledLogprobs(1.0 if params.greedy else params.temperature)
        processors = [recorder]
        if not params.greedy:
            if seeds is None:
                seeds = torch.randint(0, 2**62, (len(prompts),)).tolist()
            if len(seeds) != len(prompts):
                raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got "
                                 f"{len(seeds)}")
            processors.append(_SeededSampling(
                [completion_seed(s, j) for s in seeds for j in range(n)], params,
                prompts.input_ids.device))
        was_training = self.model.training
        self.model.eval()
        try:
            out = self.model.generate(
                input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                **rows.vision_inputs(), mm_token_type_ids=(rows.input_ids == rows.image_token_id).int(),
                generation_config=config, logits_processor=LogitsProcessorList(processors))
        finally:
            self.model.train(was_training)
        ids = out[:, rows.input_ids.shape[1]:]
        mask = torch.ones_like(ids, dtype=torch.float32) if params.ignore_eos \
            else completion_mask(ids, self.stop_ids)
        logp = recorder.finish(ids)
        logp = torch.where(mask > 0, logp, torch.zeros_like(logp))
        return Rollout(ids.masked_fill(mask == 0, self.pad_id), mask, logp, index)

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name not in params:
                raise KeyError(f"update_weights: the sampler's model has no parameter {name!r}")
            dst = params[name]
            if dst.data_ptr() != tensor.data_ptr():
                dst.copy_(tensor)
        self.needs_full_sync = False
