"""Decode step time of the built-in model at TP=1 and TP=N on this machine, and the share spent in
the all-reduce (gloo or shared memory). Prints figures, asserts nothing.

Each rank runs 1 thread: TP=N uses N threads in all, TP=1 one (its native decode stack on and off:
with TP the layers run in Python, so "TP=1, Python layers" is the like-for-like baseline).

    python benchmarks/tp_decode_step.py [--world-size 3] [--steps 32] [--quantization auto]
"""

from __future__ import annotations

import argparse
import os
import socket
import time

import torch
import torch.multiprocessing as mp

from tokenmill.distributed.parallel_state import ParallelContext

LOOPBACK = "127.0.0.1"
BLOCK_SIZE = 16


def _decode(model: torch.nn.Module, prompt_len: int, steps: int, world_size: int
            ) -> tuple[float, int]:
    """Seconds per decode step (after a prefill of ``prompt_len`` tokens), and the last token."""
    from tokenmill.layers.attention import AttentionMetadata, PrefillSpan
    from tokenmill.layers.kernels import paged_attention_module
    from tokenmill.worker.input_batch import InputBatchBuilder
    from tokenmill.worker.kv_cache import KVCacheSpec, allocate_kv_cache

    arch = model.arch
    num_blocks = -(-(prompt_len + steps) // BLOCK_SIZE)
    kv = allocate_kv_cache(arch, KVCacheSpec(num_blocks, BLOCK_SIZE, 0), torch.float32,
                           torch.device("cpu"), world_size)
    kernel = paged_attention_module()
    builder = InputBatchBuilder(BLOCK_SIZE, torch.device("cpu"), arch.sliding_window, kernel)
    blocks = torch.arange(num_blocks)
    ids = torch.arange(100, 100 + prompt_len)
    meta = AttentionMetadata(builder.slots(blocks, 0, prompt_len),
                             [PrefillSpan(0, prompt_len, prompt_len,
                                          blocks[: -(-prompt_len // BLOCK_SIZE)], None)],
                             decode_kernel=kernel)
    hidden = model(ids, torch.arange(prompt_len), meta, kv)
    token = int(model.compute_logits(hidden[-1:]).argmax())
    start = time.perf_counter()
    for step in range(steps):
        pos = prompt_len + step
        used = blocks[: -(-(pos + 1) // BLOCK_SIZE)]
        meta = AttentionMetadata(builder.slots(blocks, pos, pos + 1),
                                 decode=builder._decode_batch([0], [used], [pos + 1]),
                                 decode_kernel=kernel)
        hidden = model(torch.tensor([token]), torch.tensor([pos]), meta, kv)
        token = int(model.compute_logits(hidden).argmax())
    return (time.perf_counter() - start) / steps, token


def _rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def _peak_rss() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _build(args: argparse.Namespace, parallel: ParallelContext) -> torch.nn.Module:
    from tokenmill.loader.model_source import open_model_source
    from tokenmill.models.registry import build_model

    return build_model(open_model_source(None), torch.float32, "cpu", max_positions=512,
                       quantization=args.quantization, parallel=parallel)


def _rank(rank: int, world_size: int, port: int, allreduce: str, args: argparse.Namespace,
          results: dict) -> None:
    import torch.distributed as dist

    from tokenmill.distributed.parallel_state import init_distributed

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    init_method = f"tcp://{LOOPBACK}:{port}"
    assert init_method.startswith("tcp://127.0.0.1:")
    parallel = init_distributed(rank, world_size, init_method, "cpu", allreduce=allreduce)
    model = _build(args, parallel)
    weights = sum(model.weight_report().values())
    spent = [0.0, 0]
    reduce = parallel.all_reduce

    def timed(tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = reduce(tensor)
        spent[0] += time.perf_counter() - start
        spent[1] += 1
        return out

    parallel.all_reduce = timed
    _decode(model, args.prompt_len, 4, world_size)  # warm-up
    spent[:] = [0.0, 0]
    per_step, token = _decode(model, args.prompt_len, args.steps, world_size)
    calls = spent[1] / (args.steps + 1)  # the prefill's all-reduces are counted too
    results[(allreduce, rank)] = (per_step, spent[0] / (args.steps + 1), calls, token)
    results[("memory", allreduce, rank)] = (weights, _rss(), _peak_rss())
    parallel.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=3, help="divides 9 heads: 3 or 9")
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--quantization", default="auto")
    args = parser.parse_args()
    from tokenmill.models import llama_decode_stack

    torch.set_num_threads(1)
    single = _build(args, ParallelContext.single())
    native, token = _decode(single, args.prompt_len, args.steps, 1)
    llama_decode_stack.set_enabled(False)
    python_layers, _ = _decode(single, args.prompt_len, args.steps, 1)
    llama_decode_stack.set_enabled(True)
    single_memory = (sum(single.weight_report().values()), _rss(), _peak_rss())
    del single
    manager = mp.Manager()
    results = manager.dict()
    for allreduce in ("gloo", "shm"):
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        mp.spawn(_rank, args=(args.world_size, port, allreduce, args, results),
                 nprocs=args.world_size)
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; affinity {sorted(os.sched_getaffinity(0))}, load average "
          f"{os.getloadavg()[0]:.2f}; built-in model, quantization={args.quantization}, "
          f"float32 activations, 1 thread per rank, {args.steps} decode steps after "
          f"{args.prompt_len} prompt tokens")
    print(f"TP=1 native decode stack: {native * 1e3:.2f} ms/step")
    print(f"TP=1 Python layers:       {python_layers * 1e3:.2f} ms/step")
    mib = 2**20
    print(f"TP=1 weights {single_memory[0] / mib:.1f} MiB, RSS {single_memory[1] / mib:.0f} MiB, "
          f"peak RSS {single_memory[2] / mib:.0f} MiB (this process)")
    for rank in range(args.world_size):
        weights, rss, peak = results[("memory", "shm", rank)]
        print(f"TP={args.world_size} rank {rank}: weights {weights / mib:.1f} MiB, RSS after the "
              f"run {rss / mib:.0f} MiB, peak RSS {peak / mib:.0f} MiB")
    for allreduce in ("gloo", "shm"):
        per_step, in_reduce, calls, last = results[(allreduce, 0)]
        print(f"TP={args.world_size} {allreduce:4}: {per_step * 1e3:.2f} ms/step, all-reduce "
              f"{in_reduce * 1e3:.2f} ms/step ({calls:.0f} calls, "
              f"{100 * in_reduce / per_step:.0f} % of the step); same last token as TP=1: "
              f"{last == token}")


if __name__ == "__main__":
    main()
