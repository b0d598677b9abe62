"""``revnet eval CHECKPOINT``: test accuracy of a saved checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..training.evaluate import evaluate_checkpoint

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet eval``."""
    p = sub.add_parser("eval", help="test accuracy of a checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="auto")
    p.set_defaults(func=_cmd_eval, needs_extras=True)


def _cmd_eval(args: argparse.Namespace) -> int:
    try:
        result = evaluate_checkpoint(args.checkpoint, data_dir=args.data_dir, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e) if str(e).startswith("eval:") else f"eval: {e}"
        print(f"revnet {msg}", file=sys.stderr)
        return 1
    bpb = f", {result['test_bits_per_byte']:.4f} bits per byte" if "test_bits_per_byte" in result else ""
    print(f"{result['checkpoint']} (step {result['step']}): test accuracy {result['test_accuracy']:.4f}, "
          f"test loss {result['test_loss']:.4f}{bpb}")
    return 0
