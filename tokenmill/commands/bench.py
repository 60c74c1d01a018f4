"""`tokenmill bench`: load-test any OpenAI-compatible server; `--compare a.json b.json` two runs."""

from __future__ import annotations

import argparse
import datetime as dt
from pathlib import Path

from tokenmill.errors import BenchError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench",
        help="measure throughput, latency, goodput and cost of an OpenAI-compatible server",
        description="Load-test an OpenAI-compatible server (tokenmill, llama.cpp, vLLM, ...) over "
                    "streaming HTTP. Writes results.json, report.md and PNG plots.")
    p.add_argument("--base-url", help="server root, e.g. http://127.0.0.1:8000 (a trailing /v1 "
                                      "is accepted)")
    p.add_argument("--model", help="model name to request; default: the first of GET /v1/models")
    p.add_argument("--api-key", help="sent as 'Authorization: Bearer KEY'")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                   help="print two earlier runs side by side with ratios B/A, then exit")

    load = p.add_argument_group("load")
    load.add_argument("--concurrency", help="requests in flight, a sweep: e.g. 1,4,16")
    load.add_argument("--request-rate", help="arrivals per second, a sweep: e.g. 1,2,inf")
    load.add_argument("--arrival", choices=("poisson", "constant"), default="poisson",
                      help="arrival process for --request-rate (default: poisson)")
    load.add_argument("--max-concurrency", type=int, default=None,
                      help="cap on requests in flight under --request-rate")
    load.add_argument("--num-requests", type=int, default=None,
                      help="requests per level (default 32 unless --duration)")
    load.add_argument("--duration", type=float, default=None, help="seconds of sending per level")
    load.add_argument("--warmup", type=int, default=0, help="unmeasured requests sent first")
    load.add_argument("--timeout", type=float, default=600.0, help="seconds per request")

    wl = p.add_argument_group("workload")
    wl.add_argument("--workload", default="synthetic",
                    choices=("synthetic", "shared-prefix", "chat", "jsonl"))
    wl.add_argument("--input-len", default="256",
                    help="prompt tokens: N, fixed:N, uniform:LO,HI or normal:MEAN,STD")
    wl.add_argument("--output-len", default="64", help="max_tokens per request, same forms")
    wl.add_argument("--num-groups", type=int, default=4, help="shared-prefix: number of prefixes")
    wl.add_argument("--prefix-len", type=int, default=1024, help="shared-prefix: prefix tokens")
    wl.add_argument("--chat-turns", type=int, default=1, help="chat: turns per conversation")
    wl.add_argument("--dataset", help="jsonl: a file with {'prompt': ...} or {'messages': [...]}")
    wl.add_argument("--tokenizer", help="tokenizer.json (or its folder) for counting prompt "
                                        "tokens; default: tokenmill's built-in model's")
    wl.add_argument("--seed", type=int, default=0)
    wl.add_argument("--ignore-eos", action="store_true",
                    help="ask the server to always produce max_tokens (vLLM/llama.cpp extension)")
    wl.add_argument("--no-usage", action="store_true",
                    help="do not send stream_options.include_usage (for servers that reject it)")

    out = p.add_argument_group("goodput, cost and output")
    out.add_argument("--slo-ttft-ms", type=float, help="goodput: TTFT limit in ms")
    out.add_argument("--slo-tpot-ms", type=float, help="goodput: TPOT limit in ms")
    out.add_argument("--slo-e2e-ms", type=float, help="goodput: end-to-end limit in ms")
    out.add_argument("--price-per-hour", type=float,
                     help="what the serving machine(s) cost per hour, in $")
    out.add_argument("--hardware", help="take an *example* price from this catalog entry instead")
    out.add_argument("--num-devices", type=int, default=1, help="devices billed with --hardware")
    out.add_argument("--output-dir", type=Path,
                     help="where to write results (default: ./tokenmill-bench-<time>)")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _compare(paths: list[str]) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmill.bench.report import compare_rows, load_record

    a, b = (load_record(path) for path in paths)
    table = Table(title=f"A = {paths[0]}   B = {paths[1]}")
    for header in ("level", "metric", "A", "B", "B/A"):
        table.add_column(header, justify="left" if header in ("level", "metric") else "right")
    for row in compare_rows(a, b):
        table.add_row(*row)
    Console().print(table)
    return 0


