"""Microbenchmark of the native quantized matmul against torch's dense and quantized linears.

Shapes are SmolLM2-135M's projections (fused qkv and gate/up as the engine runs them). For each
row count M it prints microseconds per call and GB/s of weight bytes read (the decode floor is
weight bytes / memory bandwidth), next to the machine's load average: on a shared 2-core machine the
figures are indicative only.

    .venv/bin/python benchmarks/quant_matmul_micro.py [--rows 1 4 16 64 512] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F

from tokenmill.layers.kernels import quant_matmul as qm
from tokenmill.quant.weight import QuantizedWeight

SHAPES = {  # name: (K, N)
    "qkv": (576, 960),
    "o": (576, 576),
    "gate_up": (576, 3072),
    "down": (1536, 576),
    "lm_head": (576, 49152),
}


def time_call(fn: Callable[[], object], budget_s: float) -> tuple[float, float]:
    """(best, median) microseconds per call over about ``budget_s`` seconds. On a shared machine
    the best of many calls is the figure least disturbed by other processes."""
    start = time.perf_counter()
    calls = 0
    while calls < 5 or time.perf_counter() - start < 0.02:  # warm caches, pools, oneDNN's JIT
        fn()
        calls += 1
    once = max((time.perf_counter() - start) / calls, 1e-6)
    reps = max(3, min(200, int(budget_s / once)))
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return min(samples) * 1e6, statistics.median(samples) * 1e6


def random_weight(n: int, k: int, bits: int, group_size: int, with_mins: bool) -> QuantizedWeight:
    if bits == 4:
        qweight = torch.randint(0, 256, (n, k // 2), dtype=torch.uint8)
    else:
        qweight = torch.randint(-128, 128, (n, k), dtype=torch.int8)
    scales = (torch.rand(n, k // group_size) * 0.01 + 1e-3).half()
    mins = (torch.randn(n, k // group_size) * 0.02).half() if with_mins else None
    return QuantizedWeight(bits, group_size, qweight, scales, mins, source=f"random q{bits}")


def torch_int4_pack(n: int, k: int, group_size: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    try:
        codes = torch.randint(0, 16, (n, k), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
        scale_zeros = torch.rand(k // group_size, n, 2).bfloat16()
        return packed, scale_zeros
    except (RuntimeError, AttributeError):
        return None


def run_ours(x: torch.Tensor, packed: qm.PackedLinear, path: str) -> Callable[[], object]:
    def call() -> object:
        saved = qm.DENSE_MIN_ROWS
        qm.DENSE_MIN_ROWS = {"int8": 1 << 30, "dense": 0}.get(path, saved)
        try:
            return qm.quant_linear(x, packed)
        finally:
            qm.DENSE_MIN_ROWS = saved
    return call


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, default=int(os.environ.get("TOKENMILL_NUM_THREADS",
                                                                          "2")))
    parser.add_argument("--budget", type=float, default=0.15, help="seconds per measurement")
    parser.add_argument("--paths", action="store_true",
                        help="also time our int8 and dense paths separately (threshold tuning)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    isa = qm.kernel_isa()
    print(f"cpu: {platform.processor() or platform.machine()}  threads: {args.threads}  "
          f"torch {torch.__version__}  kernel isa: {isa}  dense path from M >= {qm.DENSE_MIN_ROWS}"
          f"  features: {' '.join(sorted(qm._features))}")
    header = (f"{'shape':>8} {'M':>4} {'variant':>22} {'best us':>10} {'median us':>10} "
              f"{'GB/s':>7}  load avg")
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for name in args.shapes:
            k, n = SHAPES[name]
            w_fp32 = torch.randn(n, k) * 0.02
            w_bf16 = w_fp32.bfloat16()
            ours = {"q4 g32 +min": qm.pack(random_weight(n, k, 4, 32, True)),
                    "q8 g32": qm.pack(random_weight(n, k, 8, 32, False))}
            w_int8 = torch.randint(-128, 128, (n, k), dtype=torch.int8)
            int8_scales = torch.rand(n).bfloat16()
            int4 = torch_int4_pack(n, k, 32)
            for m in args.rows:
                x32 = torch.randn(m, k)
                x16 = x32.bfloat16()
                variants: list[tuple[str, Callable[[], object], int]] = []
                for label, packed in ours.items():
                    variants.append((f"ours {label} bf16", run_ours(x16, packed, "auto"),
                                     packed.nbytes()))
                    if args.paths:
                        for path in ("int8", "dense"):
                            variants.append((f"  {path} path", run_ours(x16, packed, path),
                                             packed.nbytes()))
                variants.append(("ours q4 g32 +min fp32", run_ours(x32, ours["q4 g32 +min"],
                                                                   "auto"),
                                 ours["q4 g32 +min"].nbytes()))
                variants.append(("torch fp32 linear", partial(F.linear, x32, w_fp32), n * k * 4))
                variants.append(("torch bf16 linear", partial(F.linear, x16, w_bf16), n * k * 2))
                variants.append(("torch int8pack bf16",
                                 partial(torch.ops.aten._weight_int8pack_mm, x16, w_int8,
                                         int8_scales),
                                 n * k + n * 2))
                if int4 is not None:
                    variants.append(("torch int4pack bf16",
                                     partial(torch.ops.aten._weight_int4pack_mm_for_cpu, x16,
                                             int4[0], 32, int4[1]),
                                     n * k // 2 + (k // 32) * n * 4))
                for label, fn, nbytes in variants:
                    try:
                        best, median = time_call(fn, args.budget)
                    except RuntimeError as exc:
                        print(f"{name:>8} {m:>4} {label:>22} {'n/a':>10}  ({exc})")
                        continue
                    load = f"{os.getloadavg()[0]:.2f}"
                    print(f"{name:>8} {m:>4} {label:>22} {best:>10.1f} {median:>10.1f} "
                          f"{nbytes / best / 1e3:>7.2f}  {load}")
                print()


if __name__ == "__main__":
    main()
