"""A bench run as one JSON record, and the views of it: terminal table, Markdown, comparison."""

from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenmill.bench.metrics import SLO, summarize
from tokenmill.bench.runner import LevelRun
from tokenmill.cost import Price, level_cost
from tokenmill.errors import BenchError

FORMAT = "tokenmill-bench/1"


def build_record(config: dict[str, Any], runs: Sequence[LevelRun], slo: SLO, price: Price | None,
                 *, complete: bool, stopped_reason: str | None) -> dict[str, Any]:
    levels = []
    for run in runs:
        if not run.results:
            continue
        summary = summarize(run.results, run.duration_s, slo)
        levels.append({
            "level": run.level.to_json(),
            "complete": run.complete,
            "summary": summary,
            "cost": level_cost(summary, price) if price is not None else None,
            "requests": [r.to_json() for r in run.results],
        })
    return {
        "format": FORMAT,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "complete": complete,
        "stopped_reason": stopped_reason,
        "config": {**config, "slo": slo.to_json(),
                   "price": None if price is None else {"per_hour": price.per_hour,
                                                        "source": price.source}},
        "levels": levels,
    }


def write_json(record: dict[str, Any], path: Path) -> None:
    """Write via a temp file and rename, so a crash mid-write never leaves half a report."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, path)


def load_record(path: str) -> dict[str, Any]:
    try:
        record = json.loads(Path(path).read_text())
    except OSError as exc:
        raise BenchError(f"cannot read {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise BenchError(f"{path} is not JSON ({exc.msg})") from exc
    if not isinstance(record, dict) or record.get("format") != FORMAT:
        raise BenchError(f"{path} is not a tokenmill bench result ({FORMAT})")
    return record


def _f(value: float | None, digits: int = 1) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.{digits}f}"


def _money(value: float | None) -> str:
    return "-" if value is None else (f"${value:,.2f}" if value >= 0.1 else f"${value:.4f}")


# (header, getter) for the per-level table; one source for terminal and Markdown.
def _columns(record: dict[str, Any]) -> list[tuple[str, Any]]:
    cols: list[tuple[str, Any]] = [
        ("level", lambda lv: lv["level"]["label"] + ("" if lv["complete"] else " (partial)")),
        ("ok/sent", lambda lv: f"{lv['summary']['num_ok']}/{lv['summary']['num_requests']}"),
        ("req/s", lambda lv: _f(lv["summary"]["request_throughput"], 2)),
        ("in tok/s", lambda lv: _f(lv["summary"]["input_tokens_per_s"])),
        ("out tok/s", lambda lv: _f(lv["summary"]["output_tokens_per_s"])),
        ("TTFT p50/p99 ms", lambda lv: f"{_f(lv['summary']['ttft_ms']['p50'])} / "
                                       f"{_f(lv['summary']['ttft_ms']['p99'])}"),
        ("TPOT p50/p99 ms", lambda lv: f"{_f(lv['summary']['tpot_ms']['p50'])} / "
                                       f"{_f(lv['summary']['tpot_ms']['p99'])}"),
        ("ITL p50 ms", lambda lv: _f(lv["summary"]["itl_ms"]["p50"])),
        ("E2E p50/p99 ms", lambda lv: f"{_f(lv['summary']['e2e_ms']['p50'])} / "
                                      f"{_f(lv['summary']['e2e_ms']['p99'])}"),
        ("errors", lambda lv: ", ".join(f"{k}:{v}" for k, v in
                                        lv["summary"]["errors_by_kind"].items()) or "0"),
    ]
    if any(v is not None for v in record["config"]["slo"].values()):
        cols.append(("goodput req/s", lambda lv: _f(lv["summary"]["goodput"], 2)))
    if record["config"]["price"] is not None:
        cols += [
            ("$/1M out", lambda lv: _money(lv["cost"]["dollars_per_million_output_tokens"])),
            ("$/1M in", lambda lv: _money(lv["cost"]["dollars_per_million_input_tokens"])),
            ("out tok/$", lambda lv: _f(lv["cost"]["output_tokens_per_dollar"], 0)),
        ]
    return cols


def table_rows(record: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    cols = _columns(record)
    return [h for h, _ in cols], [[str(get(lv)) for _, get in cols] for lv in record["levels"]]


def print_table(record: dict[str, Any], console: Any) -> None:
    from rich.table import Table

    headers, rows = table_rows(record)
    table = Table(title=f"tokenmill bench: {record['config'].get('model')} at "
                        f"{record['config'].get('base_url')}")
    for header in headers:
        table.add_column(header, justify="left" if header in ("level", "errors") else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)


def _md_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cell.replace("|", "/") for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(record: dict[str, Any], plot_files: Sequence[str] = ()) -> str:
    cfg = record["config"]
    out = [f"# tokenmill bench: {cfg.get('model')}", ""]
    if not record["complete"]:
        out += [(f"**Partial run** — stopped: {record['stopped_reason']}. "
                 "The figures below cover the requests that finished."), ""]
    out += [f"- server: `{cfg.get('base_url')}`",
            f"- workload: `{json.dumps(cfg.get('workload'))}`",
            f"- per level: `{json.dumps(cfg.get('stop'))}`",
            f"- tokenizer for prompt lengths: {cfg.get('tokenizer')}",
            f"- run at: {record['created']}"]
    slo = {k: v for k, v in cfg["slo"].items() if v is not None}
    if slo:
        out.append("- goodput SLO: " + ", ".join(f"{k} ≤ {v:g}" for k, v in slo.items()))
    if cfg["price"]:
        out.append(f"- price: ${cfg['price']['per_hour']:g}/hour ({cfg['price']['source']})")
    out += ["", "## Results per level", ""]
    headers, rows = table_rows(record)
    out += [_md_table(headers, rows), ""]
    costs = [lv["cost"]["dollars_per_million_output_tokens"] for lv in record["levels"]
             if lv["cost"] and lv["cost"]["dollars_per_million_output_tokens"]]
    if len(costs) >= 2:
        out += [(f"Cost per 1M output tokens goes from {_money(costs[0])} at the first level "
                 f"to {_money(costs[-1])} at the last: the machine costs the same per hour, so "
                 "busier means cheaper per token until latency or errors say stop."), ""]
    errors = [(lv["level"]["label"], lv["summary"]["first_error"]) for lv in record["levels"]
              if lv["summary"]["first_error"]]
    if errors:
        out += ["## Errors", ""] + [f"- {label}: first error `{msg}`" for label, msg in errors]
        out.append("")
    if plot_files:
        out += ["## Plots", ""] + [f"![{name}]({name})" for name in plot_files] + [""]
    usage = all(lv["summary"]["usage_reported"] for lv in record["levels"])
    out.append("Output tokens come from the server's `usage`." if usage else
               "Some output token counts are content chunks (the server sent no `usage`).")
    return "\n".join(out) + "\n"


_COMPARE = (
    ("req/s", ("summary", "request_throughput")),
    ("out tok/s", ("summary", "output_tokens_per_s")),
    ("TTFT p50 ms", ("summary", "ttft_ms", "p50")),
    ("TTFT p99 ms", ("summary", "ttft_ms", "p99")),
    ("TPOT p50 ms", ("summary", "tpot_ms", "p50")),
    ("E2E p50 ms", ("summary", "e2e_ms", "p50")),
    ("error rate", ("summary", "error_rate")),
    ("goodput", ("summary", "goodput")),
    ("$/1M out", ("cost", "dollars_per_million_output_tokens")),
)


def _dig(data: Any, keys: Sequence[str]) -> float | None:
    for key in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(key)
    return data if isinstance(data, int | float) else None


def compare_rows(a: dict[str, Any], b: dict[str, Any]) -> list[list[str]]:
    """[level, metric, A, B, B/A] for every level label the two runs share."""
    b_levels = {lv["level"]["label"]: lv for lv in b["levels"]}
    rows = []
    for lv_a in a["levels"]:
        lv_b = b_levels.get(lv_a["level"]["label"])
        if lv_b is None:
            continue
        for name, keys in _COMPARE:
            va, vb = _dig(lv_a, keys), _dig(lv_b, keys)
            if va is None and vb is None:
                continue
            ratio = f"{vb / va:.2f}x" if va and vb is not None else "-"
            rows.append([lv_a["level"]["label"], name, _f(va, 2), _f(vb, 2), ratio])
    if not rows:
        raise BenchError("the two runs share no load level (compare runs made with the same "
                         "--concurrency or --request-rate values)")
    return rows
