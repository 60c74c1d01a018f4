"""The engine core's one door to the model: ``execute(SchedulerOutput) -> RunnerOutput``.

Two implementations behind one interface, picked once from ``ParallelConfig``:

* ``InProcessExecutor`` (``in_process.py``): the model runner lives in the engine's own process,
  on the engine thread; the default for one rank.
* ``MultiProcessExecutor`` (``multi_process.py``): one worker process per rank, spawned; each step
  is pickled once and sent to every rank, rank 0's ``RunnerOutput`` comes back. Used whenever the
  world size is above 1, or for one rank with ``distributed_executor="mp"``.

Failure is loud: an executor whose worker died, raised, or did not answer within
``worker_step_timeout`` raises ``WorkerFailedError`` from ``execute`` (or ``check_health``), and
stays failed. The engine core lets it propagate, which kills the engine (every request fails,
``/health`` answers 503, ``tokenmill serve`` exits 1).
"""

from __future__ import annotations

import os
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed.sharding import check_model_split
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.errors import ConfigError
from tokenmill.loader.model_source import ModelSource

if TYPE_CHECKING:
    from tokenmill.models.arch_config import ArchConfig
    from tokenmill.models.moe_stats import ExpertLoad
from tokenmill.worker.kv_cache import KVCacheSpec


class Executor(ABC):
    kv_spec: KVCacheSpec
    """The KV pool the scheduler plans with: the smallest any rank has."""
    weights: str
    """Rank 0's description of its weights (for the start-up banner)."""
    worker_pids: list[int]
    """Process id of each rank (the engine's own pid in process)."""
    weight_bytes: list[int]
    """Bytes of weights each rank holds (its shards under tensor parallelism)."""
    allreduce: str | None = None
    """How the ranks sum partial results ("shm", "gloo", "nccl"); None for one rank."""

    @abstractmethod
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        """Run one step on every rank; rank 0's output. Raises WorkerFailedError if a rank
        fails."""

    @abstractmethod
    def check_health(self) -> None:
        """Raise WorkerFailedError if a rank is gone (cheap; called while the engine idles)."""

    def expert_load(self) -> ExpertLoad | None:
        """A Mixture-of-Experts model's routing counts (None: a dense model)."""
        return None

    @abstractmethod
    def shutdown(self) -> None:
        """Stop every rank; idempotent, and safe after a failure."""


def make_executor(config: EngineConfig, source: ModelSource, max_model_len: int) -> Executor:
    check_parallel_placement(config, source.arch)
    if config.parallel.uses_worker_processes:
        from tokenmill.executor.multi_process import MultiProcessExecutor

        return MultiProcessExecutor(config, max_model_len)
    from tokenmill.executor.in_process import InProcessExecutor

    return InProcessExecutor(config, source, max_model_len)


def check_parallel_placement(config: EngineConfig, arch: ArchConfig) -> None:
    """Refuse, before any worker starts, a tensor-parallel size the model cannot be cut into or
    (on a CPU) more ranks than the cores this process may run on."""
    ranks = config.parallel.tensor_parallel_size
    check_model_split(arch, ranks)
    if torch.device(config.model.device).type != "cpu" or config.parallel.allow_more_ranks_than_cores:
        return
    cores = usable_cores()
    if ranks > cores:
        raise ConfigError(
            f"tensor_parallel_size={ranks} needs one core per rank, but this process may use "
            f"{cores}; use at most {cores}, or pass --allow-more-ranks-than-cores to share "
            "cores (slower)", param="tensor_parallel_size")


def usable_cores() -> int:
    """Cores this process may run on (its CPU affinity: a container's or taskset's limit)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
