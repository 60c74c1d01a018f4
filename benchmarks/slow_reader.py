"""Slow streaming readers must not cost anyone else: other clients' TPOT and the server's memory,
with and without clients that read their stream one small chunk per second.

    .venv/bin/python benchmarks/slow_reader.py                       # 4 clients, 4 slow readers
    .venv/bin/python benchmarks/slow_reader.py --rounds 3       # medians, alternating order
    .venv/bin/python benchmarks/slow_reader.py --slow-readers 8 --slow-max-tokens 2000

One `tokenmill serve` is started (alone on the machine: run nothing else). Each phase measures
--concurrency streaming clients with `tokenmill bench` (benchmarks/serve_load.py's machinery):
alone; beside --slow-readers extra long streams read at full speed (the same extra work for the
engine); and beside as many streams read --chunk-bytes per second on raw sockets with a small
receive buffer. A slow reader must cost what a fast one costs: its unread outputs are coalesced in
the server (docs/robustness.md), so the last two phases should show the same TPOT and no more
memory. The server's resident memory is sampled all along (the fast phase runs first, so KV pages
the extra streams touch are already resident when the slow phase starts).
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


def extra_stream(port: int, model: str, max_tokens: int, chunk_bytes: int | None,
                 stop: threading.Event, outcome: list[str]) -> None:
    """One long stream: read ``chunk_bytes`` a second (None: as fast as it comes, and start
    another when it ends, so the engine's extra work lasts the whole phase)."""
    while not stop.is_set():
        _one_stream(port, model, max_tokens, chunk_bytes, stop, outcome)
        if chunk_bytes is not None:
            return


def _one_stream(port: int, model: str, max_tokens: int, chunk_bytes: int | None,
                stop: threading.Event, outcome: list[str]) -> None:
    body = json.dumps({"model": model, "prompt": "Tell me a very long story.", "stream": True,
                       "max_tokens": max_tokens, "ignore_eos": True}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    received = b""
    sock.settimeout(1.0)
    while not stop.wait(1.0 if chunk_bytes is not None else 0):
        try:
            chunk = sock.recv(chunk_bytes or 65536)
        except TimeoutError:
            continue
        if not chunk or (chunk_bytes is None and b"[DONE]" in received[-64:] + chunk):
            received += chunk
            break
        received += chunk
    sock.close()
    if b'"timeout_error"' in received:
        outcome.append("aborted by the server (max_unread_tokens)")
    elif b"[DONE]" in received:
        outcome.append("finished")
    else:
        outcome.append("still streaming when the run ended")


def _median_run(runs: list[tuple[dict, int]]) -> tuple[dict, int]:
    """The run with the median TPOT, and the highest peak RSS of all."""
    ordered = sorted(runs, key=lambda run: run[0]["summary"]["tpot_ms"]["p50"])
    return ordered[len(ordered) // 2][0], max(peak for _, peak in runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--num-requests", type=int, default=24, help="per phase")
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--slow-readers", type=int, default=4)
    parser.add_argument("--slow-max-tokens", type=int, default=1500)
    parser.add_argument("--chunk-bytes", type=int, default=64, help="read per second")
    parser.add_argument("--rounds", type=int, default=1,
                        help="rounds of (fast, slow) phases, alternating their order")
    parser.add_argument("--slow-first", action="store_true",
                        help="run the slow-reader phase before the fast one in the first round")
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

        def beside(chunk_bytes: int | None, name: str) -> tuple[dict, int, list[str]]:
            stop, outcomes = threading.Event(), []
            readers = [threading.Thread(target=extra_stream, daemon=True,
                                        args=(port, model, args.slow_max_tokens, chunk_bytes,
                                              stop, outcomes))
                       for _ in range(args.slow_readers)]
            for reader in readers:
                reader.start()
            [level] = run_levels(url, [args.concurrency], args.num_requests, args.input_len,
                                 args.output_len, args.output_dir / name, warmup=0)
            peak = sampler.take_peak()
            stop.set()
            for reader in readers:
                reader.join(10)
            return level, peak, outcomes

        # Rounds alternate the order (a machine that warms up or gets busier evens out); the
        # figures are the medians over rounds.
        fast_runs, slow_runs, outcomes = [], [], []
        for round_index in range(args.rounds):
            slow_first = args.slow_first != (round_index % 2 == 1)
            for slow_phase in (True, False) if slow_first else (False, True):
                if slow_phase:
                    level, peak, ends = beside(args.chunk_bytes, f"slow-{round_index}")
                    slow_runs.append((level, peak))
                    outcomes += ends
                else:
                    fast_runs.append(beside(None, f"fast-{round_index}")[:2])
            print(f"round {round_index + 1}: TPOT p50 beside fast "
                  f"{fast_runs[-1][0]['summary']['tpot_ms']['p50']:.2f} ms, beside slow "
                  f"{slow_runs[-1][0]['summary']['tpot_ms']['p50']:.2f} ms", flush=True)
        fast, peak_fast = _median_run(fast_runs)
        slow, peak_slow = _median_run(slow_runs)
        end_rss = rss_bytes(process.pid)
        sampler.stop_event.set()

    a, f, s = alone["summary"], fast["summary"], slow["summary"]
    print(f"\nCPU: {cpu_name()}; {args.concurrency} clients, {args.input_len}-token prompts, "
          f"{args.output_len} output tokens, {args.num_requests} requests per phase; beside "
          f"{args.slow_readers} extra streams of max_tokens {args.slow_max_tokens}, read at full "
          f"speed or at {args.chunk_bytes} B/s")
    print(f"{'':<16}{'alone':>10}{'beside fast':>13}{'beside slow':>13}{'slow/fast':>11}")
    print(f"{'TPOT p50 ms':<16}{a['tpot_ms']['p50']:>10.2f}{f['tpot_ms']['p50']:>13.2f}"
          f"{s['tpot_ms']['p50']:>13.2f}{s['tpot_ms']['p50'] / f['tpot_ms']['p50']:>11.3f}")
    print(f"{'output tok/s':<16}{a['output_tokens_per_s']:>10.1f}"
          f"{f['output_tokens_per_s']:>13.1f}{s['output_tokens_per_s']:>13.1f}"
          f"{s['output_tokens_per_s'] / f['output_tokens_per_s']:>11.3f}")
    print(f"{'peak RSS MiB':<16}{peak_alone / 2**20:>10.0f}{peak_fast / 2**20:>13.0f}"
          f"{peak_slow / 2**20:>13.0f}{peak_slow / peak_fast:>11.3f}")
    print(f"server RSS: start {start_rss / 2**20:.0f} MiB, end {end_rss / 2**20:.0f} MiB")
    print("slow streams: " + ", ".join(f"{outcomes.count(o)} {o}" for o in sorted(set(outcomes))))


if __name__ == "__main__":
    main()
