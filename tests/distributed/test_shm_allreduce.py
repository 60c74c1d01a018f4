"""The shared-memory all-reduce gives gloo's sums (the same bits with 2 ranks, where a + b has one
order), the same bits on every rank, for any size (chunks bigger than a slot) and dtype; a rank
that never arrives makes the others fail with its rank named, not hang."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tp_harness import rendezvous

from tokenmill.distributed.shm_allreduce import SLOT_BYTES, SharedMemoryAllReduce


def _rank(rank: int, world_size: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    os.environ["GLOO_SOCKET_IFNAME"] = "lo"
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world_size)
    shm = SharedMemoryAllReduce.create(rank, world_size)
    assert shm is not None
    assert not [f for f in os.listdir("/dev/shm") if f.startswith(f"tokenmill-tp-{os.getppid()}")]
    generator = torch.Generator().manual_seed(rank)
    big_rows = SLOT_BYTES // (4 * 576) * 2 + 3  # float32: three chunks
    cases = [(1, 576, torch.float32), (16, 576, torch.float32), (big_rows, 576, torch.float32),
             (7, 64, torch.bfloat16)]
    results = []
    for rows, cols, dtype in cases:
        x = torch.randn(rows, cols, generator=generator).to(dtype)
        expected = x.clone()
        dist.all_reduce(expected)
        got = shm.all_reduce(x.clone())
        if world_size == 2:
            assert torch.equal(got, expected), (rows, cols, dtype)
        else:  # three addends: the order may differ from gloo's by an ulp
            # bfloat16 keeps 8 bits: sums may round differently by one unit in the last place
            tol = 2**-7 if dtype == torch.bfloat16 else 1e-6
            assert torch.allclose(got.float(), expected.float(), rtol=tol, atol=tol), (
                rows, cols, dtype, (got.float() - expected.float()).abs().max().item())
        results.append(got)
    # a non-contiguous tensor is reduced in place too
    x = torch.arange(12.0).view(3, 4).t()
    shm.all_reduce(x)
    assert torch.equal(x, torch.arange(12.0).view(3, 4).t() * world_size)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # the other ranks stop taking part: rank 0 must give up within its timeout, naming them
    if rank == 0:
        shm.timeout_s = 0.5
        try:
            shm.all_reduce(torch.ones(4))
        except RuntimeError as exc:
            assert f"rank(s) {list(range(1, world_size))}" in str(exc), str(exc)
        else:
            raise AssertionError("the all-reduce did not notice the missing rank")
    dist.barrier()
    shm.close()
    dist.destroy_process_group()


def test_shm_allreduce_equals_gloo_on_two_ranks(tmp_path):
    mp.spawn(_rank, args=(2, rendezvous(tmp_path), str(tmp_path)), nprocs=2, join=True)
    first, second = (torch.load(tmp_path / f"rank{r}.pt") for r in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_shm_allreduce_matches_gloo_on_three_ranks_and_ranks_agree(tmp_path):
    mp.spawn(_rank, args=(3, rendezvous(tmp_path), str(tmp_path)), nprocs=3, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt") for r in range(3)]
    for other in results[1:]:  # summed in rank order on every rank: identical bits
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
