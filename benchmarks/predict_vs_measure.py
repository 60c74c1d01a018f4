"""Planner prediction vs measurement: `tokenmill plan` on this machine against `tokenmill serve`.

    .venv/bin/python benchmarks/predict_vs_measure.py                 # profile, then 3 servers
    .venv/bin/python benchmarks/predict_vs_measure.py --reuse-profile # keep the saved profile
    .venv/bin/python benchmarks/predict_vs_measure.py --base-url http://127.0.0.1:8000 \\
        --configs default                                             # a server already running
    .venv/bin/python benchmarks/predict_vs_measure.py --configs default,tp3 --threads 1 \\
        --concurrency 1,4 --quick-profile                             # tensor parallelism

First `tokenmill profile` measures this machine (in a subprocess, with the servers' thread count;
saved to --profile-path, by default where `plan --hardware this` reads it): kernel times, the
engine's overheads and what `tokenmill serve` adds per step (measured on the default
configuration at a shorter context; the fp32 and bf16 rows are predictions from those parts). Then for each
configuration (fp32 = `--dtype float32 --quantization none`, bf16 = `--dtype bfloat16
--quantization none`, default = no flags: the GGUF's Q4_1/Q8_0 blocks, `--dtype auto`; tp3 = the
default over 3 tensor-parallel ranks, planned with --tp 3) it starts
`tokenmill serve` alone on loopback, warms it up and benches each --concurrency level with
fixed-length prompts and outputs (ignore_eos, temperature 0), then prints the decode throughput
`plan` predicts at that batch and context (prompt + half the output) and the measured one:

* measured = concurrency ÷ ITL p50: the median gap between two streamed tokens is one decode step
  of the whole batch (steps that also prefill a newly arrived prompt are the slow tail, not the
  median), so this is decode alone, what the planner predicts;
* also shown: concurrency ÷ TPOT p50, which includes those prefill steps.

Run it on a quiet machine: other processes on the same cores skew both the profile and the bench.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import cpu_name, launched_server, run_levels

from tokenmill.bench.catalog import find_model
from tokenmill.bench.hardware import default_profile_path, load_profile
from tokenmill.bench.plan import PlanInputs, decode_step, plan

# name -> (serve flags, weight format for plan (None: as stored), compute dtype (None: auto),
#          tensor-parallel degree)
CONFIGS: dict[str, tuple[list[str], str | None, str | None, int]] = {
    "fp32": (["--dtype", "float32", "--quantization", "none"], "fp32", "fp32", 1),
    "bf16": (["--dtype", "bfloat16", "--quantization", "none"], "bf16", "bf16", 1),
    "default": ([], None, None, 1),
    # 3 ranks: the built-in model's 9 heads and 3 KV heads split only by 3 or 9
    "tp3": (["--tensor-parallel-size", "3", "--allow-more-ranks-than-cores"], None, None, 3),
}


def profile(path: Path, threads: int, quick: bool) -> None:
    command = [sys.executable, "-m", "tokenmill.cli", "profile", "--threads", str(threads),
               "--output", str(path)] + (["--quick"] if quick else [])
    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    print(f"profiling: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=REPO, env=env, check=True)


def bench(url: str, levels: list[int], args: argparse.Namespace, out: Path) -> dict[int, dict]:
    """Each level alone, with enough requests for a few rounds of the batch."""
    summaries = {}
    for c in levels:
        num_requests = max(args.min_requests, args.rounds * c)
        summaries[c] = run_levels(url, [c], num_requests, args.input_len, args.output_len,
                                  out / f"c{c}")[0]["summary"]
    return summaries


def report(name: str, summaries: dict[int, dict], hardware, args: argparse.Namespace,
           ratios: list[float]) -> None:
    _, weight_dtype, compute, tp = CONFIGS[name]
    arch = find_model(None)
    context = args.input_len + args.output_len // 2
    print(f"\n{name}: {' '.join(CONFIGS[name][0]) or '(no flags)'}; context ~{context}"
          + (f"; planned with --tp {tp}" if tp > 1 else ""))
    decode = hardware.decode
    if tp > 1 and decode is not None:
        if decode.communication is None:
            print("  note: the profile has no TP collectives measured (an older profile?): "
                  "communication is left out")
        if max(1, args.threads // tp) != decode.threads:
            print(f"  note: each rank runs {max(1, args.threads // tp)} thread(s), the kernel "
                  f"tables were measured with {decode.threads}: run with --threads 1")
    print(f"{'batch':>6} {'predicted tok/s':>16} {'measured tok/s':>15} {'meas/pred':>10}"
          f" {'via TPOT p50':>13} {'meas/pred':>10}   predicted step")
    for c, summary in summaries.items():
        inputs = PlanInputs(arch, hardware, weight_dtype, compute or "bf16", tp=tp, batch_size=c,
                            context_p50=context, context_p95=context, compute_dtype=compute)
        if compute is None:  # KV is held in the compute dtype that --dtype auto picks
            inputs = dataclasses.replace(inputs, kv_dtype=inputs.resolved_compute_dtype)
        result = plan(inputs)
        step, _ = decode_step(inputs, c, context)
        predicted = result.decode_tokens_per_s
        itl, tpot = summary["itl_ms"]["p50"], summary["tpot_ms"]["p50"]
        measured = c / (itl / 1000) if itl else float("nan")
        via_tpot = c / (tpot / 1000) if tpot else float("nan")
        parts = result.decode_breakdown or {}
        detail = " + ".join(f"{k} {v * 1e3:.1f}" for k, v in parts.items())
        print(f"{c:>6} {predicted:16.1f} {measured:15.1f} {measured / predicted:10.2f}"
              f" {via_tpot:13.1f} {via_tpot / predicted:10.2f}   {step * 1e3:.1f} ms"
              + (f" ({detail})" if detail else ""))
        ratios.append(measured / predicted)
        if tp > 1 and itl:  # what the prediction misses, if the collectives were all of it
            from tokenmill.bench.communication import num_all_reduces

            collectives = num_all_reduces(arch) + 1
            communication = parts.get("communication", 0.0)
            implied = (itl / 1000 - (step - communication)) / collectives
            print(f"{'':>6} if the gap were all collectives: {implied * 1e3:.2f} ms per "
                  f"collective (predicted {communication / collectives * 1e3:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None,
                        help="bench this running server (one config, see --configs) instead "
                             "of starting tokenmill serve")
    parser.add_argument("--configs", default="fp32,bf16,default",
                        help="comma-separated: fp32, bf16, default, tp3")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--rounds", type=int, default=2,
                        help="requests per level = rounds x concurrency (at least "
                             "--min-requests)")
    parser.add_argument("--min-requests", type=int, default=6)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=96)
    parser.add_argument("--threads", type=int, default=2, help="threads of server and profile")
    parser.add_argument("--kv-cache-memory", type=int, default=2**28)
    parser.add_argument("--profile-path", type=Path, default=default_profile_path())
    parser.add_argument("--reuse-profile", action="store_true",
                        help="use the profile at --profile-path instead of measuring again")
    parser.add_argument("--quick-profile", action="store_true", help="profile --quick")
    parser.add_argument("--output-dir", type=Path, default=None)
    args = parser.parse_args()
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown or not names or (args.base_url and len(names) != 1):
        parser.error(f"--configs takes one or more of {', '.join(CONFIGS)} (exactly one with "
                     "--base-url)")
    levels = [int(c) for c in args.concurrency.split(",")]

    load_before = os.getloadavg()[0]
    if not (args.reuse_profile and args.profile_path.is_file()):
        profile(args.profile_path, args.threads, args.quick_profile)
    hardware = load_profile(args.profile_path)
    if hardware.decode is None:
        print("note: the profile has no decode figures; predictions are the roofline")
    else:
        from tokenmill.layers.kernels.quant_matmul import kernel_isa

        if hardware.decode.kernel_isa != kernel_isa():
            print(f"WARNING: the profile timed the {hardware.decode.kernel_isa!r} quantized "
                  f"kernel, the server will run {kernel_isa()!r}: profile again")
    out = args.output_dir or Path(tempfile.mkdtemp(prefix="predict-vs-measure-"))
    results = {}
    for name in names:
        if args.base_url:
            results[name] = bench(args.base_url, levels, args, out / name)
            continue
        with launched_server(args.threads, args.kv_cache_memory, *CONFIGS[name][0]) as url:
            results[name] = bench(url, levels, args, out / name)

    print(f"\nbuilt-in model on {cpu_name()}; {args.threads} threads; {args.input_len}-token "
          f"prompts, {args.output_len} output tokens; profile {args.profile_path} "
          f"({hardware.source}); load average {load_before:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after; bench reports in {out}/")
    ratios: list[float] = []
    for name in names:
        report(name, results[name], hardware, args, ratios)
    inside = sum(0.8 <= r <= 1.25 for r in ratios)
    print(f"\n{inside} of {len(ratios)} measured/predicted ratios within 0.8-1.25 "
          f"(min {min(ratios):.2f}, max {max(ratios):.2f})")


if __name__ == "__main__":
    main()
