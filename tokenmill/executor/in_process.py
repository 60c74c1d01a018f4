"""The model runner in the engine's own process: a direct call, as tokenmill always ran."""

from __future__ import annotations

import os

from tokenmill.config import EngineConfig
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.executor.executor import Executor
from tokenmill.loader.model_source import ModelSource
from tokenmill.models.moe_stats import ExpertLoad
from tokenmill.worker.model_runner import ModelRunner
from tokenmill.worker.worker import Worker


class InProcessExecutor(Executor):
    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int):
        self.worker = Worker(config, max_model_len, source=source)
        self.kv_spec = self.worker.runner.kv_spec
        self.weights = self.worker.runner.describe_weights()
        self.worker_pids = [os.getpid()]
        self.weight_bytes = [self.worker.runner.weight_bytes()]

    @property
    def runner(self) -> ModelRunner:
        return self.worker.runner

    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        return self.worker.execute(scheduler_output)

    def expert_load(self) -> ExpertLoad | None:
        return self.worker.runner.expert_load()

    def check_health(self) -> None:
        pass  # it fails with the engine thread itself

    def shutdown(self) -> None:
        pass
