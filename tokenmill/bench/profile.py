"""Measure this machine as a ``HardwareSpec``: datasheet-style figures and what decode costs here.

* Bandwidth is a large tensor copy (each byte read once and written once, counted twice, as
  STREAM's "copy" does); matmul throughput is a square GEMM timed until a small budget runs out.
  ``plan`` uses them for prefill and for devices without the figures below.
* The decode profile (``DecodeProfile``) times what a decode step really runs: each linear of the
  built-in model in each weight format tokenmill runs (fp32 and bf16 through ``F.linear``; 4-bit
  Q4_1-like and 8-bit Q8_0-like ``QuantizedWeight`` through the native ``quant_linear``) at
  M = 1..32 rows, with a fit for other shapes; and the overhead around them (norms, rotary,
  attention over the KV cache, residuals per layer; inputs, sampling, scheduling per step),
  from decode steps of the built-in model itself minus its measured linears; and what
  ``tokenmill serve`` adds per step (a real server on loopback against the engine alone).
  Datasheet peaks say little here: a 2-core VM reaches a fraction of its copy bandwidth in a GEMV, a model that
  fits the L3 cache runs far above it, and at small batches per-op overhead is a third of a step.
"""

from __future__ import annotations

import datetime as dt
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tokenmill.bench.hardware import (
    DecodeProfile,
    HardwareSpec,
    KernelTable,
    OverheadTable,
    ServingTable,
)
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


def cpu_model_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "CPU"


def _load_average() -> float | None:
    """1-minute load average: other work on these cores skews every figure taken here."""
    import os

    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


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
                    matmul_size: int | None = None, decode: bool = True, quick: bool = False,
                    serve: bool = True, tp: bool = True,
                    log: Callable[[str], None] = lambda _: None) -> HardwareSpec:
    """``decode``: also measure the decode profile (CPU only; ``quick``: fewer points, the
    default configuration's overhead only; ``serve``: and the cost of serving over HTTP;
    ``tp``: and what tensor parallelism adds, the collectives and the Python layers)."""
    import psutil
    import torch

    if threads is not None:
        if threads < 1:
            raise BenchError(f"--threads={threads} must be at least 1")
    else:
        from tokenmill.config import EngineConfig

        threads = EngineConfig().resolved_num_threads()  # what `tokenmill serve` would use
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
        name, memory = cpu_model_name(), float(psutil.virtual_memory().total)
        dtypes = ("fp32", "bf16")

        def sync() -> None:
            return None

    size = matmul_size or (4096 if on_gpu else 1024)
    load_before = _load_average()
    try:
        bandwidth = measure_bandwidth(device, copy_bytes, budget_s, sync)
        flops = {dt_: measure_matmul(device, dt_, size, budget_s, sync) for dt_ in dtypes}
        decode_profile = None
        if decode and not on_gpu:
            decode_profile = profile_decode(threads=threads, quick=quick, serve=serve, tp=tp,
                                            log=log)
            torch.set_num_threads(threads)
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
               "copy_bytes": copy_bytes, "logical_cpus": psutil.cpu_count(),
               "load_average_before_after": [load_before, _load_average()]},
        decode=decode_profile,
    )


# -- decode costs: the kernels tokenmill runs, at the shapes it runs them -----------------------
DECODE_ROWS = (1, 2, 4, 8, 16, 32)
QUICK_ROWS = (1, 4, 16)
OVERHEAD_BATCHES = (1, 4, 16)
OVERHEAD_CONTEXTS = (64, 384)
QUICK_CONTEXTS = (32, 192)
QUANT_GROUP = 32  # the measured q4 / q8 weights: GGUF's block of 32 (Q4_1 / Q8_0)
_NO_TERM = 1e30  # a fitted rate whose term dropped out (JSON has no infinity)


def _torch_dtype(name: str) -> Any:
    import torch

    return getattr(torch, _TORCH_DTYPES[name])


def builtin_linears() -> tuple[Any, list[tuple[str, int, int, int]]]:
    """The built-in model's arch and its linears as (role, count, K, N), fused as tokenmill runs
    them (SmolLM2-135M: qkv 576x960, o 576x576, gate_up 576x3072, down 1536x576 in each of 30
    layers, and the tied LM head 576x49152)."""
    from tokenmill.bench.catalog import find_model

    arch = find_model(None)
    return arch, [(layer.role, layer.count, layer.in_features, layer.out_features)
                  for layer in arch.weight_layout("fp32").linears]