def run(args: argparse.Namespace) -> int:
    if args.compare:
        return _compare(args.compare)
    if not args.base_url:
        raise BenchError("--base-url is required (or use --compare A.json B.json)")

    from rich.console import Console

    from tokenmill.bench.client import Target, normalize_base_url
    from tokenmill.bench.metrics import SLO
    from tokenmill.bench.pricing import resolve_price
    from tokenmill.bench.report import print_table
    from tokenmill.bench.runner import LoadLevel, Stop
    from tokenmill.bench.session import BenchOptions, run_bench
    from tokenmill.bench.workload import LengthDist, WorkloadSpec, parse_number_list

    if args.concurrency and args.request_rate:
        raise BenchError("give --concurrency or --request-rate, not both")
    levels: list[LoadLevel] = []
    if args.request_rate:
        levels = [LoadLevel("rate", v, args.arrival, args.max_concurrency)
                  for v in parse_number_list(args.request_rate, what="--request-rate",
                                             allow_inf=True)]
    else:
        levels = [LoadLevel("concurrency", v)
                  for v in parse_number_list(args.concurrency or "1", what="--concurrency")]
    if args.max_concurrency is not None and args.max_concurrency < 1:
        raise BenchError(f"--max-concurrency={args.max_concurrency} must be at least 1")
    num_requests = args.num_requests
    if num_requests is None and args.duration is None:
        num_requests = 32
    stop = Stop(num_requests=num_requests, duration_s=args.duration)
    if args.warmup < 0:
        raise BenchError(f"--warmup={args.warmup} must be >= 0")
    if not args.timeout > 0:
        raise BenchError(f"--timeout={args.timeout} must be > 0 seconds")

    def ms(value: float | None) -> float | None:
        return None if value is None else value / 1000.0

    output_dir = args.output_dir or Path(
        f"tokenmill-bench-{dt.datetime.now().strftime('%Y%m%d-%H%M%S')}")
    options = BenchOptions(
        target=Target(normalize_base_url(args.base_url), args.model,
                      send_usage_request=not args.no_usage, ignore_eos=args.ignore_eos,
                      api_key=args.api_key),
        levels=levels,
        stop=stop,
        workload=WorkloadSpec(
            kind=args.workload,
            input_len=LengthDist.parse(args.input_len, what="--input-len"),
            output_len=LengthDist.parse(args.output_len, what="--output-len"),
            num_groups=args.num_groups, prefix_len=args.prefix_len, chat_turns=args.chat_turns,
            dataset=args.dataset, seed=args.seed),
        tokenizer=args.tokenizer,
        slo=SLO(ms(args.slo_ttft_ms), ms(args.slo_tpot_ms), ms(args.slo_e2e_ms)),
        price=resolve_price(args.price_per_hour, args.hardware, args.num_devices),
        output_dir=output_dir,
        warmup=args.warmup,
        request_timeout_s=args.timeout,
        show_progress=not args.quiet,
    )
    console = Console()
    if not console.is_terminal:  # piped to a file: keep each level on one row
        console = Console(width=220)
    outcome = run_bench(options, console)
    print_table(outcome.record, console)
    if options.price is not None and options.price.is_example:
        console.print(f"[yellow]cost uses an example price: {options.price.source}; pass "
                      "--price-per-hour for yours[/yellow]")
    console.print(f"wrote {', '.join(outcome.files)} to {outcome.output_dir}")
    if outcome.problem:
        raise BenchError(outcome.problem)
    return 0
