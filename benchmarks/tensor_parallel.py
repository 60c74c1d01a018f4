"""Tensor parallelism on this machine: prefill and decode tokens/s at TP=1, 2, 3, the share of the
step spent in all-reduce, weights and peak memory per rank, for the built-in model and for a small
random MoE next to a dense model of the same active size. Prints figures, asserts nothing.

Every rank runs 1 torch thread (TP=N uses N threads in all); TP=1 is measured with 1 thread and
with as many threads as the largest TP, so "TP=3 vs TP=1" can be read at equal threads too. The
ranks are spawned here and join a gloo group on 127.0.0.1; the all-reduce is the engine's default
(shared memory on a CPU). A TP degree a model cannot be cut into is printed as refused.

    python benchmarks/tensor_parallel.py [--models builtin,moe,dense] [--world-sizes 1,2,3]
        [--prompt-len 256] [--steps 32]

The MoE (Qwen3-MoE layout: 8 experts, top-2, expert size 384) and its dense twin (a Qwen3 MLP of
768 = 2 x 384: the same active parameters per token) are random, made with transformers in a
temporary folder; only their speed matters.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import tempfile
import time
from pathlib import Path

import torch
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
BLOCK_SIZE = 16
SMALL = {"hidden_size": 384, "num_hidden_layers": 4, "num_attention_heads": 6,
         "num_key_value_heads": 6, "head_dim": 64, "vocab_size": 49152,  # the built-in tokenizer's
         "max_position_embeddings": 1024, "tie_word_embeddings": True}
EXPERTS = {"num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 384,
           "norm_topk_prob": True}


def make_small_models(folder: Path) -> dict[str, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer, Qwen3Config, Qwen3MoeConfig

    from tokenmill.loader.model_source import open_model_source

    builtin = open_model_source(None).path
    tokenizer = AutoTokenizer.from_pretrained(builtin.parent, gguf_file=builtin.name)
    torch.manual_seed(0)
    paths = {}
    active = EXPERTS["num_experts_per_tok"] * EXPERTS["moe_intermediate_size"]
    for name, config in (("moe", Qwen3MoeConfig(**SMALL, **EXPERTS, intermediate_size=active)),
                         ("dense", Qwen3Config(**SMALL, intermediate_size=active))):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.save_pretrained(folder / name)
        tokenizer.save_pretrained(folder / name)
        paths[name] = str(folder / name)
    return paths


def build(model_path: str | None, parallel) -> torch.nn.Module:
    from tokenmill.loader.model_source import open_model_source
    from tokenmill.models.registry import build_model

    return build_model(open_model_source(model_path), torch.float32, "cpu", max_positions=1024,
                       parallel=parallel if parallel.is_parallel else None)


def run_model(model: torch.nn.Module, prompt_len: int, steps: int, world_size: int
              ) -> tuple[float, float]:
    """(seconds for a prefill of ``prompt_len`` tokens, seconds per decode step after it)."""
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
    ids = torch.arange(100, 100 + prompt_len) % arch.vocab_size
    meta = AttentionMetadata(builder.slots(blocks, 0, prompt_len),
                             [PrefillSpan(0, prompt_len, prompt_len,
                                          blocks[: -(-prompt_len // BLOCK_SIZE)], None)],
                             decode_kernel=kernel)
    start = time.perf_counter()
    hidden = model(ids, torch.arange(prompt_len), meta, kv)
    token = int(model.compute_logits(hidden[-1:]).argmax())
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    for step in range(steps):
        pos = prompt_len + step
        used = blocks[: -(-(pos + 1) // BLOCK_SIZE)]
        meta = AttentionMetadata(builder.slots(blocks, pos, pos + 1),
                                 decode=builder._decode_batch([0], [used], [pos + 1]),
                                 decode_kernel=kernel)
        hidden = model(torch.tensor([token]), torch.tensor([pos]), meta, kv)
        token = int(model.compute_logits(hidden).argmax())
    return prefill, (time.perf_counter() - start) / max(1, steps)


def measure(model: torch.nn.Module, args: argparse.Namespace, world_size: int,
            spent: list[float]) -> dict:
    run_model(model, 32, 4, world_size)  # warm-up: kernels, oneDNN primitives
    spent[0] = 0.0
    prefill, _ = run_model(model, args.prompt_len, 0, world_size)
    prefill_reduce = spent[0]
    spent[0] = 0.0
    _, per_step = run_model(model, 32, args.steps, world_size)
    return {"prefill_s": prefill, "prefill_reduce_s": prefill_reduce, "step_s": per_step,
            # the decode run's own 32-token prefill is in the count: subtract its share
            "step_reduce_s": max(0.0, spent[0] - prefill_reduce * 32 / args.prompt_len)
            / args.steps,
            "weights": sum(model.weight_report().values()),
            "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def rank_main(rank: int, world_size: int, port: int, model_path: str | None,
              args: argparse.Namespace, results: dict) -> None:
    import torch.distributed as dist

    from tokenmill.distributed.parallel_state import init_distributed

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    init_method = f"tcp://{LOOPBACK}:{port}"
    assert init_method.startswith("tcp://127.0.0.1:")
    parallel = init_distributed(rank, world_size, init_method, "cpu")
    model = build(model_path, parallel)
    spent = [0.0]
    reduce = parallel.all_reduce

    def timed(tensor: torch.Tensor) -> torch.Tensor:
        start = time.perf_counter()
        out = reduce(tensor)
        spent[0] += time.perf_counter() - start
        return out

    parallel.all_reduce = timed
    results[rank] = measure(model, args, world_size, spent)
    parallel.close()
    dist.destroy_process_group()


def single_main(_index: int, model_path: str | None, threads: int, args: argparse.Namespace,
                results: dict) -> None:
    from tokenmill.distributed.parallel_state import ParallelContext

    torch.set_num_threads(threads)
    results[0] = measure(build(model_path, ParallelContext.single()), args, 1, [0.0])


def run(model_path: str | None, world_size: int, threads: int, args: argparse.Namespace
        ) -> list[dict]:
    """Each configuration in fresh processes, so peak RSS is its own."""
    results = mp.Manager().dict()
    if world_size == 1:
        mp.spawn(single_main, args=(model_path, threads, args, results), nprocs=1)
    else:
        with socket.socket() as sock:
            sock.bind((LOOPBACK, 0))
            port = sock.getsockname()[1]
        mp.spawn(rank_main, args=(world_size, port, model_path, args, results),
                 nprocs=world_size)
    return [results[rank] for rank in range(world_size)]


def refusal(model_path: str | None, world_size: int) -> str | None:
    from tokenmill.distributed.sharding import check_model_split
    from tokenmill.errors import ConfigError
    from tokenmill.loader.model_source import open_model_source

    try:
        check_model_split(open_model_source(model_path).arch, world_size)
    except ConfigError as error:
        return error.message
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="builtin,moe,dense")
    parser.add_argument("--world-sizes", default="1,2,3")
    parser.add_argument("--prompt-len", type=int, default=256)
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    sizes = [int(n) for n in args.world_sizes.split(",")]
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), "?")
    print(f"CPU: {cpu}; {len(os.sched_getaffinity(0))} usable cores, load average "
          f"{os.getloadavg()[0]:.2f}; float32 activations, 1 thread per rank, prefill of "
          f"{args.prompt_len} tokens, {args.steps} decode steps (batch 1) after 32 tokens")
    header = (f"{'model':8} {'TP':>3} {'thr':>3} {'prefill tok/s':>13} {'in all-reduce':>13} "
              f"{'decode tok/s':>12} {'ms/step':>8} {'in all-reduce':>13} "
              f"{'weights/rank':>12} {'peak RSS/rank':>13}")
    with tempfile.TemporaryDirectory() as folder:
        small = make_small_models(Path(folder)) if {"moe", "dense"} & set(
            args.models.split(",")) else {}
        paths = {"builtin": None, **small}
        print(header)
        step_ms: dict[tuple[str, int], float] = {}
        for name in args.models.split(","):
            configs = [(n, 1) for n in sizes] + ([(1, max(sizes))] if max(sizes) > 1 else [])
            for world_size, threads in configs:
                refused = refusal(paths[name], world_size)
                if refused:
                    print(f"{name:8} {world_size:>3}  refused: {refused}")
                    continue
                ranks = run(paths[name], world_size, threads, args)
                r0 = ranks[0]
                mib = 2**20
                step_ms[(name, world_size if threads == 1 else -threads)] = r0["step_s"] * 1e3
                print(f"{name:8} {world_size:>3} {threads * world_size:>3} "
                      f"{args.prompt_len / r0['prefill_s']:>13.0f} "
                      f"{100 * r0['prefill_reduce_s'] / r0['prefill_s']:>12.0f}% "
                      f"{1 / r0['step_s']:>12.1f} {r0['step_s'] * 1e3:>8.2f} "
                      f"{100 * r0['step_reduce_s'] / r0['step_s']:>12.0f}% "
                      f"{max(r['weights'] for r in ranks) / mib:>10.1f} M "
                      f"{max(r['peak_rss'] for r in ranks) / mib:>11.0f} M")
        for world_size in sizes:
            moe, dense = step_ms.get(("moe", world_size)), step_ms.get(("dense", world_size))
            if moe and dense:
                print(f"TP={world_size}: MoE decode step {moe:.2f} ms vs dense of the same "
                      f"active size {dense:.2f} ms ({moe / dense:.2f}x; the MoE holds "
                      f"{EXPERTS['num_experts'] // EXPERTS['num_experts_per_tok']}x the MLP "
                      "weights)")


if __name__ == "__main__":
    main()
