"""Who this process is in a tensor-parallel group, and the group's collectives.

A model is built with a ``ParallelContext``: its ``rank``, ``world_size`` and the collectives the
sharded layers call (``all_reduce`` after a row-parallel layer and the vocab-parallel embedding,
``all_gather`` of the vocab-parallel logits). ``ParallelContext.single()`` (the default) is one rank
with no communication, so a TP=1 model runs exactly the code it ran before tensor parallelism.

``init_distributed`` starts the torch.distributed process group: gloo when the model runs on a
CPU, nccl on CUDA (chosen from the device, DESIGN: nothing hard-codes ``cpu`` or ``cuda``).
On CPU the all-reduce between ranks of one machine can go through shared memory instead of gloo
(``tokenmill.distributed.shm_allreduce``): a gloo all-reduce of one hidden vector costs ~0.1 ms,
and a step has two per layer (see docs/tensor_parallel.md for the measured figures).
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch

from tokenmill.errors import ConfigError

ALLREDUCE_ENV = "TOKENMILL_TP_ALLREDUCE"  # "shm" (default on CPU) or "gloo"
ALLREDUCE_BACKENDS = ("auto", "shm", "gloo")


def backend_for_device(device: torch.device | str) -> str:
    """The torch.distributed backend for a model on ``device``: nccl on CUDA, gloo otherwise."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


@dataclass
class ParallelContext:
    """One rank of a tensor-parallel group (``world_size`` 1: no parallelism, no group)."""

    rank: int = 0
    world_size: int = 1
    group: Any = None  # torch.distributed ProcessGroup; None = the default group
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    # the shared-memory communicator when the ranks share a machine's memory (CPU), else None
    shm: Any = None

    @classmethod
    def single(cls) -> ParallelContext:
        return cls()

    @property
    def is_parallel(self) -> bool:
        return self.world_size > 1

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks, in place; returns it."""
        if self.world_size == 1:
            return tensor
        if self.shm is not None and self.shm.can_reduce(tensor):
            return self.shm.all_reduce(tensor)
        import torch.distributed as dist

        dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather_last_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's ``tensor`` (same shape on all ranks) concatenated along the last dim."""
        if self.world_size == 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()
            self.shm = None


def file_rendezvous(directory: str) -> str:
    """An ``init_method`` for ranks on this machine: a new file in ``directory`` (torch's
    FileStore). Unlike ``tcp://127.0.0.1:<port>`` it needs no port found free beforehand, which
    another process could bind before rank 0 does."""
    return f"file://{os.path.join(directory, f'rendezvous-{uuid.uuid4().hex}')}"


def init_distributed(rank: int, world_size: int, init_method: str,
                     device: torch.device | str = "cpu", allreduce: str | None = None,
                     timeout_s: float | None = None) -> ParallelContext:
    """Join the process group at ``init_method`` (``file_rendezvous`` on one machine) as ``rank``: gloo
    on a CPU, nccl on CUDA (one GPU per rank). ``timeout_s`` bounds the wait for the other ranks.

    ``allreduce``: "shm" (ranks on one machine, CPU: shared-memory all-reduce), "gloo", or
    "auto"/None (``$TOKENMILL_TP_ALLREDUCE``, else shm on CPU)."""
    import torch.distributed as dist

    if not 0 <= rank < world_size:
        raise ConfigError(f"rank={rank} is outside a group of world_size={world_size}",
                          param="tensor_parallel_size")
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.set_device(rank % torch.cuda.device_count())
        device = torch.device("cuda", torch.cuda.current_device())
    if not dist.is_initialized():
        extra = {} if timeout_s is None else {"timeout": timedelta(seconds=timeout_s)}
        dist.init_process_group(backend_for_device(device), init_method=init_method,
                                rank=rank, world_size=world_size, **extra)
    return context_from_group(device, allreduce)


def context_from_group(device: torch.device | str = "cpu", allreduce: str | None = None,
                       group: Any = None) -> ParallelContext:
    """The context of this process in an already initialised group (the executor's workers).
    Collective: every rank of the group calls it (the shared-memory buffer is set up together)."""
    import torch.distributed as dist

    device = torch.device(device)
    context = ParallelContext(dist.get_rank(group), dist.get_world_size(group), group, device)
    choice = (allreduce or os.environ.get(ALLREDUCE_ENV) or "auto").lower()
    if choice not in ALLREDUCE_BACKENDS:
        raise ConfigError(f"{ALLREDUCE_ENV}={choice!r} is not one of "
                          f"{', '.join(ALLREDUCE_BACKENDS)}", param="allreduce")
    if context.world_size > 1 and device.type == "cpu" and choice in ("auto", "shm"):
        from tokenmill.distributed.shm_allreduce import SharedMemoryAllReduce

        context.shm = SharedMemoryAllReduce.create(context.rank, context.world_size, group)
    return context
