"""The engine core: ``step() = schedule() -> execute() -> update_from_output()``.

Owns the scheduler (token ids, KV blocks) and the executor, its door to the model runner(s) on the
device (in this process, or in one worker process per rank: ``tokenmill/executor/``). What crosses
that door is plain data (``scheduler_output.py``). Knows nothing about text: the frontend
(``llm.py`` / ``async_llm.py``) tokenizes, detokenizes and matches stop strings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

from tokenmill.config import EngineConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import EngineCoreOutput, SchedulerOutput
from tokenmill.engine.stats import SchedulerStats
from tokenmill.errors import ConfigError
from tokenmill.executor.executor import Executor
from tokenmill.executor.factory import make_executor
from tokenmill.loader.model_source import ModelSource, open_model_source
from tokenmill.structured_output.bitmask import GrammarBitmask, build_grammar_bitmask
from tokenmill.worker.kv_cache import KVCacheSpec
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None):
        started = time.perf_counter()
        self.config = config
        self.source = source or open_model_source(config.model.model)
        self.max_model_len = resolve_max_model_len(config, self.source)
        self.executor: Executor = make_executor(config, self.source, self.max_model_len)
        self.kv_spec: KVCacheSpec = self.executor.kv_spec
        try:
            self.scheduler = Scheduler(config.scheduler, config.cache, self.kv_spec.num_blocks,
                                       self.max_model_len)
        except BaseException:
            self.executor.shutdown()  # no worker process outlives a failed start
            raise
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s in %.1fs; %s", self.source.path, self.load_seconds,
                    self.kv_spec.describe(self.max_model_len))

    @property
    def runner(self) -> ModelRunner:
        """The model runner, when it runs in this process (tests and profiling reach into it)."""
        runner = getattr(self.executor, "runner", None)
        if runner is None:
            raise AttributeError("the model runs in worker processes "
                                 "(distributed_executor='mp'); no runner in this process")
        return runner

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)

    def abort_requests(self, request_ids: list[str]) -> None:
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_ABORTED)

    def stop_requests(self, request_ids: list[str]) -> None:
        """Finish requests a stop string ended (the frontend saw it in the text)."""
        self.scheduler.finish_requests(request_ids, RequestStatus.FINISHED_STOPPED)

    def step(self) -> list[EngineCoreOutput]:
        scheduler_output = self.scheduler.schedule()
        if scheduler_output.is_empty:
            return []
        scheduler_output.grammar_bitmask = self._grammar_bitmask(scheduler_output)
        runner_output = self.executor.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def check_health(self) -> None:
        """Raise WorkerFailedError if a model worker is gone (call while idle; a step finds out
        by itself)."""
        self.executor.check_health()

    def shutdown(self) -> None:
        """Stop the model workers (idempotent)."""
        self.executor.shutdown()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        stats = self.scheduler.get_stats()
        expert_load = self.executor.expert_load()
        return stats if expert_load is None else replace(stats, expert_load=expert_load)


    def _grammar_bitmask(self, scheduler_output: SchedulerOutput) -> GrammarBitmask | None:
        requests = self.scheduler.scheduled_requests(scheduler_output)
        return grammar_bitmask(scheduler_output, requests)


def grammar_bitmask(scheduler_output: SchedulerOutput, requests: list[Request]
                    ) -> GrammarBitmask | None:
    """The masks of this step's constrained requests (``requests``, the live ones scheduled) that
    sample (a partial prefill does not).

    Each matcher must have consumed exactly its request's output: the scheduler feeds it every
    sampled token, and preemption keeps the output, so a recomputed request resumes in step."""
    constrained = []
    for request in requests:
        if request.grammar is None:
            continue
        rid = request.request_id
        end = request.num_computed_tokens + scheduler_output.num_scheduled_tokens[rid]
        if request.samples_at(end):
            assert request.grammar.num_consumed == request.num_output_tokens, (
                f"{request} grammar is out of step: {request.grammar}")
            constrained.append((request.request_id, request.grammar))
    return build_grammar_bitmask(constrained)


def resolve_max_model_len(config: EngineConfig, source: ModelSource) -> int:
    model_len = source.arch.max_position_embeddings
    wanted = config.model.max_model_len
    if wanted is None:
        return model_len
    if wanted > model_len:
        raise ConfigError(f"max_model_len={wanted} is longer than the model's context of "
                          f"{model_len} tokens", param="max_model_len")
    return wanted
