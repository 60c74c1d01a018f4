"""The engine core's one door to the model: ``execute(SchedulerOutput) -> RunnerOutput``.

Two implementations behind one interface, picked once from ``ParallelConfig`` by
``factory.make_executor``:

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

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput

if TYPE_CHECKING:
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
