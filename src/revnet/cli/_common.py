"""What every command shares: the process's rank, and the check for the ``train`` extra."""

from __future__ import annotations

import importlib.util
import os

__all__ = ["EXTRAS", "missing_extras", "rank", "without_option"]

EXTRAS = ("numpy", "tqdm", "matplotlib")  # what `pip install 'revnet[train]'` adds to torch


def rank() -> int:
    """This process's rank under torchrun (0 otherwise): only rank 0 prints."""
    return int(os.environ.get("RANK", "0") or 0)


def missing_extras() -> list[str]:
    """The packages of the ``train`` extra that are not installed."""
    return [name for name in EXTRAS if importlib.util.find_spec(name) is None]


def without_option(argv: list[str], flag: str) -> list[str]:
    """``argv`` less ``flag VALUE`` or ``flag=VALUE`` (its first occurrence): a command relaunched
    under torchrun without the option that launched it."""
    for j, a in enumerate(argv):
        if a == flag:
            return argv[:j] + argv[j + 2:]
        if a.startswith(flag + "="):
            return argv[:j] + argv[j + 1:]
    return list(argv)
