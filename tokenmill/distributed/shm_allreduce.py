"""An all-reduce between the ranks of one machine through shared memory, for CPU tensor parallelism.

A gloo all-reduce of one hidden vector goes through loopback TCP: ~0.1 ms on an idle machine, over
1 ms on a busy 2-core one (docs/tensor_parallel.md), and a step has two per layer. Here the ranks
map one file in ``/dev/shm``; an all-reduce is: write my part into my slot, publish a sequence
number, wait until every rank has published it, then add the slots **in rank order** (so every rank
gets the same bits: the replicated residual stream stays identical on all ranks; bfloat16/float16
parts are summed in float32 and rounded once).

Layout: one flag (int64 sequence number) per rank, each on its own 64-byte line, then
``[2, world_size, SLOT_BYTES]`` data. Two buffers, alternated by sequence number, let a fast rank
start the next all-reduce while a slow one still reads this one: a rank can only come back to a
buffer after every rank has published the sequence in between, which each does after reading.
Tensors larger than a slot go through in slot-sized chunks.

Ordering: the data stores happen before the flag store and the flag load before the data loads in
program order, and x86-64 keeps stores (and loads) in that order (TSO), so no fence is needed there;
``is_supported`` keeps other CPUs on gloo. Waiting spins with ``sched_yield`` (the ranks may share
a core); a peer that never arrives (killed) raises after ``timeout_s`` instead of hanging.

The file is unlinked once every rank has mapped it, so nothing is left in /dev/shm even when a
process is killed.
"""

from __future__ import annotations

import os
import platform
import time
import uuid
from typing import Any

import numpy as np
import torch

SLOT_BYTES = 1 << 20  # per rank and buffer: 1 MiB = 455 rows of a 576-wide float32 hidden state
FLAG_STRIDE = 8  # int64s per flag: one 64-byte cache line each, no false sharing
TIMEOUT_ENV = "TOKENMILL_TP_ALLREDUCE_TIMEOUT"
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def is_supported() -> bool:
    return (platform.machine().lower() in ("x86_64", "amd64")
            and os.path.isdir("/dev/shm"))


class SharedMemoryAllReduce:
    def __init__(self, rank: int, world_size: int, buffer: torch.Tensor,
                 timeout_s: float | None = None):
        self.rank = rank
        self.world_size = world_size
        self.buffer = buffer  # keeps the mapping alive
        flag_bytes = world_size * FLAG_STRIDE * 8
        self.flags = buffer[:flag_bytes].numpy().view(np.int64)
        self.data = buffer[flag_bytes:].view(2, world_size, SLOT_BYTES)
        self._views: dict[torch.dtype, torch.Tensor] = {}
        self.seq = 0
        self.timeout_s = timeout_s or float(os.environ.get(TIMEOUT_ENV, "120"))

    @staticmethod
    def num_bytes(world_size: int) -> int:
        return world_size * FLAG_STRIDE * 8 + 2 * world_size * SLOT_BYTES

    @classmethod
    def create(cls, rank: int, world_size: int, group: Any = None) -> SharedMemoryAllReduce | None:
        """Collective over ``group``: rank 0 makes the file, every rank maps it, rank 0 unlinks
        it. None on every rank when shared memory is not usable here (then gloo is used)."""
        import torch.distributed as dist

        name = [None]
        if rank == 0 and is_supported():
            path = f"/dev/shm/tokenmill-tp-{os.getpid()}-{uuid.uuid4().hex[:12]}"
            with open(path, "wb") as handle:
                handle.truncate(cls.num_bytes(world_size))
            name = [path]
        dist.broadcast_object_list(name, src=0, group=group)
        path = name[0]
        if path is None:
            return None
        try:
            buffer = torch.from_file(path, shared=True, size=cls.num_bytes(world_size),
                                     dtype=torch.uint8)
        finally:
            dist.barrier(group=group)  # everyone has mapped it (or failed): it may go
            if rank == 0:
                os.unlink(path)
        return cls(rank, world_size, buffer)

    def can_reduce(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.dtype in _DTYPES

    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the ranks in place (the same bits on every rank); returns it."""
        flat = tensor.view(-1) if tensor.is_contiguous() else tensor.contiguous().view(-1)
        view = self._views.get(tensor.dtype)
        if view is None:
            view = self._views[tensor.dtype] = self.data.view(tensor.dtype)
        capacity = view.shape[-1]
        for start in range(0, flat.numel(), capacity):
            chunk = flat[start:start + capacity]
            self.seq += 1
            slots = view[self.seq & 1, :, :chunk.numel()]
            slots[self.rank].copy_(chunk)
            self.flags[self.rank * FLAG_STRIDE] = self.seq
            self._wait(self.seq)
            if chunk.dtype == torch.float32:
                chunk.copy_(slots[0])
                for other in range(1, self.world_size):
                    chunk.add_(slots[other])
            else:  # 16-bit parts are summed in float32 and rounded once
                total = slots[0].float()
                for other in range(1, self.world_size):
                    total.add_(slots[other])
                chunk.copy_(total)
        if flat.data_ptr() != tensor.data_ptr():
            tensor.copy_(flat.view(tensor.shape))
        return tensor

    def _wait(self, seq: int) -> None:
        flags = self.flags[::FLAG_STRIDE]
        if flags.min() >= seq:
            return
        deadline = None
        spins = 0
        while flags.min() < seq:
            os.sched_yield()
            spins += 1
            if spins & 1023 == 0:
                now = time.monotonic()
                if deadline is None:
                    deadline = now + self.timeout_s
                elif now > deadline:
                    late = [r for r in range(self.world_size) if flags[r] < seq]
                    raise RuntimeError(
                        f"tensor-parallel all-reduce #{seq}: rank(s) {late} did not arrive within "
                        f"{self.timeout_s:g} s (a worker died or hung); rank {self.rank} gives up")

    def close(self) -> None:
        self._views.clear()
        self.flags = None
        self.data = None
        self.buffer = None
