"""``revnet generate CHECKPOINT --prompt TEXT``: a sample from a language model's checkpoint."""

from __future__ import annotations

import argparse
import sys

from ..training.generate import generate_text

__all__ = ["add_parser"]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet generate``."""
    p = sub.add_parser("generate", help="sample text from a language model's checkpoint (revnet train "
                                        "--recipe text-lm)")
    p.add_argument("checkpoint", help="a best.pt or last.pt of a text run")
    p.add_argument("--prompt", default="def ", help="what the text starts with (default 'def ')")
    p.add_argument("--max-bytes", type=int, default=300, help="bytes to sample (default 300)")
    p.add_argument("--temperature", type=float, default=0.8,
                   help="sampling temperature (default 0.8; 0: always the likeliest byte)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the K likeliest bytes only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_generate, needs_extras=True)


def _cmd_generate(args: argparse.Namespace) -> int:
    try:
        result = generate_text(args.checkpoint, args.prompt, max_bytes=args.max_bytes,
                               temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                               device=args.device)
    except (FileNotFoundError, ValueError) as e:
        msg = str(e) if str(e).startswith("generate:") else f"generate: {e}"
        print(f"revnet {msg}", file=sys.stderr)
        return 1
    print(result["prompt"] + result["text"])
    return 0
