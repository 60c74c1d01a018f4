"""How fast can `tokenmill bench` drive a server? Against a zero-delay fake, the client limits.

Run from the repo root: .venv/bin/python benchmarks/bench_client_overhead.py
Prints requests/s and streamed chunks/s per concurrency level; a real server far below these figures
is measured faithfully, one near them is partly measuring the client.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from rich.console import Console

from tests.bench.fake_openai import FakeOpenAI, ServerThread
from tokenmill.bench.client import Target
from tokenmill.bench.runner import LoadLevel, Stop
from tokenmill.bench.session import BenchOptions, run_bench
from tokenmill.bench.workload import LengthDist, WorkloadSpec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", default="1,8,32")
    parser.add_argument("--num-requests", type=int, default=200)
    parser.add_argument("--output-len", type=int, default=32)
    args = parser.parse_args()
    fake = FakeOpenAI()
    server = ServerThread(fake.app)
    server.start()
    try:
        with tempfile.TemporaryDirectory() as out:
            outcome = run_bench(BenchOptions(
                target=Target(server.url, None),
                levels=[LoadLevel("concurrency", float(c)) for c in args.concurrency.split(",")],
                stop=Stop(num_requests=args.num_requests),
                workload=WorkloadSpec(input_len=LengthDist("fixed", 32),
                                      output_len=LengthDist("fixed", args.output_len)),
                output_dir=Path(out), show_progress=False), Console())
    finally:
        server.stop()
    print(f"fake server and client share this machine; {args.output_len} chunks per request")
    print(f"{'level':>8} {'req/s':>9} {'chunks/s':>10} {'TTFT p50 ms':>12} {'ITL p50 ms':>11}")
    for lv in outcome.record["levels"]:
        s = lv["summary"]
        print(f"{lv['level']['label']:>8} {s['request_throughput']:9.1f} "
              f"{s['output_tokens_per_s']:10.0f} {s['ttft_ms']['p50']:12.2f} "
              f"{s['itl_ms']['p50']:11.3f}")


if __name__ == "__main__":
    main()
