"""Stopping on a signal: SIGINT/SIGTERM end the run at a step boundary, after a checkpoint."""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["stop_on_signals"]

log = logging.getLogger(__name__)


@contextlib.contextmanager
def stop_on_signals(grace: float = 0.0) -> Iterator[dict[str, int]]:
    """SIGINT/SIGTERM set a flag; the loop saves a checkpoint at the next step and stops.

    A second signal more than ``grace`` seconds after the first stops at once.
    """
    flag: dict[str, int] = {}
    first: list[float] = []

    def handler(signum: int, _frame: Any) -> None:
        if flag and time.monotonic() - first[0] >= grace:  # a second signal: stop at once
            raise KeyboardInterrupt
        if flag:
            return
        first.append(time.monotonic())
        flag["signal"] = signum
        log.warning("received %s: saving a checkpoint after this step", signal.Signals(signum).name)

    previous = {}
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        yield flag
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)
