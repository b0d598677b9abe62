"""``revnet bench ...`` subcommands (parsing and printing only)."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="measure memory, speed and capacity")
    p.set_defaults(func=lambda args: print("not yet"))
