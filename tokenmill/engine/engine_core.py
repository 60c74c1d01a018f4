"""The engine core: ``step() = schedule() -> execute() -> update_from_output()``.

Owns the scheduler (token ids, KV blocks) and the model runner (the device). Knows nothing about
text: the frontend (``llm.py`` / ``async_llm.py``) tokenizes, detokenizes and matches stop strings.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.request import Request, RequestStatus
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import EngineCoreOutput, SchedulerOutput
from tokenmill.engine.stats import SchedulerStats
from tokenmill.errors import ConfigError
from tokenmill.loader.model_source import ModelSource, open_model_source
from tokenmill.structured_output.bitmask import GrammarBitmask, build_grammar_bitmask
from tokenmill.worker.model_runner import ModelRunner

logger = logging.getLogger(__name__)


class EngineCore:
    def __init__(self, config: EngineConfig, source: ModelSource | None = None):
        torch.set_num_threads(config.resolved_num_threads())
        started = time.perf_counter()
        self.config = config
        self.source = source or open_model_source(config.model.model)
        self.max_model_len = resolve_max_model_len(config, self.source)
        self.runner = ModelRunner(config, self.source, self.max_model_len)
        self.scheduler = Scheduler(config.scheduler, config.cache, self.runner.kv_spec.num_blocks,
                                   self.max_model_len)
        self.load_seconds = time.perf_counter() - started
        logger.info("loaded %s in %.1fs; %s", self.source.path, self.load_seconds,
                    self.runner.kv_spec.describe(self.max_model_len))

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
        scheduler_output.grammar_bitmask = grammar_bitmask(scheduler_output)
        runner_output = self.runner.execute(scheduler_output)
        return self.scheduler.update_from_output(scheduler_output, runner_output)

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def get_stats(self) -> SchedulerStats:
        stats = self.scheduler.get_stats()
        expert_load = self.runner.expert_load()
        return stats if expert_load is None else replace(stats, expert_load=expert_load)


def grammar_bitmask(scheduler_output: SchedulerOutput) -> GrammarBitmask | None:
    """The masks of this step's constrained requests that sample (a partial prefill does not).

    Each matcher must have consumed exactly its request's output: the scheduler feeds it every
    sampled token, and preemption keeps the output, so a recomputed request resumes in step."""
    constrained = []
    for request in scheduler_output.scheduled_requests:
        if request.grammar is None:
            continue
        rid = request.request_id
        end = scheduler_output.num_computed_tokens[rid] + scheduler_output.num_scheduled_tokens[rid]
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
