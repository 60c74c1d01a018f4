"""Microbenchmark of the native quantized matmul against torch's dense and quantized linears.

Shapes are SmolLM2-135M's projections (fused qkv and gate/up as the engine runs them). For each
row count M it prints microseconds per call and GB/s of weight bytes read (the decode floor is
weight bytes / memory bandwidth), next to the machine's load average: on a shared 2-core machine the
figures are indicative only.

    .venv/bin/python benchmarks/quant_matmul_micro.py [--rows 1 4 16 64 512] [--threads 2]
    .venv/bin/python benchmarks/quant_matmul_micro.py --exact --rows 1 4 16 --threads 1 2

``--exact`` compares, for float32 activations, the exact kernel (no activation quantization) with
the int8-activation kernel and the dense fp32 path, best of ``--rounds`` runs.
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
    """``path`` "auto" is what the engine calls; "exact" / "int8" / "dense" force one native path."""
    if path == "auto":
        return partial(qm.quant_linear, x, packed)
    return partial(qm.native_linear, x, packed, None, path)


def best_of(fn: Callable[[], object], budget_s: float, rounds: int) -> float:
    """Best microseconds per call over ``rounds`` measurements (other processes share the cores)."""
    return min(time_call(fn, budget_s)[0] for _ in range(rounds))


def compare_exact(args: argparse.Namespace) -> None:
    """float32 x: the exact kernel against the int8-activation kernel (and the dense fp32 path),
    best of ``--rounds``, per thread count; with the load average before and after each row."""
    isa = qm.kernel_isa()
    print(f"cpu: {platform.processor() or platform.machine()}  torch {torch.__version__}  "
          f"kernel isa: {isa}  fp32 dense from M >= {qm.DENSE_MIN_ROWS_FP32}")
    header = (f"{'thr':>3} {'shape':>8} {'K':>5} {'N':>6} {'M':>4} {'weight':>12} {'exact us':>9} "
              f"{'int8 us':>9} {'dense us':>9} {'exact/int8':>10}  load avg")
    print(header)
    print("-" * len(header))
    with torch.inference_mode():
        for threads in args.threads:
            torch.set_num_threads(threads)
            for name in args.shapes:
                k, n = SHAPES[name]
                weights = {"q4 g32 +min": qm.pack(random_weight(n, k, 4, 32, True)),
                           "q8 g32": qm.pack(random_weight(n, k, 8, 32, False))}
                for label, packed in weights.items():
                    for m in args.rows:
                        x = torch.randn(m, k)
                        load = os.getloadavg()[0]
                        times = {path: best_of(run_ours(x, packed, path), args.budget, args.rounds)
                                 for path in ("exact", "int8", "dense")}
                        print(f"{threads:>3} {name:>8} {k:>5} {n:>6} {m:>4} {label:>12} "
                              f"{times['exact']:>9.1f} {times['int8']:>9.1f} "
                              f"{times['dense']:>9.1f} {times['exact'] / times['int8']:>10.2f}  "
                              f"{load:.2f}-{os.getloadavg()[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--threads", type=int, nargs="+",
                        default=[int(os.environ.get("TOKENMILL_NUM_THREADS", "2"))])
    parser.add_argument("--budget", type=float, default=0.15, help="seconds per measurement")
    parser.add_argument("--paths", action="store_true",
                        help="also time our int8 and dense paths separately (threshold tuning)")
    parser.add_argument("--exact", action="store_true",
                        help="float32 x: exact kernel vs int8 kernel vs dense fp32 (per --threads)")
    parser.add_argument("--rounds", type=int, default=3, help="--exact: best of this many")
    args = parser.parse_args()
    if args.exact:
        compare_exact(args)
        return
    torch.set_num_threads(args.threads[0])
    torch.manual_seed(0)
    isa = qm.kernel_isa()
    print(f"cpu: {platform.processor() or platform.machine()}  threads: {args.threads[0]}  "
          f"torch {torch.__version__}  kernel isa: {isa}  dense path from M >= {qm.dense_min_rows()}"
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
