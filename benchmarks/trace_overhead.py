"""What request tracing costs: decode tokens/s of `tokenmill serve` with and without it.

    .venv/bin/python benchmarks/trace_overhead.py                   # 16 clients, 3 rounds
    .venv/bin/python benchmarks/trace_overhead.py --rounds 1 --num-requests 8 --output-len 16
    .venv/bin/python benchmarks/trace_overhead.py --engine-only --rounds 5   # LLM, no HTTP

The server is started with tracing on (the default) and with --no-request-trace, alternately,
--rounds times each (alternating evens out a machine that warms up or gets busier), each alone on
the machine, and measured with `tokenmill bench` (benchmarks/serve_load.py's machinery): streaming
/v1/completions at --concurrency clients, fixed prompt and output lengths with ignore_eos. It
prints output tokens/s and TPOT per run, the median of each setting and the ratio; the target is
tracing costing at most 2% of decode tokens/s at 16 clients.

``--engine-only`` measures the engine alone (``LLM.generate`` of --concurrency requests at once,
tracing on and off in two engines of one process, alternating): no HTTP client sharing the cores,
so a difference of a per cent or two stands out of the noise.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import cpu_name, free_port, launched, run_levels, tokenmill_command


def measure(tracing: bool, args: argparse.Namespace, round_index: int) -> dict:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    extra = args.tokenmill_args.split() + ([] if tracing else ["--no-request-trace"])
    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}
    name = "trace-on" if tracing else "trace-off"
    with launched(name, tokenmill_command(port, args.kv_cache_memory, extra), url, env):
        [level] = run_levels(url, [args.concurrency], args.num_requests, args.input_len,
                             args.output_len, args.output_dir / f"{name}-{round_index}")
    return level["summary"]


def measure_engine(args: argparse.Namespace) -> None:
    import time

    from tokenmill import LLM, SamplingParams

    os.environ.setdefault("TOKENMILL_NUM_THREADS", str(args.threads))
    engines = {tracing: LLM(kv_cache_memory=args.kv_cache_memory, num_threads=args.threads,
                            request_trace=tracing) for tracing in (True, False)}
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0)
    prompts = [[1000 + (i * 37 + j) % 30000 for j in range(args.input_len)]
               for i in range(args.concurrency)]
    rates: dict[bool, list[float]] = {True: [], False: []}
    for tracing in (True, False):  # warm-up: first steps build kernels and caches
        engines[tracing].generate(prompts[:2], SamplingParams(max_tokens=4), use_tqdm=False)
    for round_index in range(args.rounds):
        for tracing in (True, False) if round_index % 2 == 0 else (False, True):
            start = time.perf_counter()
            engines[tracing].generate(prompts, params, use_tqdm=False)
            rate = args.concurrency * args.output_len / (time.perf_counter() - start)
            rates[tracing].append(rate)
            print(f"round {round_index + 1} tracing {'on ' if tracing else 'off'}: "
                  f"{rate:.1f} output tok/s", flush=True)
    on, off = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"\nCPU: {cpu_name()}; engine only, {args.concurrency} requests at once, "
          f"{args.input_len}-token prompts, {args.output_len} output tokens, {args.rounds} runs "
          f"each; median tok/s tracing on {on:.1f}, off {off:.1f}, on/off {on / off:.3f}")
    print(f"tracing overhead on decode tokens/s: {(1 - on / off) * 100:+.1f}% (target <= 2%)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--num-requests", type=int, default=64, help="per run")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=3, help="runs of each setting")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-memory", type=int, default=2**29)
    parser.add_argument("--tokenmill-args", default="", help="extra flags for tokenmill serve")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/trace_overhead"))
    parser.add_argument("--engine-only", action="store_true",
                        help="measure LLM.generate in this process instead of served HTTP")
    args = parser.parse_args()
    if args.engine_only:
        measure_engine(args)
        return

    runs: dict[bool, list[dict]] = {True: [], False: []}
    for round_index in range(args.rounds):
        for tracing in (True, False) if round_index % 2 == 0 else (False, True):
            summary = measure(tracing, args, round_index)
            runs[tracing].append(summary)
            print(f"round {round_index + 1} tracing {'on ' if tracing else 'off'}: "
                  f"{summary['output_tokens_per_s']:.1f} output tok/s, TPOT p50 "
                  f"{summary['tpot_ms']['p50']:.1f} ms", flush=True)

    def median(tracing: bool, key: str) -> float:
        values = [s[key] if key != "tpot_ms" else s[key]["p50"] for s in runs[tracing]]
        return statistics.median(values)

    on, off = median(True, "output_tokens_per_s"), median(False, "output_tokens_per_s")
    print(f"\nCPU: {cpu_name()}; load average now {os.getloadavg()[0]:.2f}; "
          f"{args.concurrency} clients, {args.input_len}-token prompts, {args.output_len} output "
          f"tokens, {args.num_requests} requests per run, {args.rounds} runs each")
    print(f"{'':<28}{'tracing on':>14}{'tracing off':>14}{'on/off':>10}")
    print(f"{'output tok/s (median)':<28}{on:>14.1f}{off:>14.1f}{on / off:>10.3f}")
    tpot_on, tpot_off = median(True, "tpot_ms"), median(False, "tpot_ms")
    print(f"{'TPOT p50 ms (median)':<28}{tpot_on:>14.2f}{tpot_off:>14.2f}"
          f"{tpot_on / tpot_off:>10.3f}")
    print(f"tracing overhead on decode tokens/s: {(1 - on / off) * 100:+.1f}% (target <= 2%)")


if __name__ == "__main__":
    main()
