"""Load test of `tokenmill serve` with the issue's workload, through `tokenmill bench`.

    .venv/bin/python benchmarks/serve_load.py                       # starts its own server
    .venv/bin/python benchmarks/serve_load.py --base-url http://127.0.0.1:8000

Streaming /v1/completions, random-word prompts of 256 tokens, max_tokens 128 with ignore_eos,
temperature 0, at 1, 4 and 16 concurrent clients. Prints output tok/s, TTFT p50/p99 and TPOT
p50/p99 per level next to llama.cpp's `llama-server` (-t 2 -np 16, same GGUF) on this machine.
Without --base-url it starts `tokenmill serve` with --threads torch threads (the bench client runs
on the same 2 cores, so it competes with the engine) and stops it with SIGTERM at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
from rich.console import Console

from tokenmill.bench.client import Target, normalize_base_url
from tokenmill.bench.runner import LoadLevel, Stop
from tokenmill.bench.session import BenchOptions, run_bench
from tokenmill.bench.workload import LengthDist, WorkloadSpec

# llama.cpp's llama-server on this machine (issue 4): output tok/s, TTFT p50 (ms), TPOT p50 (ms)
LLAMA_CPP = {1: (55.0, None, 11.6), 16: (72.0, 11500.0, None)}


@contextlib.contextmanager
def launched_server(threads: int, kv_cache_bytes: int, *extra: str) -> Iterator[str]:
    """`tokenmill serve` on a free loopback port; yields its URL, SIGTERMs it afterwards."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(threads), "OMP_NUM_THREADS": str(threads)}
    log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - must outlive this frame: the server writes it
        "w", prefix="serve-load-", suffix=".log", delete=False)
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenmill.cli", "serve", "--port", str(port),
         "--kv-cache-memory", str(kv_cache_bytes), *extra],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if process.poll() is not None:
                raise SystemExit(f"tokenmill serve exited; see {log.name}")
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(url + "/health").status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise SystemExit(f"tokenmill serve not ready; see {log.name}")
            time.sleep(0.2)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(120)
        log.close()


def run_levels(base_url: str, levels: list[int], num_requests: int, input_len: int,
               output_len: int, output_dir: Path) -> list[dict]:
    outcome = run_bench(BenchOptions(
        target=Target(normalize_base_url(base_url), None, ignore_eos=True),
        levels=[LoadLevel("concurrency", float(c)) for c in levels],
        stop=Stop(num_requests=num_requests),
        workload=WorkloadSpec(input_len=LengthDist("fixed", input_len),
                              output_len=LengthDist("fixed", output_len)),
        output_dir=output_dir, warmup=2, show_progress=False), Console(stderr=True))
    if outcome.problem:
        print(f"note: {outcome.problem}")
    return outcome.record["levels"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default=None, help="bench a running server instead")
    parser.add_argument("--threads", type=int, default=2, help="torch threads of the server")
    parser.add_argument("--concurrency", default="1,4,16")
    parser.add_argument("--num-requests", type=int, default=32, help="per level")
    parser.add_argument("--input-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=128)
    parser.add_argument("--output-dir", type=Path, default=Path("runs/serve_load"))
    parser.add_argument("--dtype", default="float32", help="the launched server's --dtype")
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]

    with contextlib.ExitStack() as stack:
        url = args.base_url or stack.enter_context(launched_server(args.threads, 2**29,
                                                                        "--dtype", args.dtype))
        results = run_levels(url, levels, args.num_requests, args.input_len, args.output_len,
                             args.output_dir)
    print(f"\ntokenmill serve ({'external' if args.base_url else f'{args.threads} threads'}, "
          f"{args.dtype}), "
          f"{args.input_len}-token prompts, {args.output_len} output tokens, "
          f"{args.num_requests} requests per level; full report in {args.output_dir}/")
    print(f"{'clients':>8} {'out tok/s':>10} {'TTFT p50':>10} {'TTFT p99':>10} "
          f"{'TPOT p50':>10} {'TPOT p99':>10} {'errors':>7} | llama.cpp tok/s, TTFT p50, TPOT p50")
    for c, level in zip(levels, results, strict=False):
        s = level["summary"]
        ref = LLAMA_CPP.get(c)
        ref_text = ("" if ref is None else
                    f"{ref[0]:.0f} tok/s" + (f", {ref[1]:.0f} ms" if ref[1] else "")
                    + (f", TPOT {ref[2]:.1f} ms" if ref[2] else ""))
        print(f"{c:>8} {s['output_tokens_per_s']:>10.1f} {s['ttft_ms']['p50']:>8.0f}ms "
              f"{s['ttft_ms']['p99']:>8.0f}ms {s['tpot_ms']['p50']:>8.1f}ms "
              f"{s['tpot_ms']['p99']:>8.1f}ms {s['num_errors']:>7} | {ref_text}")


if __name__ == "__main__":
    main()
