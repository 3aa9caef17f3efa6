"""The ``bitcompile`` command line. Each subcommand is a thin shell over a Python function."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence

import bitcompile

Handler = Callable[[argparse.Namespace], int]


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="train a tiny Llama in fp32 and ternary side by side")
    parser.add_argument("--steps", type=int, default=200, help="training steps per run (default 200)")
    parser.add_argument("--out", default="bitcompile-demo", help="folder for the loss plot and report")
    parser.add_argument("--inner", default="inductor", choices=("inductor", "aot_eager", "eager"))
    parser.add_argument("--seed", type=int, default=0)

    def run(args: argparse.Namespace) -> int:
        from bitcompile.demo import run_demo

        run_demo(steps=args.steps, out_dir=args.out, inner=args.inner, seed=args.seed)
        return 0

    parser.set_defaults(handler=run)


#: Subcommand registrars; later subcommands (inspect, export, bench) add themselves here.
SUBCOMMANDS: list[Callable[[argparse._SubParsersAction], None]] = [_add_demo]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bitcompile", description=bitcompile.__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bitcompile {bitcompile.__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for register in SUBCOMMANDS:
        register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help()
        return 2
    try:
        return handler(args)
    except (bitcompile.TernaryConfigError, FileNotFoundError, ValueError) as error:
        print(f"bitcompile {args.command}: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
