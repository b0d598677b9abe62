"""Where a result was measured: machine, versions, date, load and commit."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

__all__ = ["environment"]

def environment() -> dict[str, Any]:
    """Machine, versions, date and load: to be saved beside every result."""
    cpu = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    commit = None
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        def git(*args: str) -> str:
            return subprocess.run(["git", *args], capture_output=True, text=True,
                                  cwd=Path(__file__).parent, timeout=10).stdout.strip()

        commit = git("rev-parse", "--short", "HEAD") or None
        if commit and git("status", "--porcelain", "--untracked-files=no"):
            commit += " (with uncommitted changes)"
    return {
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "platform": platform.platform(),
        "cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "memory_bytes": _total_memory(), "loadavg": os.getloadavg(), "git_commit": commit,
    }


def _total_memory() -> int | None:
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo") as f:
        return int(f.readline().split()[1]) * 1024
    return None
