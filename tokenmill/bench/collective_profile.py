"""Time the engine's own TP collectives on this machine: 2 spawned ranks on loopback.

``tokenmill profile`` uses 2 ranks; ``world_size`` times more (3 ranks on a 2-core VM, busy with
other work: ~0.2 ms per all-reduce in this tight loop against ~0.05-0.1 ms with 2, far less than
what a real oversubscribed step waits, see docs/measuring.md).

Each rank joins a process group as a TP worker does (``init_distributed``: gloo, with the
shared-memory all-reduce on CPU unless ``TOKENMILL_TP_ALLREDUCE=gloo``) and times
``ParallelContext.all_reduce`` of ``[rows, hidden]`` and ``ParallelContext.all_gather_last_dim`` of
``[rows, vocab / 2]`` (one rank's slice of the logits) at a few row counts, one torch thread per
rank. The figure per call is the best of a few repeats of ``iterations`` back-to-back calls (others'
work on the same cores only ever makes a call slower). Rank 0 reports; ``fit_link`` turns the
points into the latency and bandwidth the planner uses.
"""

from __future__ import annotations

import multiprocessing as mp
import statistics
import tempfile
import time
from typing import Any

from tokenmill.bench.communication import (
    Interconnect,
    all_gather_bus_bytes,
    all_reduce_bus_bytes,
    fit_link,
)

COLLECTIVE_ROWS = (1, 4, 16)
WORLD_SIZE = 2
_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _rank_main(rank: int, world_size: int, init_method: str, hidden: int, vocab: int, dtype: str,
               rows: tuple[int, ...], iterations: int, repeats: int, results: Any) -> None:
    import torch
    import torch.distributed as dist

    from tokenmill.distributed.parallel_state import init_distributed

    torch.set_num_threads(1)
    context = init_distributed(rank, world_size, init_method, "cpu", timeout_s=60)
    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    measured: dict[str, list[tuple[float, float]]] = {"all_reduce": [], "all_gather": []}
    try:
        for m in rows:
            for name, points in measured.items():
                if name == "all_reduce":
                    x = torch.zeros(m, hidden, dtype=torch_dtype)  # sums stay finite
                    op = context.all_reduce
                    nbytes = all_reduce_bus_bytes(x.numel() * x.element_size(), world_size)
                else:
                    x = torch.ones(m, -(-vocab // world_size), dtype=torch_dtype)
                    op = context.all_gather_last_dim
                    nbytes = all_gather_bus_bytes(world_size * x.numel() * x.element_size(),
                                                  world_size)
                for _ in range(3):  # first calls pay for buffers and connections
                    op(x)
                best = float("inf")
                for _ in range(repeats):
                    dist.barrier()
                    start = time.perf_counter()
                    for _ in range(iterations):
                        op(x)
                    best = min(best, (time.perf_counter() - start) / iterations)
                points.append((float(nbytes), best))
        if rank == 0:
            results.put(measured)
    finally:
        context.close()
        dist.destroy_process_group()


def measure_collectives(hidden: int, vocab: int, dtype: str, *, world_size: int = WORLD_SIZE,
                        rows: tuple[int, ...] = COLLECTIVE_ROWS, iterations: int = 50,
                        repeats: int = 3, timeout_s: float = 120.0) -> Interconnect:
    """All-reduce and all-gather cost between ``world_size`` ranks here, fitted as latency +
    bus bytes / bandwidth (at 2 ranks an all-reduce's bus bytes are the message's, an
    all-gather's half its result)."""
    from tokenmill.distributed.parallel_state import file_rendezvous

    ctx = mp.get_context("spawn")
    results = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="tokenmill-profile-tp-") as rendezvous:
        init_method = file_rendezvous(rendezvous)
        procs = [ctx.Process(target=_rank_main,
                             args=(rank, world_size, init_method, hidden, vocab, dtype, rows,
                                   iterations, repeats, results),
                             daemon=True)
                 for rank in range(world_size)]
        for proc in procs:
            proc.start()
        try:
            measured = results.get(timeout=timeout_s)
        except Exception as exc:  # queue.Empty: a rank failed or hung
            codes = [proc.exitcode for proc in procs]
            raise RuntimeError(f"the all-reduce measurement got no result (rank exit codes "
                               f"{codes})") from exc
        finally:
            for proc in procs:
                proc.join(30)
                if proc.is_alive():
                    proc.kill()
    reduce, gather = measured["all_reduce"], measured["all_gather"]
    per_call_us = statistics.median(s for _, s in reduce) * 1e6
    return Interconnect(
        all_reduce=fit_link(reduce), all_gather=fit_link(gather),
        source=f"measured by `tokenmill profile`: {world_size} ranks on loopback, "
               f"{dtype}, rows {', '.join(map(str, rows))} (all-reduce ~{per_call_us:.0f} µs "
               "per call)",
        world_size=world_size, dtype=dtype,
        samples={"all_reduce": [list(s) for s in reduce],
                 "all_gather": [list(s) for s in gather]})
