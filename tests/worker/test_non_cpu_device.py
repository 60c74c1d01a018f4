"""The code paths a `--device` other than cpu takes, built on PyTorch's meta device.

This machine has no GPU, but a meta tensor has a device, a shape and a dtype and no data, and
every op on it runs PyTorch's shape logic: so the model, its KV cache and one step's inputs can be
built off the CPU and a forward pass checked for shapes. That exercises what differs from the CPU
path (no native kernels, no packed quantized weights, no decode stack, the quantized embedding and
each tensor the input builder makes placed on the model's device) without the numbers a real
accelerator would give. Sampling needs a device random generator, which meta does not have.
"""

from __future__ import annotations

import pytest
import torch

from tokenmill.config import CacheConfig, SchedulerConfig
from tokenmill.engine.input_processor import InputProcessor
from tokenmill.engine.scheduler import Scheduler
from tokenmill.engine.scheduler_output import RunnerOutput
from tokenmill.models.registry import build_model
from tokenmill.sampling_params import SamplingParams
from tokenmill.worker.input_batch import InputBatchBuilder
from tokenmill.worker.kv_cache import allocate_kv_cache, plan_kv_cache
from tokenmill.worker.request_state import RequestStates

META = torch.device("meta")


@pytest.mark.parametrize("quantization", ["auto"])
def test_model_kv_cache_and_step_inputs_build_off_the_cpu(builtin_source, quantization):
    """The default ``auto`` keeps the file's Q4_1/Q8_0 blocks, which off the CPU are moved to the
    device and dequantized per call (the embedding table too); a dense model takes the same
    paths with plain tensors."""
    arch = builtin_source.arch
    model = build_model(builtin_source, torch.bfloat16, META, max_positions=256,
                        quantization=quantization)
    assert {p.device for p in model.parameters()} == {META}
    assert model.decode_stack is None  # the native decode path is CPU-only
    cache = CacheConfig(block_size=16, kv_cache_memory=2**22)
    spec = plan_kv_cache(arch, cache, torch.bfloat16, META)
    kv_caches = allocate_kv_cache(arch, spec, torch.bfloat16, META)
    assert {kv.device for kv in kv_caches} == {META} and len(kv_caches) == arch.num_hidden_layers

    # two requests under a 16-token budget: r0's whole 9-token prompt and 7 of r1's 12, then
    # r0 decodes while r1 finishes its prompt (a mixed step)
    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=16), cache, spec.num_blocks, 256)
    processor = InputProcessor(builtin_source.tokenizer, arch.vocab_size)
    ids = builtin_source.tokenizer.encode("Hello there, how are you doing today? I am fine")
    for index, (prompt, params) in enumerate([
            (ids[:9], SamplingParams(max_tokens=4, temperature=0)),
            (ids[:12], SamplingParams(max_tokens=4, temperature=0.8, top_k=5, seed=1))]):
        [request] = processor.make_requests(f"r{index}", prompt, params, None, None)
        scheduler.add_request(request)
    states = RequestStates()
    builder = InputBatchBuilder(cache.block_size, META, arch.sliding_window, None)
    step = scheduler.schedule()
    assert step.num_scheduled_tokens == {"r0#0": 9, "r1#0": 7}  # the budget cuts r1's prompt
    states.update_from(step)
    inputs = builder.build(step, states)
    assert inputs.input_ids.device == META and inputs.input_ids.shape == (16,)
    assert inputs.positions.device == META
    assert inputs.attention.slot_mapping.device == META
    assert inputs.sample_rows.device == META and inputs.sample_rows.shape == (1,)  # r0 only
    _forward_shapes(model, inputs, kv_caches, num_rows=16, num_sampled=1)

    # the runner's sampled token, written by hand: sampling is what meta cannot do
    scheduler.update_from_output(step, RunnerOutput(sampled_token_ids={"r0#0": 42}))
    step = scheduler.schedule()
    assert step.num_scheduled_tokens == {"r0#0": 1, "r1#0": 5}
    states.update_from(step)
    inputs = builder.build(step, states)
    assert inputs.attention.slot_mapping.device == META
    _forward_shapes(model, inputs, kv_caches, num_rows=6, num_sampled=2)


def _forward_shapes(model, inputs, kv_caches, *, num_rows: int, num_sampled: int) -> None:
    with torch.inference_mode():
        hidden = model(inputs.input_ids, inputs.positions, inputs.attention, kv_caches)
        logits = model.compute_logits(hidden[inputs.sample_rows])
    assert hidden.device == META and hidden.dtype == torch.bfloat16
    assert hidden.shape == (num_rows, model.embed_tokens.hidden_size)
    assert logits.shape == (num_sampled, model.embed_tokens.vocab_size)
