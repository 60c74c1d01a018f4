"""Runs a model on N local ranks for the tensor-parallel tests: spawn, join a gloo group on
127.0.0.1, build this rank's shard, run a prompt (prefill + greedy decode steps through the paged
KV cache), and leave each rank's results in a file for the test process to compare."""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch

from tokenmill.distributed.parallel_state import ParallelContext
from tokenmill.layers.attention import AttentionMetadata, PrefillSpan
from tokenmill.layers.norm import RMSNorm
from tokenmill.worker.input_batch import InputBatchBuilder
from tokenmill.worker.kv_cache import KVCacheSpec, allocate_kv_cache

LOOPBACK = "127.0.0.1"
BLOCK_SIZE = 16


@dataclass
class RunSpec:
    model: str | None  # a safetensors folder, or None for the built-in GGUF model
    prompt_ids: list[int]
    num_decode_steps: int = 2
    quantizations: list[str] = field(default_factory=lambda: ["none"])
    allreduce: str = "shm"
    dtype: torch.dtype = torch.float32


def rendezvous(out_dir: Path | str) -> str:
    """Where the ranks meet: a file in the test's own directory, not a TCP port chosen ahead
    (another process could take a port between choosing and binding it). The ranks' own gloo
    connections bind ports the OS gives them, on loopback (``GLOO_SOCKET_IFNAME=lo``)."""
    return f"file://{Path(out_dir) / f'rendezvous-{uuid.uuid4().hex}'}"  # one per group


def load_model(spec: RunSpec, quantization: str, parallel: ParallelContext) -> torch.nn.Module:
    from tokenmill.models.llama import LlamaForCausalLM

    if spec.model is None:
        from tokenmill.loader.builtin import builtin_model_path
        from tokenmill.loader.gguf import (
            iter_gguf_tensors,
            open_gguf,
            read_arch_config,
            tensor_entries,
        )

        path = builtin_model_path()
        reader = open_gguf(path)
        arch = read_arch_config(reader, path)
        tensors = iter_gguf_tensors(tensor_entries(reader), arch, path)
    else:
        from tokenmill.loader.safetensors import iter_safetensors, read_hf_config

        arch = read_hf_config(Path(spec.model))
        tensors = iter_safetensors(Path(spec.model))
    from tokenmill.quant.registry import get_quant_method

    model = LlamaForCausalLM(arch, spec.dtype, "cpu", max_positions=256, parallel=parallel)
    with torch.inference_mode():
        model.load_weights(tensors, get_quant_method(quantization))
    return model.eval()


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of every weight this rank holds: the linear layers, the embedding, the norms."""
    total = sum(model.weight_report().values())
    for module in model.modules():
        if isinstance(module, RMSNorm):
            total += module.weight.numel() * module.weight.element_size()
    return total


@torch.inference_mode()
def greedy_run(model: torch.nn.Module, prompt_ids: list[int], num_decode_steps: int,
               world_size: int, dtype: torch.dtype = torch.float32) -> dict:
    """Prefill ``prompt_ids`` then ``num_decode_steps`` greedy decode steps through a paged KV
    cache (the metadata the runner builds); the logits of every step and the tokens chosen."""
    from tokenmill.layers.kernels import paged_attention_module

    arch = model.arch
    total = len(prompt_ids) + num_decode_steps
    num_blocks = -(-total // BLOCK_SIZE) + 1
    kv_caches = allocate_kv_cache(arch, KVCacheSpec(num_blocks, BLOCK_SIZE, 0), dtype,
                                  torch.device("cpu"), world_size)
    kernel = paged_attention_module()
    builder = InputBatchBuilder(BLOCK_SIZE, torch.device("cpu"), arch.sliding_window, kernel)
    blocks = torch.arange(1, num_blocks)  # block 0 left unused, as the block manager may do
    length = len(prompt_ids)
    meta = AttentionMetadata(
        slot_mapping=builder.slots(blocks, 0, length),
        prefills=[PrefillSpan(0, length, length, blocks[: -(-length // BLOCK_SIZE)], None)],
        decode_kernel=kernel, sliding_window=arch.sliding_window)
    hidden = model(torch.tensor(prompt_ids), torch.arange(length), meta, kv_caches)
    logits = [model.compute_logits(hidden[-1:])[0]]
    tokens = [int(logits[-1].argmax())]
    for step in range(num_decode_steps):
        position = length + step
        used = blocks[: -(-(position + 1) // BLOCK_SIZE)]
        meta = AttentionMetadata(
            slot_mapping=builder.slots(blocks, position, position + 1),
            decode=builder._decode_batch([0], [used], [position + 1]),
            decode_kernel=kernel, sliding_window=arch.sliding_window)
        hidden = model(torch.tensor([tokens[-1]]), torch.tensor([position]), meta, kv_caches)
        logits.append(model.compute_logits(hidden)[0])
        tokens.append(int(logits[-1].argmax()))
    return {"logits": torch.stack(logits), "tokens": tokens,
            "kv_heads": kv_caches[0].shape[3]}


def rank_main(rank: int, world_size: int, init_method: str, spec: RunSpec, out_dir: str) -> None:
    """One rank (a ``torch.multiprocessing.spawn`` target)."""
    from tokenmill.distributed.parallel_state import init_distributed

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    os.environ["MASTER_ADDR"] = LOOPBACK
    parallel = init_distributed(rank, world_size, init_method, "cpu", allreduce=spec.allreduce)
    results = {}
    try:
        for quantization in spec.quantizations:
            model = load_model(spec, quantization, parallel)
            run = greedy_run(model, spec.prompt_ids, spec.num_decode_steps, world_size, spec.dtype)
            run["weight_bytes"] = weight_bytes(model)
            run["report"] = model.weight_report()
            results[quantization] = run
            del model
        torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    finally:
        import torch.distributed as dist

        parallel.close()
        dist.destroy_process_group()


def run_parallel(spec: RunSpec, world_size: int, out_dir: Path) -> list[dict]:
    """Spawn ``world_size`` ranks; every rank's results, by rank."""
    import torch.multiprocessing as mp

    mp.spawn(rank_main, args=(world_size, rendezvous(out_dir), spec, str(out_dir)),
             nprocs=world_size, join=True)
    return [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


def run_single(spec: RunSpec) -> dict:
    """The same runs unsharded, in this process (TP=1)."""
    results = {}
    for quantization in spec.quantizations:
        model = load_model(spec, quantization, ParallelContext.single())
        run = greedy_run(model, spec.prompt_ids, spec.num_decode_steps, 1, spec.dtype)
        run["weight_bytes"] = weight_bytes(model)
        run["report"] = model.weight_report()
        results[quantization] = run
    return results
