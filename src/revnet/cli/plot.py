"""``revnet plot RUN_DIR``: redraw a run's curves."""

from __future__ import annotations

import argparse
import sys

from ..training.plots import plot_run

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet plot``."""
    p = sub.add_parser("plot", help="redraw a run's curves into RUN_DIR/curves.png")
    p.add_argument("run_dir")
    p.set_defaults(func=_cmd_plot, needs_extras=True)


def _cmd_plot(args: argparse.Namespace) -> int:
    try:
        print(plot_run(args.run_dir))
    except (FileNotFoundError, ValueError) as e:
        print(f"revnet plot: {e}", file=sys.stderr)
        return 1
    return 0
