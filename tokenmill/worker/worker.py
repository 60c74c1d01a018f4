"""One rank of the model: its torch threads, its place in the process group, its model runner.

The same class runs in the engine's own process (``InProcessExecutor``, rank 0 of 1) and in each
worker process (``MultiProcessExecutor``). It is the seam for tensor parallelism: every worker
knows its ``rank`` and the ``world_size``, and with more than one rank it joins a
``torch.distributed`` group (gloo on a CPU, nccl on CUDA) at an address on 127.0.0.1 before the
model is built. The model is then built with this rank's ``ParallelContext``: each rank loads
only its shard of every layer (``tokenmill/distributed/``) and caches only its KV heads; all ranks
run every step together (their layers all-reduce), and rank 0's sampled tokens are the answer.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed.parallel_state import ParallelContext, init_distributed
from tokenmill.engine.fault_injection import WorkerFaultInjector
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.loader.model_source import ModelSource, open_model_source
from tokenmill.worker.kv_cache import KVCacheSpec
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorkerInfo:
    """What a worker reports once its model is loaded (plain data, sent over a pipe)."""

    rank: int
    pid: int
    kv_spec: KVCacheSpec
    weights: str
    """``ModelRunner.describe_weights()``: for the start-up banner."""
    world_size: int = 1
    distributed_backend: str | None = None
    """The process group it joined ("gloo", "nccl"); None for a single rank."""
    weight_bytes: int = 0
    """Bytes of weights this rank holds: about 1/world_size of the model's."""
    allreduce: str | None = None
    """How its layers sum partial results: "shm" (shared memory), "gloo", "nccl"; None alone."""


class Worker:
    def __init__(self, config: EngineConfig, max_model_len: int, *, rank: int = 0,
                 world_size: int = 1, distributed_init_method: str | None = None,
                 source: ModelSource | None = None):
        self.rank = rank
        self.world_size = world_size
        torch.set_num_threads(max(1, config.resolved_num_threads() // world_size))
        self.parallel = ParallelContext.single()
        if world_size > 1:
            assert distributed_init_method is not None
            self.parallel = init_distributed(rank, world_size, distributed_init_method,
                                             config.model.device,
                                             timeout_s=config.parallel.worker_start_timeout)
            logger.info("rank %d/%d joined the %s process group at %s", rank, world_size,
                        torch.distributed.get_backend(), distributed_init_method)
        self.runner = ModelRunner(rank_config(config, world_size),
                                  source or open_model_source(config.model.model), max_model_len,
                                  self.parallel)
        self.faults = WorkerFaultInjector.from_env()

    def info(self) -> WorkerInfo:
        backend = (torch.distributed.get_backend() if self.world_size > 1
                   and torch.distributed.is_initialized() else None)
        allreduce = None if backend is None else ("shm" if self.parallel.shm else backend)
        return WorkerInfo(self.rank, os.getpid(), self.runner.kv_spec,
                          self.runner.describe_weights(), self.world_size, backend,
                          self.runner.weight_bytes(), allreduce)

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.faults.before_execute()
        return self.runner.execute(scheduler_output)

    def shutdown(self) -> None:
        self.parallel.close()
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def rank_config(config: EngineConfig, world_size: int) -> EngineConfig:
    """Ranks on one CPU share its memory: a KV budget given as a fraction of free memory is
    split between them (each rank caches 1/world_size of the KV heads, or one replicated head,
    so the pool keeps about the same number of blocks as one rank would have)."""
    cache = config.cache
    if world_size == 1 or cache.kv_cache_memory > 1 or config.model.device != "cpu":
        return config
    return dataclasses.replace(config, cache=dataclasses.replace(
        cache, kv_cache_memory=cache.kv_cache_memory / world_size))
