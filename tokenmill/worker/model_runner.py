"""Runs one engine step on the device: build inputs, forward, logits of sampling rows, sample."""

from __future__ import annotations

import logging
from typing import Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.errors import ConfigError
from tokenmill.layers.kernels import paged_attention_module
from tokenmill.layers.sampler import Sampler
from tokenmill.loader.model_source import ModelSource
from tokenmill.models.registry import build_model
from tokenmill.worker.input_batch import InputBatchBuilder
from tokenmill.worker.kv_cache import KVCacheSpec, allocate_kv_cache, plan_kv_cache

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int):
        self.config = config
        self.device = torch.device(config.model.device)
        self.dtype = getattr(torch, config.model.dtype)
        self.model = build_model(source, self.dtype, self.device, max_positions=max_model_len)
        self.kv_spec: KVCacheSpec = plan_kv_cache(source.arch, config.cache, self.dtype,
                                                  self.device)
        self.kv_caches = allocate_kv_cache(source.arch, self.kv_spec, self.dtype, self.device)
        self.inputs = InputBatchBuilder(config.cache.block_size, self.device,
                                        source.arch.sliding_window, self._decode_kernel())
        self.sampler = Sampler(self.device, seed=config.model.seed)

    def _decode_kernel(self) -> Any:
        """The native paged-attention kernel when the config and the device allow it."""
        backend = self.config.model.attention_backend
        if backend == "torch" or self.device.type != "cpu":
            return None
        module = paged_attention_module()
        if module is None and backend == "native":
            raise ConfigError("attention_backend='native' but the kernel could not be built "
                              "(see the warning above)", param="attention_backend")
        return module

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        if scheduler_output.is_empty:
            return RunnerOutput()
        inputs = self.inputs.build(scheduler_output)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attention, self.kv_caches)
        if not inputs.sample_requests:
            return RunnerOutput()
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        tokens, logprobs = self.sampler(logits, inputs.sampling)
        ids = [r.request_id for r in inputs.sample_requests]
        return RunnerOutput(
            sampled_token_ids=dict(zip(ids, tokens)),
            logprobs={rid: lp for rid, lp in zip(ids, logprobs) if lp is not None} or None,
        )
