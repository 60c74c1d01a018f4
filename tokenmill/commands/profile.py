"""`tokenmill profile`: measure this machine and save it as a hardware entry for `plan`."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "profile", help="measure memory bandwidth and matmul FLOP/s here; saves it for `plan`",
        description="Measures this machine (GPU when torch sees one) in a few seconds and saves "
                    "the figures where `tokenmill plan --hardware this` finds them.")
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
    spec = profile_machine(device=args.device, threads=args.threads,
                           budget_s=args.seconds_per_test, copy_bytes=args.copy_mib * 2**20)
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
    console.print(f"saved to {path}; use it with `tokenmill plan --hardware this`")
    return 0
