"""One `tokenmill bench` run: warm up, run each load level, and always write what was measured."""

from __future__ import annotations

import asyncio
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tokenmill.bench.client import Target, discover_model
from tokenmill.bench.metrics import SLO
from tokenmill.bench.plot import write_plots
from tokenmill.bench.report import build_record, render_markdown, write_json
from tokenmill.bench.runner import LevelRun, LoadLevel, Stop, run_level, warm_up
from tokenmill.bench.tokens import CountingTokenizer, load_counting_tokenizer
from tokenmill.bench.workload import BenchRequest, WorkloadSpec, build_requests
from tokenmill.cost import Price
from tokenmill.errors import BenchError

DURATION_POOL_SIZE = 512  # prompts generated for a duration-bound run; reused round-robin


@dataclass
class BenchOptions:
    target: Target
    levels: list[LoadLevel]
    stop: Stop
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    tokenizer: str | None = None
    slo: SLO = field(default_factory=SLO)
    price: Price | None = None
    output_dir: Path = Path("tokenmill-bench")
    warmup: int = 0
    request_timeout_s: float = 600.0
    show_progress: bool = True


@dataclass
class BenchOutcome:
    record: dict[str, Any]
    output_dir: Path
    files: list[str]
    problem: str | None = None  # set when the run stopped early or every request failed


@dataclass
class RequestPlan:
    """The requests of the warm-up and of each level."""
    warmup: list[BenchRequest]
    levels: list[list[BenchRequest]]


def plan_requests(opts: BenchOptions, tokenizer: CountingTokenizer) -> RequestPlan:
    """Synthetic prompts are never sent twice in one run: the warm-up and every level get their
    own. Servers cache prompts (tokenmill's prefix cache, llama-server's slots, vLLM's APC), so a
    level that replays an earlier level's prompts gets its prefills from the cache and measures
    decode alone. A shared-prefix workload keeps its groups' prefixes across the run (that is its
    point) with new text after them. A JSONL dataset is replayed as it is at every level."""
    pool = opts.stop.num_requests or DURATION_POOL_SIZE
    if opts.workload.kind == "jsonl":
        requests = build_requests(opts.workload, tokenizer, pool)
        return RequestPlan(requests, [requests] * len(opts.levels))
    requests = build_requests(opts.workload, tokenizer, opts.warmup + pool * len(opts.levels))
    levels = [requests[opts.warmup + i * pool:opts.warmup + (i + 1) * pool]
              for i in range(len(opts.levels))]
    return RequestPlan(requests[:opts.warmup], levels)


def _client(opts: BenchOptions) -> httpx.AsyncClient:
    # Enough connections for the widest level, so the client never queues what the server should.
    widest = max((int(lv.value) if lv.mode == "concurrency" else (lv.max_concurrency or 0))
                 for lv in opts.levels)
    limits = httpx.Limits(max_connections=None if widest == 0 else widest + 4,
                          max_keepalive_connections=max(widest, 20))
    timeout = httpx.Timeout(opts.request_timeout_s, connect=10.0)
    return httpx.AsyncClient(limits=limits, timeout=timeout)


async def _run_all(opts: BenchOptions, plan: RequestPlan, runs: list[LevelRun],
                   config: dict[str, Any], checkpoint: Any) -> None:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    async with _client(opts) as client:
        model = await discover_model(client, opts.target)
        target = Target(**{**opts.target.__dict__, "model": model})
        config["model"] = model
        if opts.warmup:
            await warm_up(client, target, plan.warmup, opts.warmup)
        progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                            TextColumn("errors {task.fields[errors]}"), TimeElapsedColumn(),
                            disable=not opts.show_progress, transient=True)
        with progress:
            for i, level in enumerate(opts.levels):
                run = LevelRun(level)
                runs.append(run)
                task = progress.add_task(level.label, total=opts.stop.num_requests, errors=0)

                def on_result(result: Any, task: Any = task, run: LevelRun = run) -> None:
                    progress.update(task, advance=1,
                                    errors=sum(1 for r in run.results if not r.ok))

                await run_level(client, target, run, plan.levels[i], opts.stop, on_result,
                                seed=opts.workload.seed + i)
                checkpoint()


def run_bench(opts: BenchOptions, console: Any) -> BenchOutcome:
    if not opts.levels:
        raise BenchError("no load level given (--concurrency or --request-rate)")
    tokenizer = load_counting_tokenizer(opts.tokenizer)
    plan = plan_requests(opts, tokenizer)
    config: dict[str, Any] = {
        "base_url": opts.target.base_url, "model": opts.target.model,
        "workload": opts.workload.describe(), "stop": opts.stop.__dict__,
        "tokenizer": opts.tokenizer or "tokenmill built-in (SmolLM2)",
        "warmup": opts.warmup, "ignore_eos": opts.target.ignore_eos,
        "levels": [lv.to_json() for lv in opts.levels],
    }
    runs: list[LevelRun] = []
    out_dir = opts.output_dir
    json_path = out_dir / "results.json"

    def record(complete: bool, stopped: str | None) -> dict[str, Any]:
        return build_record(config, runs, opts.slo, opts.price, complete=complete,
                            stopped_reason=stopped)

    def checkpoint() -> None:
        write_json(record(False, "still running (or killed before finishing)"), json_path)

    stopped: str | None = None
    try:
        asyncio.run(_run_all(opts, plan, runs, config, checkpoint))
    except KeyboardInterrupt:
        stopped = "interrupted by the user"
    except BenchError as exc:
        if not runs:
            raise  # nothing measured yet (e.g. the server is unreachable): just say why
        stopped = exc.message
    except Exception as exc:  # keep what was measured, then say what broke
        if not any(run.results for run in runs):
            raise
        stopped = f"{type(exc).__name__}: {exc}"

    final = record(stopped is None, stopped)
    if not final["levels"]:
        raise BenchError(f"no request finished ({stopped or 'nothing was sent'}); "
                         "nothing to report")
    write_json(final, json_path)
    plots = write_plots(final, out_dir)
    (out_dir / "report.md").write_text(render_markdown(final, plots))
    outcome = BenchOutcome(final, out_dir, ["results.json", "report.md", *plots])

    total = sum(lv["summary"]["num_requests"] for lv in final["levels"])
    failed = sum(lv["summary"]["num_errors"] for lv in final["levels"])
    if stopped is not None:
        outcome.problem = f"run stopped: {stopped}; what was measured is in {out_dir}"
    elif total and failed == total:
        kinds: Counter[str] = Counter()
        for lv in final["levels"]:
            kinds.update(lv["summary"]["errors_by_kind"])
        first = next(lv["summary"]["first_error"] for lv in final["levels"])
        outcome.problem = (f"all {total} requests failed "
                           f"({', '.join(f'{k}: {n}' for k, n in kinds.items())}); "
                           f"first: {first}; report in {out_dir}")
    return outcome
