"""Runs one engine step on the device: apply the step's diffs to its request states, build inputs,
forward, logits of sampling rows, sample."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import torch

from tokenmill.config import EngineConfig
from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.engine.scheduler_output import RunnerOutput, SchedulerOutput
from tokenmill.errors import ConfigError
from tokenmill.layers.kernels import paged_attention_module
from tokenmill.layers.kernels.fused_ops import fused_ops_module
from tokenmill.layers.sampler import Sampler
from tokenmill.loader.model_source import ModelSource
from tokenmill.malloc_trim import release_free_heap
from tokenmill.models.moe_stats import ExpertLoad
from tokenmill.models.registry import build_model
from tokenmill.worker.input_batch import InputBatchBuilder
from tokenmill.worker.kv_cache import KVCacheSpec, allocate_kv_cache, copy_blocks, plan_kv_cache
from tokenmill.worker.prompt_logprobs import score_prompt_rows
from tokenmill.worker.request_state import RequestStates

logger = logging.getLogger(__name__)


class ModelRunner:
    def __init__(self, config: EngineConfig, source: ModelSource, max_model_len: int,
                 parallel: ParallelContext | None = None):
        """``parallel``: this rank's place in a tensor-parallel group (None: the only rank). The
        model then holds this rank's shard of every layer and the KV cache its KV heads."""
        self.config = config
        self.parallel = parallel or ParallelContext.single()
        self.device = torch.device(config.model.device)
        self.dtype = getattr(torch, config.model.resolved_dtype())
        self.model = build_model(source, self.dtype, self.device, max_positions=max_model_len,
                                 quantization=config.model.quantization,
                                 quantization_group_size=config.model.quantization_group_size,
                                 parallel=self.parallel if self.parallel.is_parallel else None)
        ranks = self.parallel.world_size
        self.kv_spec: KVCacheSpec = agree_on_block_count(
            plan_kv_cache(source.arch, config.cache, self.dtype, self.device, ranks),
            self.parallel)
        self.kv_caches = allocate_kv_cache(source.arch, self.kv_spec, self.dtype, self.device,
                                           ranks)
        self.inputs = InputBatchBuilder(config.cache.block_size, self.device,
                                        source.arch.sliding_window, self._decode_kernel())
        self.sampler = Sampler(self.device, seed=config.model.seed)
        self.requests = RequestStates()
        """Its own copy of every request it holds (scheduler_output.py: sent once, then diffs)."""
        if self.device.type == "cpu":
            # Built now (or found in the build cache), not on the first request: a cold build
            # takes ~25 s, which would otherwise land in that request's time to first token.
            fused_ops_module()
            release_free_heap()  # what loading freed stays resident otherwise

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

    def weight_bytes(self) -> int:
        """Bytes of weights this rank holds (its shards under tensor parallelism)."""
        return sum(self.model.weight_report().values())

    def describe_weights(self) -> str:
        """E.g. "gguf:Q4_1 80 MiB + gguf:Q8_0 30 MiB (kernel avx512_vnni)": for the banner."""
        report = self.model.weight_report()
        parts = " + ".join(f"{kind} {size / 2**20:.0f} MiB"
                           for kind, size in sorted(report.items(), key=lambda kv: -kv[1]))
        if any(kind.startswith(("gguf:", "int", "gptq", "awq")) for kind in report):
            from tokenmill.layers.kernels.quant_matmul import kernel_isa

            parts += f" (quantized kernel: {kernel_isa()})"
        return parts

    def expert_load(self) -> ExpertLoad | None:
        """An MoE model's routed-token counters (plain data), None for a dense model."""
        snapshot = getattr(self.model, "expert_load", None)
        return None if snapshot is None else snapshot()

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> RunnerOutput:
        self.requests.update_from(scheduler_output)
        if scheduler_output.is_empty:
            return RunnerOutput()
        copy_blocks(self.kv_caches, scheduler_output.block_copies)
        inputs = self.inputs.build(scheduler_output, self.requests)
        hidden = self.model(inputs.input_ids, inputs.positions, inputs.attention, self.kv_caches)
        output = RunnerOutput()
        for wanted in inputs.prompt_rows:
            if wanted.num_top is None:
                rows = hidden[wanted.rows.start: wanted.rows.stop].float()
                output.pooled[wanted.request_id] = rows.sum(dim=0).tolist()
            else:
                output.prompt_logprobs[wanted.request_id] = score_prompt_rows(
                    self.model, hidden, wanted.rows, wanted.next_token_ids, wanted.num_top)
                self.requests[wanted.request_id].num_prompt_logprobs += len(wanted.rows)
        if not inputs.sample_requests:
            return output
        logits = self.model.compute_logits(hidden[inputs.sample_rows])
        tokens, logprobs = self.sampler(logits, inputs.sampling)
        ids = [r.request_id for r in inputs.sample_requests]
        output.sampled_token_ids = dict(zip(ids, tokens))
        output.logprobs = {rid: lp for rid, lp in zip(ids, logprobs) if lp is not None} or None
        return output


def agree_on_block_count(spec: KVCacheSpec, parallel: ParallelContext) -> KVCacheSpec:
    """Every rank of a group caches the same blocks (the scheduler hands out one set of block
    ids), so all take the smallest count any of them planned: their free memory, measured a
    moment apart, differs."""
    if not parallel.is_parallel:
        return spec
    import torch.distributed as dist

    count = torch.tensor([spec.num_blocks], dtype=torch.int64, device=parallel.device)
    dist.all_reduce(count, op=dist.ReduceOp.MIN, group=parallel.group)
    return dataclasses.replace(spec, num_blocks=int(count.item()))
