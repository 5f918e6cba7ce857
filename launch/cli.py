"""The `limoe` command line: one entry point, subcommands registered by each area.

Each module in COMMAND_MODULES exposes `register(subparsers)`, which adds its
subcommand(s) with `set_defaults(func=...)`. The function receives the parsed
arguments and returns an exit code (or None for success).
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMAND_MODULES = [
    "launch.commands_info",
    "launch.launcher",
    "launch.plan",
    "launch.export",
    "eval.cli",
    "launch.commands_serve",
    "data_pipelines.cli",
    "launch.demo",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="limoe",
        description="Train, evaluate and serve LIMoE sparse multimodal mixture-of-experts models.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    args.argv = argv  # the command line as given, for run records and reports
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
