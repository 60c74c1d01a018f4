"""Measure this machine: memory bandwidth and matmul FLOP/s per dtype, as a ``HardwareSpec``.

Bandwidth is a large tensor copy (each byte read once and written once, counted twice, as STREAM's
"copy" does); it stands for the weight streaming that bounds decode. Matmul throughput is a square
GEMM timed until a small time budget runs out, so the whole profile takes a few seconds.
"""

from __future__ import annotations

import datetime as dt
import platform
import time
from collections.abc import Callable
from pathlib import Path

from tokenmill.bench.hardware import HardwareSpec
from tokenmill.errors import BenchError

_TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _timed(fn: Callable[[], None], sync: Callable[[], None], budget_s: float) -> tuple[int, float]:
    """Run ``fn`` until ``budget_s`` has passed (at least twice); returns (calls, seconds)."""
    fn()  # first call pays for allocation/kernel selection; not counted
    sync()
    calls, start = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        sync()
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s and calls >= 2:
            return calls, elapsed


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def measure_bandwidth(device: str, num_bytes: int, budget_s: float,
                      sync: Callable[[], None]) -> float:
    import torch

    src = torch.ones(num_bytes // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    calls, seconds = _timed(lambda: dst.copy_(src), sync, budget_s)
    return 2.0 * src.numel() * 4 * calls / seconds


def measure_matmul(device: str, dtype: str, size: int, budget_s: float,
                   sync: Callable[[], None]) -> float:
    import torch

    torch_dtype = getattr(torch, _TORCH_DTYPES[dtype])
    a = torch.randn(size, size, device=device).to(torch_dtype)
    b = torch.randn(size, size, device=device).to(torch_dtype)
    out = torch.empty(size, size, device=device, dtype=torch_dtype)
    calls, seconds = _timed(lambda: torch.mm(a, b, out=out), sync, budget_s)
    return 2.0 * size**3 * calls / seconds


def profile_machine(*, device: str | None = None, threads: int | None = None,
                    budget_s: float = 0.5, copy_bytes: int = 256 * 2**20,
                    matmul_size: int | None = None) -> HardwareSpec:
    import psutil
    import torch

    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads={threads} must be at least 1")
        torch.set_num_threads(threads)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    on_gpu = device.startswith("cuda")
    if on_gpu and not torch.cuda.is_available():
        raise BenchError(f"--device {device}: torch sees no CUDA device here")
    if on_gpu:
        props = torch.cuda.get_device_properties(device)
        name, memory = props.name, float(props.total_memory)
        dtypes = ("fp32", "bf16", "fp16")

        def sync() -> None:
            torch.cuda.synchronize(device)
    else:
        name, memory = _cpu_name(), float(psutil.virtual_memory().total)
        dtypes = ("fp32", "bf16")

        def sync() -> None:
            return None

    size = matmul_size or (4096 if on_gpu else 1024)
    try:
        bandwidth = measure_bandwidth(device, copy_bytes, budget_s, sync)
        flops = {dt_: measure_matmul(device, dt_, size, budget_s, sync) for dt_ in dtypes}
    except (RuntimeError, MemoryError) as exc:
        raise BenchError(f"profiling {device} failed: {exc}") from exc
    return HardwareSpec(
        key="this-machine",
        name=f"this machine: {name}",
        memory_bytes=memory,
        bandwidth_bytes_per_s=bandwidth,
        peak_flops=flops,
        source=f"measured by `tokenmill profile` on {dt.date.today().isoformat()} "
               f"({device}, {torch.get_num_threads()} torch threads)",
        measured=True,
        extra={"device": device, "torch_threads": torch.get_num_threads(),
               "torch_version": torch.__version__, "matmul_size": size,
               "copy_bytes": copy_bytes, "logical_cpus": psutil.cpu_count()},
    )
