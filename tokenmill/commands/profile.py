"""`tokenmill profile`: measure this machine and save it as a hardware entry for `plan`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="measure this machine's decode costs (kernels, overhead); saves it for "
                        "`plan`",
        description="Measures this machine (GPU when torch sees one): copy bandwidth and matmul "
                    "FLOP/s and, on a CPU, what a decode step costs here: the time of each "
                    "linear kernel tokenmill runs (fp32, bf16, 4-bit and 8-bit quantized) at "
                    "decode shapes and the per-layer and per-step overhead of the built-in "
                    "model. About a minute on 2 cores (--quick: about a third). Saved where "
                    "`tokenmill plan --hardware this` finds it.")
    p.add_argument("--output", type=Path, default=None,
                   help="where to save (default: ~/.cache/tokenmill/hardware.json)")
    p.add_argument("--device", default=None,
                   help="torch device (default: cuda if present, else cpu)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    p.add_argument("--seconds-per-test", type=float, default=0.5,
                   help="time budget of each measurement (default 0.5)")
    p.add_argument("--copy-mib", type=int, default=256, help="MiB copied per bandwidth pass")
    p.add_argument("--price-per-hour", type=float, default=None,
                   help="what this machine costs per hour; stored as its example price")
    p.add_argument("--quick", action="store_true",
                   help="fewer points (M = 1, 4, 16; one pass) and the default configuration's "
                        "overhead only")
    p.add_argument("--no-serve", action="store_true",
                   help="do not start `tokenmill serve` to measure what serving over HTTP adds "
                        "to a decode step (plan then predicts the engine alone)")
    p.add_argument("--no-tp", action="store_true",
                   help="do not measure what tensor parallelism adds (the all-reduce between 2 "
                        "spawned ranks, the Python layers' overhead); plan then leaves TP "
                        "communication out for this machine")
    p.add_argument("--no-decode", action="store_true",
                   help="skip the decode profile (bandwidth and FLOP/s only; plan then uses "
                        "the roofline)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from rich.console import Console

    from tokenmill.bench.hardware import default_profile_path, save_profile
    from tokenmill.bench.profile import profile_machine
    from tokenmill.errors import BenchError

    if not args.seconds_per_test > 0:
        raise BenchError(f"--seconds-per-test={args.seconds_per_test} must be > 0")
    if args.copy_mib < 1:
        raise BenchError(f"--copy-mib={args.copy_mib} must be at least 1")
    if args.price_per_hour is not None and not args.price_per_hour >= 0:
        raise BenchError(f"--price-per-hour={args.price_per_hour} must be >= 0")
    console = Console(stderr=True)
    import os

    busy = os.getloadavg()[0]
    if busy > 0.5:
        console.print(f"[yellow]note: load average {busy:.2f}: other processes share these cores; "
                      "the figures will be slower and noisier than on a quiet machine[/yellow]")
    spec = profile_machine(device=args.device, threads=args.threads,
                           budget_s=args.seconds_per_test, copy_bytes=args.copy_mib * 2**20,
                           decode=not args.no_decode, quick=args.quick,
                           serve=not args.no_serve, tp=not args.no_tp,
                           log=lambda line: console.print(f"[dim]{line}[/dim]"))
    if args.price_per_hour is not None:
        spec = dataclasses.replace(spec, example_price_per_hour=args.price_per_hour)
    path = args.output or default_profile_path()
    save_profile(spec, path)
    console = Console()
    console.print(f"[bold]{spec.name}[/bold]")
    console.print(f"  memory           {spec.memory_bytes / 2**30:,.1f} GiB")
    console.print(f"  bandwidth        {spec.bandwidth_bytes_per_s / 1e9:,.1f} GB/s (copy)")
    for dtype, flops in spec.peak_flops.items():
        console.print(f"  matmul {dtype:<9} {flops / 1e9:,.1f} GFLOP/s")
    if spec.decode is not None:
        _print_decode(console, spec.decode)
        if spec.decode.kernel_isa == "reference":
            console.print("[yellow]note: the native quantized kernel was not available, so the "
                          "q4/q8 figures are the PyTorch fallback's[/yellow]")
    console.print(f"saved to {path}; use it with `tokenmill plan --hardware this`")
    return 0


def _print_decode(console: object, decode: object) -> None:
    """The figures a reader checks first: the built-in model's linears per step at M = 1 and
    the largest M measured, and the overheads."""
    console.print(f"  decode profile   {decode.threads} threads, quantized kernel "
                  f"{decode.kernel_isa}, --dtype auto = {decode.auto_dtype}")
    for name, table in decode.kernels.items():
        first = sum(v[0] for v in table.shapes.values())
        last = sum(v[-1] for v in table.shapes.values())
        fit = table.fit
        console.print(f"  kernel {name:<9} one of each shape: {first * 1e3:.2f} ms at M=1, "
                      f"{last * 1e3:.2f} ms at M={table.rows[-1]}; fit {fit['call_s'] * 1e6:.0f} "
                      f"us/call, {fit['bytes_per_s'] / 1e9:,.1f} GB/s, "
                      f"{fit['flops_per_s'] / 1e9:,.0f} GFLOP/s")
    for name, table in decode.overheads.items():
        cells = ", ".join(
            f"B={b}: {row[0] * 1e6:.0f}-{row[-1] * 1e6:.0f} us/layer + {step * 1e3:.2f} ms/step"
            for b, row, step in zip(table.batches, table.layer_s, table.step_s))
        console.print(f"  overhead {name:<13} (context {table.contexts[0]}-"
                      f"{table.contexts[-1]}) {cells}")
    for name, table in decode.python_overheads.items():
        cells = ", ".join(f"B={b}: {row[0] * 1e6:.0f}-{row[-1] * 1e6:.0f} us/layer"
                          for b, row in zip(table.batches, table.layer_s))
        console.print(f"  overhead {name:<13} Python layers (TP > 1): {cells}")
    link = decode.communication
    if link is not None:
        ar, ag = link.all_reduce, link.all_gather
        console.print(f"  TP all-reduce    {ar.latency_s * 1e6:.0f} us + bytes / "
                      f"{ar.bytes_per_s / 1e9:,.2f} GB/s; all-gather {ag.latency_s * 1e6:.0f} "
                      f"us + bytes / {ag.bytes_per_s / 1e9:,.2f} GB/s ({link.world_size} ranks, "
                      f"{link.dtype})")
    if decode.serving is not None:
        cells = ", ".join(f"B={b}: {s * 1e3:+.1f} ms" for b, s in zip(decode.serving.batches,
                                                                       decode.serving.step_s))
        console.print(f"  serving          tokenmill serve - engine alone, per step: {cells}")
