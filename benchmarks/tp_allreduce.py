"""The cost of one tensor-parallel all-reduce between local ranks: gloo (loopback TCP) vs the
shared-memory all-reduce (tokenmill.distributed.shm_allreduce). Prints figures, asserts nothing.

A decode step of a Llama-family model does two all-reduces per layer (after o_proj and after
down_proj), of ``[rows, hidden]``: the built-in model (30 layers, hidden 576) does 60 a step.

    python benchmarks/tp_allreduce.py [--world-size 2] [--iters 500] [--hidden 576]
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

LOOPBACK = "127.0.0.1"
ROWS = (1, 16, 128, 512)  # one decode token, a batch of 16, prefill chunks


def _rank(rank: int, world_size: int, port: int, args: argparse.Namespace, results: dict) -> None:
    from tokenmill.distributed.shm_allreduce import SharedMemoryAllReduce

    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    init_method = f"tcp://{LOOPBACK}:{port}"
    assert init_method.startswith("tcp://127.0.0.1:")
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    shm = SharedMemoryAllReduce.create(rank, world_size)
    rows_list = ROWS
    for rows in rows_list:
        x = torch.randn(rows, args.hidden)
        for name, reduce in (("gloo", dist.all_reduce), ("shm", shm.all_reduce)):
            times = []
            for _ in range(min(50, args.iters)):  # warm-up
                reduce(x)
            dist.barrier()
            for _ in range(args.iters):
                start = time.perf_counter()
                reduce(x)
                times.append(time.perf_counter() - start)
            if rank == 0:
                results[(name, rows)] = (statistics.median(times), statistics.mean(times))
    shm.close()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--iters", type=int, default=500)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--layers", type=int, default=30, help="for the per-step estimate")
    args = parser.parse_args()
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(_rank, args=(args.world_size, port, args, results), nprocs=args.world_size)
    with open("/proc/cpuinfo") as cpuinfo:
        cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                    if line.startswith("model name")), platform.processor())
    print(f"CPU: {cpu}; {os.cpu_count()} cores visible, affinity "
          f"{sorted(os.sched_getaffinity(0))}, load average {os.getloadavg()[0]:.2f}")
    print(f"world size {args.world_size}, hidden {args.hidden}, {args.iters} calls each, "
          "float32, 1 thread per rank")
    print(f"{'rows':>5} {'gloo p50 us':>12} {'gloo mean':>10} {'shm p50 us':>11} {'shm mean':>9} "
          f"{'x':>6}")
    for rows in ROWS:
        gloo, shm = results[("gloo", rows)], results[("shm", rows)]
        print(f"{rows:>5} {gloo[0] * 1e6:>12.1f} {gloo[1] * 1e6:>10.1f} {shm[0] * 1e6:>11.1f} "
              f"{shm[1] * 1e6:>9.1f} {gloo[0] / shm[0]:>6.1f}")
    per_step = 2 * args.layers
    print(f"a decode step ({per_step} all-reduces of 1 row): gloo "
          f"{per_step * results[('gloo', 1)][0] * 1e3:.2f} ms, shm "
          f"{per_step * results[('shm', 1)][0] * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
