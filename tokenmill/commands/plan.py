"""`tokenmill plan`: will a model fit, how many requests at once, how fast, at what cost."""

from __future__ import annotations

import argparse
import dataclasses
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tokenmill.errors import BenchError


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "plan", help="capacity planner: memory, concurrency, decode speed and cost per device",
        description="Capacity plan of a model on one or more devices. Decode speed on 'this' "
                    "machine sums the kernel times and overheads `tokenmill profile` measured; "
                    "on catalog devices it is a roofline ceiling (datasheet peaks). With --tp > 1 "
                    "the step adds the TP collectives (measured here by `tokenmill profile`; "
                    "datasheet link figures for catalog devices).")
    p.add_argument("--model", default=None,
                   help="catalog name (Llama-3-8B, Llama-3-70B, Mixtral-8x7B, Qwen2.5-7B, "
                        "SmolLM2-135M), a GGUF file or an HF folder; default: the built-in model")
    p.add_argument("--hardware", default="h100-80gb,a100-80gb,l4",
                   help="comma-separated catalog entries or 'this' (from `tokenmill profile`)")
    p.add_argument("--dtype", default=None,
                   help="weight format: fp32, bf16, fp16 (all weights dense, like serve "
                        "--quantization none), int8 (per-channel), int4 (--group-size), fp8 "
                        "(decoder linears; embedding and tied head in the compute dtype), or "
                        "auto = as stored (a GGUF's blocks kept, tensor by tensor). Default: "
                        "bf16; for a model file, auto")
    p.add_argument("--group-size", type=int, default=32,
                   help="int4: inputs per scale and min (32: 5 bits/weight, 128: 4.25)")
    p.add_argument("--compute-dtype", default=None,
                   help="activation dtype (default: the weights' dtype, or what --dtype auto "
                        "picks on the device for quantized weights)")
    p.add_argument("--kv-dtype", default=None,
                   help="KV cache dtype (default: the compute dtype, as tokenmill holds it)")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (devices)")
    p.add_argument("--context-p50", type=int, default=2048, help="median prompt+output tokens")
    p.add_argument("--context-p95", type=int, default=8192, help="p95 prompt+output tokens")
    p.add_argument("--batch", type=int, default=None,
                   help="decode batch for the speed estimate (default: all that fit at p50)")
    p.add_argument("--prompt-len", type=int, default=1024,
                   help="prompt tokens for the TTFT estimate")
    p.add_argument("--price-per-hour", type=float, default=None,
                   help="$ per device-hour (default: the catalog's example price, marked)")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="fraction of device memory tokenmill may use (default 0.9)")
    p.add_argument("--profile-path", type=Path, default=None,
                   help="hardware JSON written by `tokenmill profile` (for --hardware this)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)


def _size(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB" if num_bytes >= 1e8 else f"{num_bytes / 1e6:.1f} MB"


def _rows(results: list[Any]) -> list[tuple[str, list[str]]]:
    def each(fn: Any) -> list[str]:
        return [fn(r) for r in results]

    def cost(r: Any) -> str:
        if r.dollars_per_million_output_tokens is None:
            return "-" if r.fits else "n/a (does not fit)"
        tag = " (example price)" if r.price_is_example else ""
        return f"${r.dollars_per_million_output_tokens:.4f}{tag}"

    def verdict(r: Any) -> str:
        if r.fits:
            if r.batch_fits:
                return "fits"
            return f"fits, but batch {r.batch_size} > {r.concurrent_at_p50}"
        hints = []
        if r.smallest_fitting_tp:
            hints.append(f"TP {r.smallest_fitting_tp} fits")
        if r.smallest_fitting_weight_dtype:
            hints.append(f"{r.smallest_fitting_weight_dtype} at TP {r.inputs.tp} fits")
        return (f"DOES NOT FIT: short {_size(r.shortfall_bytes_per_device)}/device"
                + (f"; {', '.join(hints)}" if hints else "; nothing in reach fits"))

    return [
        ("device", each(lambda r: r.inputs.hardware.name
                        + (" (measured)" if r.inputs.hardware.measured else ""))),
        ("verdict", each(verdict)),
        ("weights / device", each(lambda r: _size(r.weight_bytes_per_device))),
        ("usable memory / device", each(lambda r: _size(r.usable_bytes_per_device))),
        ("KV bytes / token", each(lambda r: f"{r.kv_bytes_per_token / 1024:.1f} KiB")),
        ("KV capacity (tokens)", each(lambda r: f"{r.kv_capacity_tokens:,}")),
        ("concurrent @ p50 / p95",
         each(lambda r: f"{r.concurrent_at_p50:,} / {r.concurrent_at_p95:,}")),
        ("decode batch B", each(lambda r: str(r.batch_size))),
        ("decode tok/s per stream @B", each(lambda r: f"{r.decode_tokens_per_s_per_stream:,.1f}")),
        ("decode tok/s total @B", each(_decode_total)),
        ("decode step @B", each(_decode_step)),
        ("TTFT, one prompt", each(lambda r: f"{r.ttft_seconds * 1000:,.1f} ms")),
        ("$ / 1M output tok, full load", each(cost)),
    ]


def _decode_total(r: Any) -> str:
    how = "measured" if r.decode_bound == "measured" else f"roofline, {r.decode_bound}-bound"
    return f"{r.decode_tokens_per_s:,.0f} ({how})"


def _decode_step(r: Any) -> str:
    text = f"{r.decode_step_seconds * 1e3:,.2f} ms"
    if r.decode_breakdown:
        parts = r.decode_breakdown
        names = {"layers": "layer overhead"}
        text += " = " + " + ".join(f"{names.get(k, k)} {v * 1e3:.2f}" for k, v in parts.items())
    elif r.communication_seconds:
        text += f" incl. TP communication {r.communication_seconds * 1e3:.2f}"
    return text


def _to_json(result: Any) -> dict[str, Any]:
    data = asdict(result)
    inputs = data.pop("inputs")
    data["model"] = inputs["arch"]["name"]
    data["hardware"] = inputs["hardware"]["name"]
    data["hardware_source"] = inputs["hardware"]["source"]
    data["inputs"] = {k: v for k, v in inputs.items() if k not in ("arch", "hardware")}
    data["decode_model"] = "measured" if result.decode_bound == "measured" else "roofline"
    return data


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from tokenmill.bench.architecture import normalize_dtype
    from tokenmill.bench.catalog import find_hardware, find_model
    from tokenmill.bench.plan import PlanInputs, plan

    arch = find_model(args.model)
    if args.dtype is not None and args.dtype.strip().lower() in ("auto", "stored", "as-stored"):
        if arch.file_weight_bytes is None:
            raise BenchError(f"--dtype auto: {arch.name} is a catalog model with no file; name "
                             "a weight format")
        weight_dtype: str | None = None
    elif args.dtype is not None:
        weight_dtype = normalize_dtype(args.dtype, what="--dtype")
    else:
        weight_dtype = None if arch.file_weight_bytes is not None else "bf16"
    compute_dtype = (None if args.compute_dtype is None
                     else normalize_dtype(args.compute_dtype, what="--compute-dtype"))
    if compute_dtype not in (None, "fp32", "bf16", "fp16"):
        raise BenchError(f"--compute-dtype={args.compute_dtype!r}: choose fp32, bf16 or fp16")
    if args.group_size not in (32, 64, 128):
        raise BenchError(f"--group-size={args.group_size} must be 32, 64 or 128")
    kv_dtype = (None if args.kv_dtype is None
                else normalize_dtype(args.kv_dtype, what="--kv-dtype"))
    names = [n for n in args.hardware.split(",") if n.strip()]
    if not names:
        raise BenchError("--hardware names no device")
    results = []
    for name in names:
        inputs = PlanInputs(arch, find_hardware(name, args.profile_path), weight_dtype,
                            kv_dtype or "bf16", args.tp, args.context_p50, args.context_p95,
                            args.batch, args.prompt_len, args.price_per_hour,
                            args.memory_utilization, compute_dtype, args.group_size)
        if kv_dtype is None:
            inputs = dataclasses.replace(inputs, kv_dtype=inputs.resolved_compute_dtype)
        results.append(plan(inputs))
    if args.json:
        print(json.dumps([_to_json(r) for r in results], indent=1))
        return 0
    console = Console()
    if not console.is_terminal:  # piped to a file: do not wrap the comparison table at 80
        console = Console(width=200)
    dtype_text = results[0].weights_description or weight_dtype
    table = Table(title=f"{arch.name}: {arch.num_params / 1e9:.2f}B params, weights {dtype_text}, "
                        f"KV {results[0].inputs.kv_dtype}, TP {args.tp}, context p50 {args.context_p50} / "
                        f"p95 {args.context_p95}")
    table.add_column("")
    for _ in results:
        table.add_column(justify="right")
    for label, cells in _rows(results):
        table.add_row(label, *cells)
    console.print(table)
    for r in results:
        console.print(f"[dim]{r.inputs.hardware.name}: {r.inputs.hardware.source}[/dim]")
        link = r.inputs.hardware.communication
        if args.tp > 1:
            console.print(f"[dim]  TP communication: {link.source}[/dim]" if link else
                          "[dim]  TP communication: not known for this device (not counted; "
                          "run `tokenmill profile` again)[/dim]")
    roofline = [r.inputs.hardware.name for r in results if r.decode_bound != "measured"]
    note = (f" Speeds on {', '.join(roofline)} are roofline ceilings." if roofline else "")
    console.print(f"[dim]model numbers: {arch.source}.{note}[/dim]")
    return 0
