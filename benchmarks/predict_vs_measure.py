"""Planner prediction vs measurement: plan the built-in model on this machine, bench a server.

    .venv/bin/python benchmarks/predict_vs_measure.py --base-url http://127.0.0.1:8000

The server at --base-url should serve the built-in model (e.g. `tokenmill serve`). Uses the
profile at ~/.cache/tokenmill/hardware.json (measured first when missing). For each concurrency
level it prints the roofline decode throughput the planner predicts at that batch size and the
measured one (concurrency ÷ TPOT p50, i.e. decode only) with their ratio.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from tokenmill.bench.catalog import find_model
from tokenmill.bench.client import Target, normalize_base_url
from tokenmill.bench.hardware import default_profile_path, load_profile, save_profile
from tokenmill.bench.plan import PlanInputs, plan
from tokenmill.bench.profile import profile_machine
from tokenmill.bench.runner import LoadLevel, Stop
from tokenmill.bench.session import BenchOptions, run_bench
from tokenmill.bench.workload import LengthDist, WorkloadSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--concurrency", default="1,4")
    parser.add_argument("--num-requests", type=int, default=16)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--dtype", default="fp32", help="the engine's compute dtype")
    parser.add_argument("--profile-path", type=Path, default=default_profile_path())
    args = parser.parse_args()

    if not args.profile_path.is_file():
        save_profile(profile_machine(), args.profile_path)
    hardware = load_profile(args.profile_path)
    arch = find_model(None)
    levels = [int(c) for c in args.concurrency.split(",")]
    with tempfile.TemporaryDirectory() as out:
        outcome = run_bench(BenchOptions(
            target=Target(normalize_base_url(args.base_url), None, ignore_eos=True),
            levels=[LoadLevel("concurrency", float(c)) for c in levels],
            stop=Stop(num_requests=args.num_requests),
            workload=WorkloadSpec(input_len=LengthDist("fixed", args.input_len),
                                  output_len=LengthDist("fixed", args.output_len)),
            output_dir=Path(out), show_progress=False), Console())
    # Mean context during decode: the prompt plus half the output.
    context = args.input_len + args.output_len // 2
    print(f"{arch.name} on {hardware.name}, weights+KV {args.dtype}, context ~{context}")
    print(f"{'batch':>6} {'predicted tok/s':>16} {'measured tok/s':>15} {'measured/predicted':>19}")
    for c, lv in zip(levels, outcome.record["levels"], strict=False):
        predicted = plan(PlanInputs(arch, hardware, args.dtype, args.dtype, batch_size=c,
                                    context_p50=context, context_p95=context)).decode_tokens_per_s
        tpot_ms = lv["summary"]["tpot_ms"]["p50"]
        measured = c / (tpot_ms / 1000) if tpot_ms else float("nan")
        print(f"{c:>6} {predicted:16.1f} {measured:15.1f} {measured / predicted:19.2f}")
    if outcome.problem:
        print(f"note: {outcome.problem}")


if __name__ == "__main__":
    main()
