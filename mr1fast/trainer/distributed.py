"""Several processes: torchrun, torch.distributed and FSDP2, and the few collectives the
trainer needs. `mr1fast train` without torchrun is one process and none of this runs.

    torchrun --nproc-per-node 8 -m mr1fast train --config configs/qwen2vl-7b-counting-grpo-d.yaml
    torchrun --nnodes 2 --node-rank R --rdzv-backend c10d --rdzv-endpoint HOST:29500 \
        --nproc-per-node 8 -m mr1fast train --config ...

- The process group: NCCL on CUDA (one GPU per process, cuda:LOCAL_RANK), gloo on CPU, with a
  timeout on every collective (dist.timeout_s), so a rank that dies or hangs stops the job
  instead of leaving the others waiting forever; torchrun stops the remaining ranks when one
  exits with an error.
- FSDP2 (`fully_shard`): one unit per decoder layer and per vision block, and the root unit, the
  Policy wrapper (model.py), which holds the embeddings, the LM head and the vision tower's
  patch embedding and merger. Every trainer pass runs inside Policy.forward, so FSDP gathers
  the root's parameters for it and reduce-scatters their gradients after it. Parameters are
  kept sharded in fp32 (the master weights); compute runs in the model dtype (bf16 on GPUs) by
  FSDP's mixed-precision policy, with fp32 gradient reduction. Gradients are summed across
  ranks, not averaged: each rank's loss is already weighted by its share of the global batch.
- `mr1fast train` without torchrun is one plain process; `torchrun --nproc-per-node 1` runs
  the same process-group and FSDP path as N processes, on one GPU.
- Rank 0 alone writes logs, metrics, plots, eval results, the progress bar and the small files
  of a checkpoint; every rank writes its checkpoint shards.
"""
from __future__ import annotations

import datetime
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

# Policy.forward returns views (log-probs reshaped to the targets' shape); FSDP2 warns that an
# in-place op on one would skip its hooks. The trainer never modifies them in place.
warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")


@dataclass
class World:
    """This process's place in the job. rank 0 of size 1 when not launched by torchrun."""
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    mesh: Any = None  # torch DeviceMesh over all ranks, None in a single process

    @property
    def distributed(self) -> bool:
        """Launched by torchrun (a process group, FSDP), even as a single process."""
        return self.mesh is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over ranks (in place; `x` itself in a single process)."""
        if self.distributed:
            dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    def max(self, n: int) -> int:
        """The largest of every rank's int `n` (n itself in a single process)."""
        if not self.distributed:
            return n
        box = torch.tensor([n], dtype=torch.long,
                           device="cuda" if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(box, op=dist.ReduceOp.MAX)
        return int(box.item())

    def gather(self, obj) -> list:
        """Every rank's `obj` (a small picklable value), in rank order, on every rank."""
        if not self.distributed:
            return [obj]
        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """rank 0's `obj` on every rank."""
        if not self.distributed:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def my_share(self, n: int) -> slice:
        """The slice of n items (n divisible by the world size) that this rank takes."""
        per = n // self.size
        return slice(self.rank * per, (self.rank + 1) * per)


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or "WORLD_SIZE" in os.environ


def init_world(device: torch.device, timeout_s: float) -> tuple[World, torch.device]:
    """The process group when launched by torchrun (NCCL on CUDA, gloo on the CPU; also for
    one process: `torchrun --nproc-per-node 1` runs the FSDP path on one GPU), and this rank's
    device; a single-process World (no process group, no FSDP) otherwise."""
    if not launched_by_torchrun():
        return World(), device
    rank, size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s),
                                **({"device_id": device} if backend == "nccl" else {}))
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh(device.type, (size,))
    return World(rank, size, local_rank, mesh), device


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def shard(policy: torch.nn.Module, world: World, *, compute_dtype: torch.dtype,
          master_dtype: torch.dtype = torch.float32, cpu_offload: bool = False
          ) -> torch.nn.Module:
    """FSDP2 over a Policy wrapper (module doc): a unit per decoder layer and vision block,
    the wrapper as the root; sharded parameters in `master_dtype` (fp32: the master weights of
    a trained policy; the compute dtype for a frozen reference), `compute_dtype` compute, fp32
    reduction, gradients summed across ranks. Returns the wrapper, now an FSDPModule."""
    from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy,
                                        OffloadPolicy, fully_shard)

    policy.to(master_dtype)
    mp = MixedPrecisionPolicy(param_dtype=None if compute_dtype == master_dtype else compute_dtype,
                              reduce_dtype=torch.float32)
    kwargs = dict(mesh=world.mesh, mp_policy=mp,
                  offload_policy=CPUOffloadPolicy() if cpu_offload else OffloadPolicy())
    inner = policy.model.model
    for layer in inner.language_model.layers:
        fully_shard(layer, **kwargs)
    for block in inner.visual.blocks:
        fully_shard(block, **kwargs)
    fully_shard(policy, **kwargs)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            # Sum, not average: each rank's loss is weighted by its share of the global batch.
            # (Forced sum reductions: gloo has no pre-multiplied sum.)
            module.set_force_sum_reduction_for_comms(True)
            module.set_gradient_divide_factor(1.0)
    return policy


def full_tensors(named, world: World):
    """(name, full tensor) of (name, parameter) pairs: a sharded parameter is all-gathered one
    at a time, so no more than one full parameter is materialised at once beyond the
    caller's copy."""
    from torch.distributed.tensor import DTensor

    for name, p in named:
        yield name, (p.full_tensor() if isinstance(p, DTensor) else p).detach()


def local(x):
    """A DTensor's full value (a collective) or a plain tensor itself."""
    from torch.distributed.tensor import DTensor

    return x.full_tensor() if isinstance(x, DTensor) else x