def _random_quantized(kernel: str, n: int, k: int, seed: int) -> Any:
    """A random ``QuantizedWeight`` as GGUF Q4_1 (``q4``) or Q8_0 (``q8``) blocks hold it."""
    import torch

    from tokenmill.quant.weight import QuantizedWeight

    gen = torch.Generator().manual_seed(seed)
    groups = k // QUANT_GROUP
    scales = ((torch.rand(n, groups, generator=gen) + 0.5) * 0.01).half()
    if kernel == "q4":
        codes = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, generator=gen)
        mins = (torch.randn(n, groups, generator=gen) * 0.05).half()
        return QuantizedWeight(4, QUANT_GROUP, codes, scales, mins, None, "profile:q4")
    codes = torch.randint(-128, 128, (n, k), dtype=torch.int8, generator=gen)
    return QuantizedWeight(8, QUANT_GROUP, codes, scales, None, None, "profile:q8")


def _kernel_ops(kernel: str, k: int, n: int, count: int) -> list[Callable[[Any], Any]]:
    """``count`` independent copies of one (K, N) weight in ``kernel``'s format, each as the
    call the model's linear layer makes (``F.linear`` or ``quant_linear``)."""
    import dataclasses

    import torch
    import torch.nn.functional as F

    if kernel in ("q4", "q8"):
        from tokenmill.layers.kernels import quant_matmul

        packed = quant_matmul.pack(_random_quantized(kernel, n, k, seed=k * 7 + n))
        copies = [packed] + [dataclasses.replace(packed, data=packed.data.clone())
                             for _ in range(count - 1)]
        return [lambda x, p=p: quant_matmul.quant_linear(x, p) for p in copies]
    base = (torch.randn(n, k) * 0.02).to(_torch_dtype(kernel))
    copies = [base] + [base.clone() for _ in range(count - 1)]
    return [lambda x, w=w: F.linear(x, w) for w in copies]


def measure_kernel_table(kernel: str, activation_dtype: str, rows: tuple[int, ...],
                         passes: int, linears: list[tuple[str, int, int, int]]) -> KernelTable:
    """Time each linear of the built-in model in ``kernel``'s format at each M in ``rows``.

    All the model's matrices exist at once (30 copies of each layer's shape) and are called in
    model order, layer after layer, so each call finds its weight where a real decode step does
    (in cache when the whole model fits, in DRAM otherwise). The figure is the median over the
    layers of one pass, the best of ``passes`` passes; a first pass at each M is not counted (it
    pays for primitive creation)."""
    import torch

    act = _torch_dtype(kernel if kernel in _TORCH_DTYPES else activation_dtype)
    gen = torch.Generator().manual_seed(0)
    inputs = {k: torch.randn(max(rows), k, generator=gen).to(act) for _, _, k, _ in linears}
    per_layer = [(role, k, n, _kernel_ops(kernel, k, n, count)) for role, count, k, n in linears]
    order = []  # (role, op, K): decoder layers interleaved as in the model, then the head
    for index in range(max(len(ops) for *_, ops in per_layer)):
        for role, k, _, ops in per_layer:
            if index < len(ops):
                order.append((role, ops[index], k))
    shapes: dict[str, list[float]] = {f"{k}x{n}": [] for _, k, n, _ in per_layer}
    role_shape = {role: f"{k}x{n}" for role, k, n, _ in per_layer}
    samples: list[tuple[int, int, int, float, float]] = []
    with torch.inference_mode():
        for m in rows:
            xs = {k: x[:m].contiguous() for k, x in inputs.items()}
            best: dict[str, float] = {role: float("inf") for role, *_ in per_layer}
            for p in range(passes + 1):
                times: dict[str, list[float]] = {role: [] for role, *_ in per_layer}
                for role, op, k in order:
                    start = time.perf_counter()
                    op(xs[k])
                    times[role].append(time.perf_counter() - start)
                if p:  # a pass's median over the layers; the best pass (others' noise is slower)
                    for role, values in times.items():
                        best[role] = min(best[role], statistics.median(values))
            for role, k, n, _ in per_layer:
                seconds = best[role]
                shapes[role_shape[role]].append(seconds)
                samples.append((m, k, n, _kernel_bytes(kernel, k, n), seconds))
    return KernelTable(rows=tuple(rows), shapes={s: tuple(v) for s, v in shapes.items()},
                       fit=fit_kernel(samples), activation_dtype=activation_dtype,
                       group_size=QUANT_GROUP if kernel in ("q4", "q8") else None)


