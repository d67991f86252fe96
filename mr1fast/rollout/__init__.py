"""The rollout engines: the sampler interface (sampler.py), transformers' generate
(hf_sampler.py), the colocated vLLM engine with in-place weight hot-swapping (vllm_sampler.py),
and the environment fix they need (compat.py).

Importing this package applies compat.torchvision_shim() first, before anything here or in the
trainer imports transformers (which imports torchvision whenever it is installed). It may use
the loss library; it never imports the trainer.
"""
from .compat import torchvision_shim

torchvision_shim()

from .hf_sampler import HFSampler  # noqa: E402
from .sampler import (PromptBatch, Rollout, Sampler, SamplingParams, completion_mask,  # noqa: E402
                      resolve_sampler, vllm_available)

__all__ = ["PromptBatch", "Rollout", "Sampler", "SamplingParams", "HFSampler",
           "completion_mask", "resolve_sampler", "vllm_available", "torchvision_shim"]
