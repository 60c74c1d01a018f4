"""`tokenmill` command line: one sub-command per module in ``tokenmill/commands``.

Each command module exposes ``add_parser(subparsers)`` and sets ``func`` on its parser; heavy imports
(torch, fastapi, ...) happen inside ``func`` so ``tokenmill --help`` stays fast. Every tokenmill error
is printed as one line on stderr (no traceback) with a non-zero exit code.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from tokenmill.errors import TokenmillError

# Order here is the order in `tokenmill --help`.
COMMAND_MODULES = (
    "tokenmill.commands.serve",
    "tokenmill.commands.generate",
    "tokenmill.commands.bench",
    "tokenmill.commands.plan",
    "tokenmill.commands.profile",
    "tokenmill.commands.gateway",
    "tokenmill.commands.rag",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenmill", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module_name in COMMAND_MODULES:
        importlib.import_module(module_name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except TokenmillError as exc:
        print(f"tokenmill: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
