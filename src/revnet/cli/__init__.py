"""Command line: ``revnet train | eval | generate | plot | bench | models``. Parsing and printing only.

One module per command, each with ``add_parser(subparsers)``; the work is done by
:mod:`revnet.training` and :mod:`revnet.bench`.
"""

from __future__ import annotations

import argparse
import logging
import sys

from .._version import __version__
from . import bench, generate, models, plot, train
from . import eval as eval_cmd
from ._common import missing_extras, rank

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="revnet", description="Reversible residual networks: memory-free backpropagation.")
    parser.add_argument("--version", action="version", version=f"revnet {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in (train, eval_cmd, generate, plot, models, bench):
        command.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    args.argv = argv  # `train --nproc` relaunches the same command under torchrun
    missing = missing_extras() if getattr(args, "needs_extras", False) else []
    if missing:
        print(f"revnet {args.command}: needs {', '.join(missing)}, which the package's train extra "
              f"installs: pip install 'revnet[train]' (or from a clone: pip install -e '.[train]').",
              file=sys.stderr)
        return 1
    # Under torchrun, rank 0 alone logs; the others report only warnings and errors.
    logging.basicConfig(level=logging.INFO if rank() == 0 else logging.WARNING, format="%(message)s")
    return int(args.func(args) or 0)
