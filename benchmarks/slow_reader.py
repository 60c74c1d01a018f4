"""Slow streaming readers must not cost anyone else: other clients' TPOT and the server's memory,
with and without clients that read their stream one small chunk per second.

    .venv/bin/python benchmarks/slow_reader.py                       # 4 clients, 4 slow readers
    .venv/bin/python benchmarks/slow_reader.py --slow-readers 8 --slow-max-tokens 2000

One `tokenmill serve` is started (alone on the machine: run nothing else). Phase 1 measures
--concurrency streaming clients with `tokenmill bench` (benchmarks/serve_load.py's machinery).
Phase 2 opens --slow-readers streaming requests on raw sockets with a small receive buffer, each
reading --chunk-bytes per second, and measures the same clients again while they hang on. The
server's resident memory is sampled all along. Unread outputs are coalesced per request in the
server (docs/robustness.md), so memory stays flat; a reader past --max-unread-tokens is aborted.
Prints TPOT and throughput of both phases, peak RSS of each phase, and how the slow streams ended.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import cpu_name, free_port, launched, run_levels, tokenmill_command


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssSampler(threading.Thread):
    def __init__(self, pid: int):
        super().__init__(daemon=True)
        self.pid, self.peak, self.stop_event = pid, 0, threading.Event()

    def run(self) -> None:
        while not self.stop_event.wait(0.2):
            self.peak = max(self.peak, rss_bytes(self.pid))

    def take_peak(self) -> int:
        peak, self.peak = max(self.peak, rss_bytes(self.pid)), 0
        return peak


def slow_reader(port: int, model: str, max_tokens: int, chunk_bytes: int, stop: threading.Event,
                outcome: list[str]) -> None:
    body = json.dumps({"model": model, "prompt": "Tell me a very long story.", "stream": True,
                       "max_tokens": max_tokens, "ignore_eos": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    while not stop.wait(1.0):
        chunk = sock.recv(chunk_bytes)
        if not chunk:
            break
        received += chunk
    sock.close()
    if b'"timeout_error"' in received:
        outcome.append("aborted by the server (max_unread_tokens)")
    elif b"[DONE]" in received:
        outcome.append("finished")
    else:
        outcome.append("still streaming when the run ended")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=24, help="per phase")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--slow-readers", type=int, default=4)
    parser.add_argument("--slow-max-tokens", type=int, default=1500)
    parser.add_argument("--chunk-bytes", type=int, default=64, help="read per second")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--kv-cache-memory", type=int, default=2**29)
    parser.add_argument("--tokenmill-args", default="", help="extra flags for tokenmill serve")
    parser.add_argument("--output-dir", type=Path, default=Path("runs/slow_reader"))
    args = parser.parse_args()

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "TOKENMILL_NUM_THREADS": str(args.threads),
           "OMP_NUM_THREADS": str(args.threads)}
    command = tokenmill_command(port, args.kv_cache_memory, args.tokenmill_args.split())
    with launched("slow-reader", command, url, env) as process:
        import httpx

        model = httpx.get(url + "/v1/models").json()["data"][0]["id"]
        sampler = RssSampler(process.pid)
        sampler.start()
        start_rss = rss_bytes(process.pid)
        [alone] = run_levels(url, [args.concurrency], args.num_requests, args.input_len,
                             args.output_len, args.output_dir / "alone")
        peak_alone = sampler.take_peak()
        stop, outcomes = threading.Event(), []
        readers = [threading.Thread(target=slow_reader, daemon=True,
                                    args=(port, model, args.slow_max_tokens, args.chunk_bytes,
                                          stop, outcomes)) for _ in range(args.slow_readers)]
        for reader in readers:
            reader.start()
        [beside] = run_levels(url, [args.concurrency], args.num_requests, args.input_len,
                              args.output_len, args.output_dir / "beside-slow-readers", warmup=0)
        peak_beside = sampler.take_peak()
        stop.set()
        for reader in readers:
            reader.join(10)
        end_rss = rss_bytes(process.pid)
        sampler.stop_event.set()

    a, b = alone["summary"], beside["summary"]
    print(f"\nCPU: {cpu_name()}; {args.concurrency} clients, {args.input_len}-token prompts, "
          f"{args.output_len} output tokens, {args.num_requests} requests per phase; "
          f"{args.slow_readers} slow readers ({args.chunk_bytes} B/s, max_tokens "
          f"{args.slow_max_tokens})")
    print(f"{'':<26}{'alone':>12}{'beside slow':>14}{'ratio':>8}")
    print(f"{'TPOT p50 ms':<26}{a['tpot_ms']['p50']:>12.2f}{b['tpot_ms']['p50']:>14.2f}"
          f"{b['tpot_ms']['p50'] / a['tpot_ms']['p50']:>8.3f}")
    print(f"{'output tok/s':<26}{a['output_tokens_per_s']:>12.1f}{b['output_tokens_per_s']:>14.1f}"
          f"{b['output_tokens_per_s'] / a['output_tokens_per_s']:>8.3f}")
    print(f"server RSS: start {start_rss / 2**20:.0f} MiB, peak alone {peak_alone / 2**20:.0f} "
          f"MiB, peak beside slow readers {peak_beside / 2**20:.0f} MiB, end "
          f"{end_rss / 2**20:.0f} MiB")
    print("slow streams: " + ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes))))


if __name__ == "__main__":
    main()
