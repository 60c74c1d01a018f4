"""Soak `tokenmill serve`: thousands of mixed requests above capacity, then prove it came back clean.

    .venv/bin/python benchmarks/soak.py                          # starts its own server (~5 min)
    .venv/bin/python benchmarks/soak.py --num-requests 300       # a short run
    .venv/bin/python benchmarks/soak.py --base-url http://127.0.0.1:8000 --server-pid 1234

The mix (tokenmill/bench/soak.py): completions and chat, streamed or not, random prompt lengths,
max_tokens and n (1..4), three long shared system prompts (prefix-cache hits), ~20% of clients
disconnecting at random points, at a concurrency above what the server holds (running + waiting
queue), so 429s are expected. A warm-up pass (same mix, other seed) comes first; RSS after it is
the baseline. At the end the server's own /metrics and /dashboard/data must say running = waiting =
0 and no KV block in use, and RSS must be back within --rss-margin of the baseline
(tokenmill/bench/soak_checks.py). Exit code 1 if any check fails (or any 5xx, or any request not
done / 429 / aborted by its client).

Started here, the server gets a small running batch and waiting queue (--max-num-seqs,
--max-waiting-requests) so that --concurrency clients overload it. Against --base-url, choose
--concurrency above that server's max_num_seqs + max_waiting_requests (counted in choices: a
request with n=4 takes 4); RSS is checked only with --server-pid.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import httpx
from serve_load import free_port, launched, tokenmill_command

from tokenmill.bench.soak import SoakMix, SoakTally, plan_requests, run_soak
from tokenmill.bench.soak_checks import RssMonitor, final_checks, mib, wait_idle

# Measured on the 2-core development machine (built-in model, 1 torch thread, these defaults):
# about 3.5 requests/s end (done, 429 or aborted), so 1000 requests take about 5 minutes.
DEFAULT_NUM_REQUESTS = 1000


@contextlib.contextmanager
def server(args: argparse.Namespace) -> Iterator[tuple[str, int | None]]:
    """(base URL, pid or None): the given server, or a fresh `tokenmill serve` on loopback."""
    if args.base_url:
        yield args.base_url.rstrip("/").removesuffix("/v1"), args.server_pid
        return
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    threads = str(args.threads)
    env = {**os.environ, "TOKENMILL_NUM_THREADS": threads, "OMP_NUM_THREADS": threads}
    extra = ["--max-num-seqs", str(args.max_num_seqs),
             "--max-waiting-requests", str(args.max_waiting_requests)]
    with launched("tokenmill", tokenmill_command(port, args.kv_cache_memory, extra), url,
                  env) as process:
        yield url, process.pid


def progress_printer(rss: RssMonitor | None) -> Callable[[SoakTally], None]:
    def show(tally: SoakTally) -> None:
        memory = f"  RSS {mib(rss.read())}" if rss is not None else ""
        print(f"  {tally.duration_s:6.0f} s  sent {tally.num_sent}  "
              + "  ".join(f"{k} {v}" for k, v in sorted(tally.outcomes.items())) + memory,
              flush=True)
    return show


async def warm_up(args: argparse.Namespace, url: str, model: str, rss: RssMonitor | None
                  ) -> int | None:
    """Rounds of the mix until RSS stops growing (KV pages are touched lazily, so the first
    rounds grow it by up to the KV pool); the RSS after the last round (None without a pid)."""
    previous = rss.read() if rss is not None else None
    for round_index in range(args.max_warmup_rounds):
        mix = SoakMix(seed=args.seed + 1 + round_index, abort_fraction=args.abort_fraction)
        tally = await run_soak(url, plan_requests(mix, args.warmup_requests, model),
                               args.concurrency)
        await wait_idle(url, args.idle_deadline)
        if rss is None or previous is None:
            return None
        current = rss.read()
        print(f"warm-up round {round_index + 1}: {tally.outcomes['done']} done, RSS "
              f"{mib(current)} ({current / previous - 1:+.1%})", flush=True)
        if current <= previous * (1 + args.warmup_plateau):
            return current
        previous = current
    print(f"note: RSS still grew in the last of {args.max_warmup_rounds} warm-up rounds")
    return previous


async def soak(args: argparse.Namespace, url: str, pid: int | None) -> int:
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
    rss = RssMonitor(pid) if pid is not None else None
    print(f"warm-up: rounds of {args.warmup_requests} requests at concurrency "
          f"{args.concurrency}", flush=True)
    rss_baseline = await warm_up(args, url, model, rss)
    before, _ = await wait_idle(url, args.idle_deadline)

    print(f"soak: {args.num_requests} requests at concurrency {args.concurrency} against {url}",
          flush=True)
    if rss is not None:
        rss.peak = 0
        rss.start()
    mix = SoakMix(seed=args.seed, abort_fraction=args.abort_fraction)
    tally = await run_soak(url, plan_requests(mix, args.num_requests, model), args.concurrency,
                           request_timeout_s=args.request_timeout,
                           on_progress=progress_printer(rss))
    state, waited = await wait_idle(url, args.idle_deadline)
    rss_final = None
    if rss is not None:
        rss.stop()
        rss_final = rss.read()
    async with httpx.AsyncClient(base_url=url, timeout=30.0) as client:
        health = (await client.get("/health")).status_code

    print("\nrequests:")
    for key, value in tally.summary().items():
        print(f"  {key:<26} {value}")
    print(f"  {'idle after (s)':<26} {waited:.1f}")
    finished = {reason: int(count - before.finished_by_reason.get(reason, 0))
                for reason, count in sorted(state.finished_by_reason.items())}
    print(f"  {'server: finished choices':<26} {json.dumps(finished)}")
    if rss is not None and rss_baseline is not None and rss_final is not None:
        print(f"  {'RSS after warm-up':<26} {mib(rss_baseline)}")
        print(f"  {'RSS peak':<26} {mib(rss.peak)}")
        print(f"  {'RSS final':<26} {mib(rss_final)}")
    else:
        print("  RSS                        not measured (give --server-pid)")
    print(f"  {'KV blocks in use at end':<26} {state.num_blocks_in_use} of "
          f"{state.num_kv_blocks:g}")
    for outcome, examples in tally.examples.items():
        print(f"\nexamples of {outcome}:")
        for example in examples:
            print(f"  {example}")

    checks = final_checks(tally, state, rss_baseline=rss_baseline, rss_final=rss_final,
                          rss_margin=args.rss_margin)
    print("\nchecks:")
    for check in checks:
        print(f"  {'ok  ' if check.ok else 'FAIL'} {check.name}: {check.detail}")
    healthy = health == 200
    print(f"  {'ok  ' if healthy else 'FAIL'} /health after the soak: {health}")
    return 0 if healthy and all(c.ok for c in checks) else 1


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", help="soak a running server instead of starting one")
    parser.add_argument("--server-pid", type=int, help="its pid, to read RSS (with --base-url)")
    parser.add_argument("--num-requests", type=int, default=DEFAULT_NUM_REQUESTS)
    parser.add_argument("--warmup-requests", type=int, default=60,
                        help="requests per warm-up round")
    parser.add_argument("--max-warmup-rounds", type=int, default=4)
    parser.add_argument("--warmup-plateau", type=float, default=0.02,
                        help="warm-up ends when a round grows RSS by less than this fraction")
    parser.add_argument("--concurrency", type=int, default=24,
                        help="clients; above running + waiting capacity (in choices)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--abort-fraction", type=float, default=0.2,
                        help="share of clients that disconnect at a random point")
    parser.add_argument("--rss-margin", type=float, default=0.15,
                        help="final RSS may exceed the post-warm-up RSS by this fraction")
    parser.add_argument("--idle-deadline", type=float, default=60.0,
                        help="seconds to wait for the server to report itself idle")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    started = parser.add_argument_group("the server started here")
    started.add_argument("--threads", type=int, default=1, help="its torch threads")
    started.add_argument("--kv-cache-memory", type=int, default=2**28)
    started.add_argument("--max-num-seqs", type=int, default=8)
    started.add_argument("--max-waiting-requests", type=int, default=16)
    args = parser.parse_args()
    with server(args) as (url, pid):
        return asyncio.run(soak(args, url, pid))


if __name__ == "__main__":
    sys.exit(main())