def _kernel_bytes(kernel: str, k: int, n: int) -> float:
    from tokenmill.bench.architecture import WeightFormat

    group = QUANT_GROUP if kernel in ("q4", "q8") else None
    return WeightFormat(kernel, kernel, group).nbytes(k, n)


def fit_kernel(samples: list[tuple[int, int, int, float, float]]) -> dict[str, float]:
    """Non-negative least squares (relative error) of ``t = call + bytes/bw + 2MKN/flops`` over
    (M, K, N, bytes, seconds) samples: every subset of the three terms is solved and the best
    one with no negative coefficient kept."""
    import itertools

    import numpy as np

    t = np.array([s[4] for s in samples])
    columns = np.array([[1.0, s[3], 2.0 * s[0] * s[1] * s[2]] for s in samples]) / t[:, None]
    target = np.ones(len(samples))
    best, best_err = np.array([float(t.min()), 0.0, 0.0]), float("inf")
    for size in (3, 2, 1):
        for subset in itertools.combinations(range(3), size):
            coef, *_ = np.linalg.lstsq(columns[:, subset], target, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[list(subset)] = coef
            err = float(((columns @ full - target) ** 2).sum())
            if err < best_err:
                best, best_err = full, err
    return {"call_s": float(best[0]),
            "bytes_per_s": float(1 / best[1]) if best[1] > 0 else _NO_TERM,
            "flops_per_s": float(1 / best[2]) if best[2] > 0 else _NO_TERM}


def _linear_seconds(layout: Any, kernels: dict[str, KernelTable], batch: int,
                    include_head: bool) -> float:
    total = 0.0
    for layer in layout.linears:
        if (layer.role == "lm_head") != include_head:
            continue
        table = kernels[layer.fmt.kernel]
        total += layer.count * table.seconds(batch, layer.in_features, layer.out_features,
                                             layer.nbytes_each)
    return total


def measure_overhead(config: tuple[str, str], kernels: dict[str, KernelTable],
                     batches: tuple[int, ...], contexts: tuple[int, ...], steps: int,
                     threads: int, passes: int = 1) -> OverheadTable:
    """Run the built-in model as tokenmill serves it (``LLM(dtype, quantization)``) and take
    from its decode steps what its linears (``kernels``) do not explain.

    * per layer: decode steps of ``batch`` requests whose KV already holds ``context`` tokens
      (a hand-built ``SchedulerOutput`` through ``ModelRunner.execute``, so no prefill is paid;
      the KV is zeros, which costs the same to read); the time in ``model.forward`` minus the
      decoder layers' linears, divided by the layers;
    * per step: ``execute`` minus ``forward`` minus the LM head's matmul (inputs, logits,
      sampling), plus the time between two decode steps of a real ``LLM.generate`` at that
      batch (scheduling, updating requests, detokenizing)."""
    import torch

    from tokenmill import LLM, SamplingParams
    from tokenmill.bench.architecture import normalize_dtype
    from tokenmill.engine.scheduler_output import NewRequestData, SchedulerOutput

    dtype, quantization = config
    arch, _ = builtin_linears()
    compute = normalize_dtype(dtype)
    block = 16
    kv_bytes = arch.kv_bytes_per_token(compute)
    max_blocks = max(batches) * (-(-(max(contexts) + 64) // block))
    llm = LLM(dtype=dtype, quantization=quantization, num_threads=threads, block_size=block,
              kv_cache_memory=max_blocks * block * kv_bytes + 2**22, max_num_seqs=max(batches),
              enable_prefix_caching=False)
    runner = llm.engine.runner
    layout = arch.weight_layout(None if quantization == "auto" else compute, compute)
    weights = " + ".join(sorted(runner.model.weight_report()))
    clock: dict[str, float] = {"forward": 0.0, "logits": 0.0}

    def timed(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            clock[name] += time.perf_counter() - start
            return out
        return wrapper

    runner.model.forward = timed("forward", runner.model.forward)
    runner.model.compute_logits = timed("logits", runner.model.compute_logits)
    for cache in runner.kv_caches:
        cache.zero_()
    gen = torch.Generator().manual_seed(0)
    greedy = SamplingParams(max_tokens=1, temperature=0.0)

    def point(batch: int, context: int) -> tuple[float, float]:
        """(per-layer overhead, the runner's fixed per-step part) at one (batch, context)."""
        blocks = -(-context // block)
        ids = torch.randint(100, arch.vocab_size, (batch, context), generator=gen).tolist()
        # sent as new every time: the runner's copy is simply replaced, each step the same
        requests = [NewRequestData(
            request_id=f"profile-{batch}-{context}-{i}", prompt_token_ids=ids[i],
            output_token_ids=[], sampling_params=greedy, eos_token_id=None,
            block_ids=list(range(i * blocks, (i + 1) * blocks)),
            num_computed_tokens=context - 1, is_prompt_only=False) for i in range(batch)]
        output = SchedulerOutput(
            num_scheduled_tokens={r.request_id: 1 for r in requests},
            total_num_scheduled_tokens=batch, scheduled_new_requests=requests)
        execute, forward = [], []
        for step in range(steps + 2):
            clock.update(forward=0.0, logits=0.0)
            start = time.perf_counter()
            runner.execute(output)
            elapsed = time.perf_counter() - start
            if step >= 2:
                execute.append(elapsed)
                forward.append(clock["forward"])
        fwd, exe = statistics.median(forward), statistics.median(execute)
        linears = _linear_seconds(layout, kernels, batch, include_head=False)
        head = _linear_seconds(layout, kernels, batch, include_head=True)
        return max(0.0, fwd - linears) / arch.num_layers, max(0.0, exe - fwd - head)

    # The whole grid ``passes`` times, keeping each point's least: another process or a VM's
    # hiccup only ever adds time, and one that lasted a point's few steps used to stay in the
    # table (a per-layer overhead 4-6x its value in the next run on the same machine).
    layer_s = [[float("inf")] * len(contexts) for _ in batches]
    fixed = [[float("inf")] * len(contexts) for _ in batches]
    gaps = [float("inf")] * len(batches)
    for _ in range(passes):
        for b, batch in enumerate(batches):
            for c, context in enumerate(contexts):
                layer, runner_fixed = point(batch, context)
                layer_s[b][c] = min(layer_s[b][c], layer)
                fixed[b][c] = min(fixed[b][c], runner_fixed)
            gaps[b] = min(gaps[b], _loop_gap(llm, batch, steps + 4))
    step_s = [statistics.mean(fixed[b]) + gaps[b] for b in range(len(batches))]
    return OverheadTable(batches=tuple(batches), contexts=tuple(contexts),
                         layer_s=tuple(tuple(r) for r in layer_s), step_s=tuple(step_s),
                         kv_bytes_per_token_per_layer=kv_bytes / arch.num_layers,
                         weights=weights)


def _loop_gap(llm: Any, batch: int, num_tokens: int) -> float:
    """Median time between the end of one decode step's ``execute`` and the start of the next
    in ``LLM.generate`` with ``batch`` requests: the engine's own per-step work."""
    from tokenmill import SamplingParams

    runner = llm.engine.runner
    marks: list[tuple[float, float, int]] = []
    execute = runner.execute

    def recording(output: Any) -> Any:
        start = time.perf_counter()
        result = execute(output)
        marks.append((start, time.perf_counter(), output.total_num_scheduled_tokens))
        return result

    runner.execute = recording
    try:
        prompts = [[200 + 37 * i + j for j in range(8)] for i in range(batch)]
        llm.generate(prompts, SamplingParams(max_tokens=num_tokens, temperature=0.0,
                                             ignore_eos=True), use_tqdm=False)
    finally:
        runner.execute = execute
    gaps = [marks[i][0] - marks[i - 1][1] for i in range(2, len(marks))
            if marks[i][2] == batch and marks[i - 1][2] == batch]
    return statistics.median(gaps) if gaps else 0.0


def profile_decode(*, threads: int, quick: bool = False, serve: bool = True, tp: bool = True,
                   log: Callable[[str], None] = lambda _: None) -> DecodeProfile:
    """Measure the kernel tables (fp32, bf16, q4, q8), the overheads of the configurations
    tokenmill serves (fp32 and bf16 dense, the quantized default; ``quick``: the default only),
    (``serve``) what serving the default over HTTP adds and (``tp``) what TP adds: the
    all-reduce and all-gather between 2 ranks, and the default's overheads with the native
    decode stack off (TP > 1 runs the Python layers)."""
    import dataclasses

    from tokenmill.bench.architecture import normalize_dtype
    from tokenmill.config import ModelConfig
    from tokenmill.layers.kernels.quant_matmul import kernel_isa

    auto = normalize_dtype(ModelConfig().resolved_dtype())
    arch, linears = builtin_linears()
    rows = QUICK_ROWS if quick else DECODE_ROWS
    passes = 2 if quick else 3
    kernels: dict[str, KernelTable] = {}
    for kernel in ("fp32", "bf16", "q4", "q8"):
        started = time.perf_counter()
        kernels[kernel] = measure_kernel_table(kernel, auto, rows, passes, linears)
        log(f"kernel {kernel}: {time.perf_counter() - started:.1f}s")
    configs = {f"{auto}/quantized": (ModelConfig().resolved_dtype(), "auto")}
    if not quick:
        configs.update({"fp32": ("float32", "none"), "bf16": ("bfloat16", "none")})
    overheads: dict[str, OverheadTable] = {}
    for key, config in configs.items():
        started = time.perf_counter()
        try:
            overheads[key] = measure_overhead(
                config, kernels, OVERHEAD_BATCHES, QUICK_CONTEXTS if quick else OVERHEAD_CONTEXTS,
                steps=3 if quick else 6, threads=threads,
                passes=1 if quick else 2)
        except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as exc:
            # the engine could not run this configuration here; plan falls back to another
            # configuration's overhead (or, with none, to the roofline)
            log(f"overhead {key}: failed ({exc!r}); skipped")
            continue
        log(f"overhead {key}: {time.perf_counter() - started:.1f}s")
    decode = DecodeProfile(kernels=kernels, overheads=overheads, auto_dtype=auto, threads=threads,
                           kernel_isa=kernel_isa(), model=arch.name)
    if tp:
        decode = _profile_tensor_parallel(decode, configs, quick=quick, threads=threads, log=log)
    if serve and overheads:
        started = time.perf_counter()
        try:
            serving = measure_serving(threads=threads, output_len=32 if quick else 48)
        except (RuntimeError, OSError, KeyError) as exc:
            log(f"serving: failed ({exc}); the profile covers the engine alone")
        else:
            decode = dataclasses.replace(decode, serving=serving)
            log(f"serving: {time.perf_counter() - started:.1f}s")
    return decode


def _profile_tensor_parallel(decode: DecodeProfile, configs: dict[str, tuple[str, str]], *,
                             quick: bool, threads: int,
                             log: Callable[[str], None]) -> DecodeProfile:
    """``decode`` with what TP > 1 adds: the collectives (2 spawned ranks) and the default
    configuration's overheads with the native decode stack off. A failure leaves the term out
    (``plan`` then predicts TP without it) and says so."""
    import dataclasses

    from tokenmill.bench.collective_profile import measure_collectives
    from tokenmill.models import llama_decode_stack

    arch, _ = builtin_linears()
    started = time.perf_counter()
    try:
        link = measure_collectives(arch.hidden_size, arch.vocab_size, decode.auto_dtype,
                                   iterations=20 if quick else 50)
    except (RuntimeError, OSError) as exc:
        log(f"TP collectives: failed ({exc}); plan leaves TP communication out")
    else:
        decode = dataclasses.replace(decode, communication=link)
        log(f"TP collectives: {time.perf_counter() - started:.1f}s")
    key = f"{decode.auto_dtype}/quantized"
    if key not in decode.overheads:
        return decode
    started = time.perf_counter()
    was_enabled = llama_decode_stack.is_enabled()
    llama_decode_stack.set_enabled(False)
    try:
        table = measure_overhead(configs[key], decode.kernels, OVERHEAD_BATCHES,
                                 QUICK_CONTEXTS if quick else OVERHEAD_CONTEXTS,
                                 steps=3 if quick else 6, threads=threads,
                                 passes=1 if quick else 2)
    except (RuntimeError, ValueError, TypeError, AttributeError, KeyError) as exc:
        log(f"overhead {key} (Python layers): failed ({exc!r}); skipped")
    else:
        decode = dataclasses.replace(decode, python_overheads={key: table})
        log(f"overhead {key} (Python layers): {time.perf_counter() - started:.1f}s")
    finally:
        llama_decode_stack.set_enabled(was_enabled)
    return decode


SERVE_BATCHES = (1, 4, 16)


def measure_serving(*, threads: int, input_len: int = 64, output_len: int = 48,
                    timeout_s: float = 300.0) -> ServingTable:
    """Start ``tokenmill serve`` (no flags: the built-in model as served by default) on a
    loopback port, stream fixed-length requests at each of ``SERVE_BATCHES`` concurrent clients
    (``tokenmill bench``'s client, ignore_eos, temperature 0), and subtract from the ITL p50 (one
    decode step of the batch) the engine's own step, measured the same way in ``LLM.generate``
    (``_engine_step_seconds``)."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import tempfile

    import httpx
    from rich.console import Console

    from tokenmill.bench.client import Target, normalize_base_url
    from tokenmill.bench.runner import LoadLevel, Stop
    from tokenmill.bench.session import BenchOptions, run_bench
    from tokenmill.bench.workload import LengthDist, WorkloadSpec

    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    # port 0: the OS picks it as the server binds, and uvicorn's start-up line names it
    command = [sys.executable, "-m", "tokenmill.cli", "serve", "--host", "127.0.0.1", "--port",
               "0", "--kv-cache-memory", str(2**27)]
    listening = re.compile(r"Uvicorn running on (http://127\.0\.0\.1:\d+)")
    context = input_len + output_len // 2
    engine_steps = _engine_step_seconds(SERVE_BATCHES, input_len, output_len, threads)
    with tempfile.TemporaryDirectory(prefix="tokenmill-profile-") as out:
        log_path = Path(out) / "serve.log"
        with open(log_path, "w") as log:
            server = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + timeout_s
            url = None
            while True:
                if server.poll() is not None:
                    raise RuntimeError(f"tokenmill serve exited: {log_path.read_text()[-500:]}")
                if url is None and (found := listening.search(log_path.read_text())):
                    url = found.group(1)
                if url is not None:
                    try:
                        if httpx.get(url + "/health").status_code == 200:
                            break
                    except httpx.TransportError:
                        pass
                if time.monotonic() > deadline:
                    raise RuntimeError("tokenmill serve did not become ready")
                time.sleep(0.2)  # polling a child process's log and /health
            levels = []
            for index, batch in enumerate(SERVE_BATCHES):  # one round of the batch is enough
                outcome = run_bench(BenchOptions(
                    target=Target(normalize_base_url(url), None, ignore_eos=True),
                    levels=[LoadLevel("concurrency", float(batch))],
                    stop=Stop(num_requests=max(2, batch)),
                    workload=WorkloadSpec(input_len=LengthDist("fixed", input_len),
                                          output_len=LengthDist("fixed", output_len)),
                    output_dir=Path(out) / f"bench{batch}", warmup=1 if index == 0 else 0,
                    show_progress=False), Console(stderr=True, quiet=True))
                if not outcome.record["levels"]:
                    raise RuntimeError(f"no result at batch {batch}: {outcome.problem}")
                levels.append(outcome.record["levels"][0])
        finally:
            server.send_signal(signal.SIGTERM)
            try:
                server.wait(60)
            except subprocess.TimeoutExpired:
                server.kill()
    extra = []
    for batch, level, engine in zip(SERVE_BATCHES, levels, engine_steps, strict=True):
        itl_ms = level["summary"]["itl_ms"]["p50"]
        if not itl_ms:
            raise RuntimeError(f"no streamed tokens at batch {batch}: {outcome.problem}")
        extra.append(itl_ms / 1000 - engine)
    return ServingTable(SERVE_BATCHES, tuple(extra), context)


def _engine_step_seconds(batches: tuple[int, ...], input_len: int, output_len: int,
                         threads: int) -> list[float]:
    """The median time from one decode step's start to the next in ``LLM.generate`` (the
    default configuration, ``batch`` requests of the given lengths): the engine alone, what a
    served stream's gap between tokens is compared with. Measured rather than predicted, so
    the serving term does not absorb the plan's own error on the engine (a prediction 4 ms too
    high at batch 16 had made serving look free)."""
    import gc

    from tokenmill import LLM, SamplingParams

    llm = LLM(num_threads=threads, kv_cache_memory=2**27)
    runner = llm.engine.runner
    execute = runner.execute
    starts: list[tuple[float, int]] = []

    def recording(output: Any) -> Any:
        starts.append((time.perf_counter(), output.total_num_scheduled_tokens))
        return execute(output)

    runner.execute = recording
    steps = []
    try:
        for batch in batches:
            starts.clear()
            prompts = [[300 + 41 * i + j for j in range(input_len)] for i in range(batch)]
            llm.generate(prompts, SamplingParams(max_tokens=output_len, temperature=0.0,
                                                 ignore_eos=True), use_tqdm=False)
            gaps = [starts[i][0] - starts[i - 1][0] for i in range(2, len(starts))
                    if starts[i][1] == batch and starts[i - 1][1] == batch]
            if not gaps:
                raise RuntimeError(f"no decode step of {batch} requests to time")
            steps.append(statistics.median(gaps))
    finally:
        runner.execute = execute
        del llm, runner
        gc.collect()
    return steps
