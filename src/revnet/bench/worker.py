"""One memory point in a fresh process: ``python -m revnet.bench.worker '<json kwargs>'``.

Started by :func:`revnet.bench.memory.measure` with ``MALLOC_MMAP_THRESHOLD_=65536``, so the
process's peak resident memory follows its live tensors. Prints the result as JSON on
the last line of stdout.
"""

from __future__ import annotations

import json
import sys

from .memory import memory_point


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        sys.stderr.write("usage: python -m revnet.bench.worker '<json kwargs of memory_point>'\n")
        return 2
    result = memory_point(**json.loads(args[0]))
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
