"""Picking the executor for a config, and refusing a parallel layout that cannot work before any
worker starts. Kept apart from ``executor.py`` so the interface does not import its own
implementations (which import it)."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed.sharding import check_model_split
from tokenmill.errors import ConfigError
from tokenmill.executor.executor import Executor
from tokenmill.loader.model_source import ModelSource

if TYPE_CHECKING:
    from tokenmill.models.arch_config import ArchConfig


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
