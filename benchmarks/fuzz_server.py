"""Fuzz `tokenmill serve` from its own /openapi.json with schemathesis: the longer run.

    .venv/bin/python benchmarks/fuzz_server.py                          # starts a server itself
    .venv/bin/python benchmarks/fuzz_server.py --url http://127.0.0.1:8000 --examples 500
    .venv/bin/python benchmarks/fuzz_server.py --routes /v1/completions --seed 7

For every route (by default /v1/*, /tokenize, /detokenize, /dashboard/data, /health) it sends
--examples bodies that fit the schema and as many that break it, and checks every answer: no 5xx, a
documented status, the documented body (OpenAI's error shape for every 4xx), and every body that
breaks the schema refused (tokenmill/bench/fuzz.py lists the checks). It prints examples tried and
statuses per route, then failures per check with a few requests to reproduce each, and exits 1 if
any check failed. The suite runs the same thing with a few examples per route
(tests/server/test_fuzz_openapi.py).

Without --url it starts `tokenmill serve` on a free loopback port (--threads torch threads, a
256 MiB KV pool; --tokenmill-args adds flags) and stops it at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from serve_load import launched_server

from tokenmill.bench.fuzz import CHECK_NAMES, DEFAULT_ROUTES, RouteReport, fuzz_server


def print_route(report: RouteReport) -> None:
    statuses = ", ".join(f"{s}: {n}" for s, n in sorted(report.statuses.items()))
    print(f"{report.route:<40} {report.num_examples:>6} examples  {report.num_failures:>4} "
          f"failures  statuses {{{statuses}}}", flush=True)


def print_summary(reports: list[RouteReport], seconds: float) -> int:
    total = sum(r.num_examples for r in reports)
    print(f"\n{total} examples over {len(reports)} routes in {seconds:.0f} s")
    checks = list(CHECK_NAMES) + sorted({c for r in reports for c in r.failures} -
                                        set(CHECK_NAMES))
    num_failed = 0
    print("failures per check:")
    for check in checks:
        count = sum(r.failures.get(check, 0) for r in reports)
        num_failed += count
        print(f"  {check:<30} {count}")
    for report in reports:
        for check, samples in report.samples.items():
            print(f"\n{report.route}: {check} ({report.failures[check]}x), e.g.:")
            for sample in samples:
                print(f"  {sample}")
    return num_failed


def wait_ready(url: str, deadline_s: float) -> None:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(url + "/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    raise SystemExit(f"{url} did not become healthy within {deadline_s:.0f} s")


@contextlib.contextmanager
def server_url(args: argparse.Namespace) -> Iterator[str]:
    if args.url is not None:
        url = args.url.rstrip("/")
        wait_ready(url, 300)
        yield url
        return
    with launched_server(args.threads, 2**28, *args.tokenmill_args.split()) as url:
        print(f"started tokenmill serve on {url}", flush=True)
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", help="a running server (default: start one)")
    parser.add_argument("--examples", type=int, default=200,
                        help="examples per route and mode (positive, negative)")
    parser.add_argument("--routes", nargs="+", default=list(DEFAULT_ROUTES),
                        help="path prefixes to fuzz")
    parser.add_argument("--seed", type=int, default=None, help="repeat a run (default: random)")
    parser.add_argument("--positive-only", action="store_true",
                        help="only bodies that fit the schema")
    parser.add_argument("--max-output-tokens", type=int, default=4,
                        help="cap on generated max_tokens (keeps each request cheap)")
    parser.add_argument("--max-choices", type=int, default=2, help="cap on generated n")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the server")
    parser.add_argument("--tokenmill-args", default="", help="extra flags for tokenmill serve")
    args = parser.parse_args()

    with server_url(args) as url:
        started = time.monotonic()
        reports = fuzz_server(url, max_examples=args.examples, routes=args.routes,
                              seed=args.seed, negative=not args.positive_only,
                              max_output_tokens=args.max_output_tokens,
                              max_choices=args.max_choices, progress=print_route)
    num_failed = print_summary(reports, time.monotonic() - started)
    sys.exit(1 if num_failed else 0)


if __name__ == "__main__":
    main()
