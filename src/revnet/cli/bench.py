"""``revnet bench memory | speed | capacity | data | drift | report``: parsing, running, printing.

The measurements live in :mod:`revnet.bench`; this module runs them with progress bars,
prints tables, saves JSON (with the configuration and the machine beside every result)
and plots, and ``report`` writes docs/BENCHMARKS.md from what one run produced.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from ..bench.breakdown import DEFAULT_MODELS, breakdown, check_models, package_root
from ..bench.budget import budget_frontier
from ..bench.capacity import capacity
from ..bench.contenders import (
    FAMILIES,
    GPT_KINDS,
    GPT_SWEEP,
    KINDS,
    PAPER_PAIRS,
    VIT_KINDS,
    VIT_PAIRS,
    family_of,
    is_baseline,
    model_kind,
)
from ..bench.data import data_path
from ..bench.drift import DRIFT_PRECISIONS, drift, exact_cost
from ..bench.environment import environment
from ..bench.memory import SWEEPS, measure, memory_sweep, sweep_plan
from ..bench.plots import plot_breakdown, plot_budget, plot_capacity, plot_drift, plot_memory, plot_speed
from ..bench.report import render_report
from ..bench.speed import speed
from ..bench.tables import (
    breakdown_table,
    budget_table,
    capacity_table,
    data_table,
    drift_table,
    exact_cost_table,
    markdown_table,
    memory_table,
    models_table,
    speed_table,
    text_table,
)
from ..memory.measure import keep_freed_memory
from ..memory.sizes import parse_bytes
from ..training.datasets import load_dataset
from ..training.distributed import DistributedError, init_from_env, launch_command, shutdown
from ..training.footprint import memory_line, step_of_run
from ..training.loader import normalize
from ..training.shards import load_checkpoint
from ._common import without_option

__all__ = ["add_parser"]

_QUICK_MEMORY = {"units": [1, 3], "batch": 8, "models": [], "model_batch": 16}
MEMORY_DEFAULTS = {  # revnet bench memory --family: what is measured unless a flag says otherwise
    "cnn": {"units": [1, 3, 9, 18, 36], "kinds": list(KINDS), "models": [m for p in PAPER_PAIRS for m in p],
            "batch": 32, "model_batch": 128, "image_size": 32},
    "vit": {"units": [4, 12, 24, 48], "kinds": list(VIT_KINDS), "models": [m for p in VIT_PAIRS for m in p],
            "batch": 8, "model_batch": 8, "image_size": 224},
    # GPT-2 small's widths at 1024 tokens; the named pair is GPT-2 small (medium: --models, minutes more).
    "gpt": {"units": [4, 8, 16, 32, 48], "kinds": list(GPT_KINDS), "models": ["gpt2_small", "revgpt2_small"],
            "batch": 2, "model_batch": 2, "context": 1024},
}
GPT_CONTEXTS = [128, 256, 512, 1024]  # --sweep context, at GPT-2 small's 12 blocks
_QUICK_GPT = {"units": [2, 4], "batch": 2, "models": [], "model_batch": 2, "context": 32,
              "contexts": [16, 32], "embed_dim": 256, "num_heads": 4, "vocab_size": 512}
_GPT_ONLY = ("context", "contexts", "embed_dim", "num_heads", "vocab_size", "lm_loss")  # --family gpt alone
_QUICK_SPEED = {"batch": 16, "repeats": 3, "warmup": 1, "inference_repeats": 5}
_QUICK_CAPACITY = {"budget": "256MiB", "models": ["resnet32", "revnet38"], "depth_batch": 16,
                   "verify_max_batch": 512, "verify_max_units": 3}


# --------------------------------------------------------------------------------------
# Parsing
# --------------------------------------------------------------------------------------

def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet bench`` and its subcommands."""
    p = sub.add_parser("bench", help="measure memory, speed and capacity (RevNet vs the alternatives)",
                       description="Memory and speed of reversible backprop against a ResNet, plain "
                                   "autograd and torch.utils.checkpoint, on this machine.")
    p.set_defaults(needs_extras=True)
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")

    def common(q: argparse.ArgumentParser, out: str) -> None:
        q.add_argument("--out", default=out, help=f"folder for JSON and PNG (default {out})")
        q.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
        q.add_argument("--image-size", type=int, default=None,
                       help="side of the random images (default 32; 224 for transformers)")
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        q.add_argument("--quick", action="store_true", help="tiny configuration, about a minute")

    q = bsub.add_parser("memory", help="activation memory of one training step across depth")
    common(q, "runs/bench")
    q.add_argument("--family", choices=sorted(MEMORY_DEFAULTS), default="cnn",
                   help="cnn (default): ResNet vs RevNet at 32px; vit: ViT vs RevViT at 224px (the sweep "
                        "at ViT-Ti/16 widths, the pairs base and large); gpt: GPT vs RevGPT language models "
                        "on random tokens (the sweep at GPT-2 small's widths, the pair gpt2_small)")
    q.add_argument("--sweep", choices=SWEEPS, default="depth",
                   help="depth (default): across --units; context (--family gpt): across --contexts at "
                        "one depth")
    q.add_argument("--units", type=int, nargs="+", default=None,
                   help="RevNet units per stage (the ResNet gets twice as many: same depth); transformer "
                        "blocks (default cnn: 1 3 9 18 36; vit: 4 12 24 48; gpt: 4 8 16 32 48, and 12 for "
                        "--sweep context)")
    q.add_argument("--kinds", nargs="+", choices=KINDS + VIT_KINDS + GPT_KINDS, default=None,
                   help="default: the family's four")
    q.add_argument("--models", nargs="*", default=None,
                   help="registered models measured at --model-batch (none: skip; default: the "
                        "family's pairs); --breakdown: reversible ViTs and GPTs (default "
                        f"{' '.join(DEFAULT_MODELS)})")
    q.add_argument("--batch", type=int, default=None,
                   help="batch of the depth sweep (cnn 32, vit 8, gpt 2); --breakdown: per process "
                        "(default 2 images, 1 sequence)")
    q.add_argument("--model-batch", type=int, default=None,
                   help="batch of the named models (cnn 128, vit 8, gpt 2)")
    q.add_argument("--block", choices=["basic", "bottleneck"], default=None,
                   help="residual function of the CNN sweep (default basic)")
    q.add_argument("--context", type=int, default=None,
                   help="--family gpt: tokens per sequence of the depth sweep and the named models "
                        "(default 1024)")
    q.add_argument("--contexts", type=int, nargs="+", default=None,
                   help=f"--family gpt --sweep context: the context lengths (default "
                        f"{' '.join(map(str, GPT_CONTEXTS))})")
    q.add_argument("--lm-loss", choices=["fused", "logits"], default=None,
                   help="--family gpt: the loss as revnet train computes it, without keeping the logits "
                        "(fused, default: revnet.models.lm_loss), or the cross-entropy of the logits "
                        "(logits: they and their gradient count too)")
    q.add_argument("--embed-dim", type=int, default=None,
                   help=f"--family gpt: width of the sweep networks (default GPT-2 small's "
                        f"{GPT_SWEEP['embed_dim']})")
    q.add_argument("--num-heads", type=int, default=None,
                   help=f"--family gpt: attention heads of the sweep networks (default "
                        f"{GPT_SWEEP['num_heads']})")
    q.add_argument("--vocab-size", type=int, default=None,
                   help=f"--family gpt: vocabulary of the sweep networks (default GPT-2's "
                        f"{GPT_SWEEP['vocab_size']})")
    q.add_argument("--name", default=None,
                   help="file name of the JSON and PNG in --out, without extension (default memory; "
                        "memory_context for --sweep context; breakdown for --breakdown)")
    q.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="measure every revnet and revnet-plain point again under revnet.compile "
                        "(each fresh process compiles: minutes)")
    q.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="instead of the sweep: one training step of a `revnet train` run (its model, "
                        "per-process micro-batch, images, precision and the units its plan stored), "
                        "reversible vs plain backprop, each in a fresh process, on the run's device "
                        "unless --device is given")
    q.add_argument("--breakdown", action="store_true",
                   help="instead of the sweep: where one AdamW step's bytes go on each process (parameters, "
                        "gradients, optimizer state, activations) under DDP plain and reversible, FSDP per "
                        "reversible block, with and without the optimizer in backward; --nproc CPU "
                        "processes under torchrun (gloo); writes NAME.json, NAME.md and NAME.png")
    q.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="--breakdown: processes to launch under torchrun (default 2)")
    q.set_defaults(func=_cmd_memory, device=None)

    q = bsub.add_parser("speed", help="training-step and inference time, alternated in one process")
    common(q, "runs/bench")
    q.add_argument("--model", default="revnet38", help="a RevNet or RevViT (e.g. revvit_small)")
    q.add_argument("--reference", default=None,
                   help="a ResNet or ViT timed alongside (default: resnet32, or the RevViT's ViT; "
                        "none: skip)")
    q.add_argument("--batch", type=int, default=None, help="default 128 (16 for a RevViT at 224px)")
    q.add_argument("--repeats", type=int, default=7)
    q.add_argument("--warmup", type=int, default=2)
    q.add_argument("--inference-repeats", type=int, default=15)
    q.add_argument("--contiguous", dest="channels_last", action="store_false",
                   help="an NCHW batch into the model as create_model builds it (the library's default "
                        "path; default: channels_last, as revnet train)")
    q.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                   help=argparse.SUPPRESS)  # the default; kept so older commands still run
    q.add_argument("--against", default=None, metavar="GIT_REV",
                   help="also time the reversible engine of this git revision (e.g. before a change)")
    q.add_argument("--compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="also time revnet.compile'd copies (reversible and plain); the compile time is "
                        "reported apart from the step time")
    q.set_defaults(func=_cmd_speed)

    q = bsub.add_parser("budget", help="the planner's frontier: step time against activation memory, per "
                                       "budget, against all-rebuild, all-stored and checkpointing")
    common(q, "runs/bench")
    q.add_argument("--models", nargs="+", default=["revnet110", "revnet164"])
    q.add_argument("--batch", type=int, default=128)
    q.add_argument("--fractions", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0],
                   help="budgets at minimum + f x (all stored - minimum)")
    q.add_argument("--repeats", type=int, default=5)
    q.set_defaults(func=_cmd_budget)

    q = bsub.add_parser("capacity", help="largest batch and depth that train under a memory budget")
    common(q, "runs/bench")
    q.add_argument("--budget", default="2GiB", type=_budget, help="e.g. 2GiB, 512MiB (whole step: "
                                                                  "weights, gradients, activations)")
    q.add_argument("--models", nargs="+", default=["resnet110", "revnet110"])
    q.add_argument("--depth-batch", type=int, default=128, help="batch of the depth search")
    q.add_argument("--verify-max-batch", type=int, default=2048,
                   help="check predictions with real steps up to this batch")
    q.add_argument("--verify-max-units", type=int, default=36,
                   help="... and up to this many RevNet units per stage")
    q.set_defaults(func=_cmd_capacity)

    q = bsub.add_parser("data", help="the data path alone (loader + augmentation) against the training step")
    q.add_argument("--recipe", default="fashion-mnist-long", help="training recipe whose data, batch, "
                   "augmentation, model and amp are measured (revnet train --recipe; default "
                   "fashion-mnist-long: the default recipe with crop as well as flip)")
    q.add_argument("--dataset", default=None, help="override the recipe's data set")
    q.add_argument("--data-dir", default=None, help="folder of the data set (default: as revnet train)")
    q.add_argument("--batch", type=int, default=None, help="override the recipe's batch size")
    q.add_argument("--batches", type=int, default=200, help="loader batches timed")
    q.add_argument("--repeats", type=int, default=7, help="training steps timed")
    q.add_argument("--out", default="runs/bench", help="folder for data.json (default runs/bench)")
    q.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--quick", action="store_true", help="few batches and steps, seconds")
    q.set_defaults(func=_cmd_data)

    q = bsub.add_parser("drift", help="reconstruction error against depth (float64/float32/bf16), "
                        "fresh and trained weights; exact mode's cost",
                        description="Rebuilds each reversible sequence's input after N blocks and "
                                    "reports the error; measures what exact mode costs in time and memory.")
    q.add_argument("--model", default=None,
                   help="registered RevNet (default: the checkpoint's, else revnet38)")
    q.add_argument("--checkpoint", default=None, help="trained weights: a revnet train checkpoint "
                   "(e.g. runs/x/best.pt); fresh weights are measured either way")
    q.add_argument("--dataset", default=None, help="images of the batch (default: the checkpoint's, "
                   "else fashion-mnist)")
    q.add_argument("--data-dir", default=None)
    q.add_argument("--batch", type=int, default=16, help="images in the batch (test split)")
    q.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64],
                   help="blocks N (beyond a sequence's length its blocks repeat cyclically)")
    q.add_argument("--precisions", nargs="*", choices=DRIFT_PRECISIONS,
                   default=list(DRIFT_PRECISIONS))
    q.add_argument("--exact-precisions", nargs="*", choices=["float32", "bf16"], default=["float32", "bf16"],
                   help="precisions also measured in exact mode")
    q.add_argument("--exact-bits", type=int, default=None,
                   help="fraction bits k of exact mode's lattice 2^-k (default: revnet's, 12)")
    q.add_argument("--cost-batch", type=int, default=128, help="batch of the exact-mode cost runs")
    q.add_argument("--repeats", type=int, default=7, help="timed steps per mode (cost)")
    q.add_argument("--no-cost", dest="cost", action="store_false",
                   help="skip the exact-mode cost measurement")
    q.add_argument("--out", default="runs/bench", help="folder for drift.json and drift.png")
    q.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
    q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    q.add_argument("--quick", action="store_true", help="depths 1-4, small batches, seconds")
    q.set_defaults(func=_cmd_drift)

    q = bsub.add_parser("report", help="all of the above, plus docs/BENCHMARKS.md")
    common(q, "docs/benchmarks")
    q.add_argument("--doc", default="docs/BENCHMARKS.md", help="markdown file to write")
    q.add_argument("--budget", default="1GiB", type=_budget,
                   help="budget of the capacity section (default 1GiB: its checks stay within minutes)")
    q.add_argument("--against", default=None, metavar="GIT_REV",
                   help="also time the engine of this git revision, side by side (before/after)")
    q.add_argument("--compile", nargs="?", const="inductor", default="inductor", metavar="BACKEND",
                   help="torch.compile backend of the compiled rows (speed and memory of revnet38; "
                        "default inductor: a few minutes more)")
    q.add_argument("--no-compile", dest="compile", action="store_const", const=None,
                   help="leave the compiled rows out")
    q.add_argument("--no-vit", dest="vit", action="store_false",
                   help="leave out the transformers (ViT vs RevViT memory at 224px and speed: ~10 min)")
    q.add_argument("--from", dest="from_json", default=None, metavar="REPORT_JSON",
                   help="measure nothing: render --doc again from a report.json this command wrote "
                        "(and the budget/budget.json beside it, if any)")
    q.set_defaults(func=_cmd_report)


def _budget(text: str) -> str:
    try:
        parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------

def _setup(args: argparse.Namespace) -> Path:
    # Step times without the kernel's page faults of memory freed a step earlier (memory.measure);
    # the memory points run in fresh processes with their own malloc settings.
    keep_freed_memory()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _progress(total: int, desc: str) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="pt", leave=False)
    return (lambda _: bar.update()), bar.close


def _save(out: Path, name: str, result: dict[str, Any]) -> Path:
    result = {**result, "environment": result.get("environment") or environment()}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _run_memory(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    family = getattr(args, "family", "cnn")
    defaults = dict(MEMORY_DEFAULTS[family])
    sweep = getattr(args, "sweep", "depth")
    if family == "gpt":
        defaults.update(sweep=sweep, contexts=GPT_CONTEXTS if sweep == "context" else [],
                        **{k: getattr(args, k, None) for k in ("embed_dim", "num_heads", "vocab_size")},
                        lm_loss=getattr(args, "lm_loss", None) or "fused")
        if sweep == "context":  # the sweep networks at GPT-2 small's depth, no named models
            defaults.update(units=[12], models=[])
    given = {k: getattr(args, k, None) for k in defaults}
    kw = {**defaults, **{k: v for k, v in given.items() if v is not None}, "block": args.block or "basic",
          "compile": getattr(args, "compile", None), "device": args.device, **over}
    try:
        points = len(sweep_plan(**{k: kw[k] for k in ("units", "kinds", "models", "block", "batch",
                                                        "model_batch", "compile") + (
                                       ("sweep", "contexts") if family == "gpt" else ())}))
    except ValueError as e:  # an unknown model
        raise SystemExit(f"revnet bench memory: {e}") from None
    tick, close = _progress(points, "memory")
    try:
        return memory_sweep(**kw, progress=tick)
    finally:
        close()


def _run_speed(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    try:
        family = family_of(model_kind(args.model))  # asked of the model, not read from its name
    except ValueError as e:  # an unknown model
        raise SystemExit(f"revnet bench speed: {e}") from None
    if family == "gpt":
        raise SystemExit(f"revnet bench speed: {args.model} is a language model; speed times image models. "
                         f"Fix: a RevNet or RevViT (for RevGPT's memory: revnet bench memory --family gpt).")
    vit = family == "vit"
    reference = args.reference or ("vit_" + args.model.removeprefix("revvit_") if vit else "resnet32")
    kw = {"model": args.model, "reference": None if reference.lower() == "none" else reference,
          "batch": args.batch or (16 if vit else 128), "repeats": args.repeats, "warmup": args.warmup,
          "inference_repeats": args.inference_repeats, "channels_last": args.channels_last,
          "against": getattr(args, "against", None), "compile": getattr(args, "compile", None),
          "image_size": args.image_size or (224 if vit else 32), "device": args.device, **over}
    tick, close = _progress(kw["repeats"], "speed " + ("channels_last" if kw["channels_last"] else ""))
    try:
        return speed(**kw, progress=tick)
    finally:
        close()


def _run_capacity(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    kw = {"models": args.models, "depth_batch": args.depth_batch, "verify_max_batch": args.verify_max_batch,
          "verify_max_units": args.verify_max_units, "image_size": args.image_size or 32,
          "device": args.device, **over}
    budget = parse_bytes(kw.pop("budget", args.budget))
    tick, close = _progress(0, "capacity probes")
    try:
        return capacity(budget, **kw, progress=tick)
    finally:
        close()


def _cmd_memory(args: argparse.Namespace) -> int:
    if args.breakdown:
        return _memory_breakdown(args)
    if args.nproc is not None:
        raise SystemExit("revnet bench memory: --nproc is the process count of --breakdown. Fix: add "
                         "--breakdown, or drop --nproc.")
    if args.run is not None:
        return _memory_of_run(args)
    _check_memory_flags(args)
    args.device = args.device or "cpu"
    out = _setup(args)
    quick = (_QUICK_GPT if args.family == "gpt" else _QUICK_MEMORY) if args.quick else {}
    if args.quick and args.family == "gpt" and args.sweep == "context":
        quick = {**quick, "units": [2]}
    result = _run_memory(args, **quick)
    print(text_table(*memory_table(result)))
    if result["config"]["models"]:
        print()
        print(text_table(*models_table(result)))
    _report_files(out, args.name or ("memory_context" if args.sweep == "context" else "memory"), result,
                  plot_memory)
    return 0


def _check_memory_flags(args: argparse.Namespace) -> None:
    """Refuses a combination of ``revnet bench memory`` flags that cannot be measured, naming the flag
    and the fix (before anything runs)."""
    def fail(message: str) -> None:
        raise SystemExit(f"revnet bench memory: {message}")

    gpt, family = args.family == "gpt", args.family
    flag = {k: "--" + k.replace("_", "-") for k in ("image_size", "block", *_GPT_ONLY)}
    if args.kinds:
        other = [k for k in args.kinds if family_of(k) != family]
        if other:
            fail(f"--kinds {' '.join(other)} are not --family {family}'s kinds "
                 f"({', '.join(FAMILIES[family])}). Fix: --family {family_of(other[0])}, or kinds of "
                 f"--family {family}.")
    if gpt:
        for name in ("image_size", "block"):
            if getattr(args, name) is not None:
                fail(f"{flag[name]} is for the image families (cnn, vit); --family gpt measures token ids. "
                     f"Fix: drop {flag[name]} (the tokens per sequence are --context).")
        example = {"context": MEMORY_DEFAULTS["gpt"]["context"], **GPT_SWEEP}
        for name in ("context", "embed_dim", "num_heads", "vocab_size"):
            value = getattr(args, name)
            if value is not None and value < 1:
                fail(f"{flag[name]} must be >= 1, got {value}. Fix: e.g. {flag[name]} {example[name]}.")
        if args.contexts is not None and min(args.contexts) < 1:
            fail(f"--contexts must all be >= 1 token, got {' '.join(map(str, args.contexts))}. Fix: e.g. "
                 f"--contexts {' '.join(map(str, GPT_CONTEXTS))}.")
        if args.sweep == "context":
            if args.units is not None and len(args.units) != 1:
                fail(f"--sweep context measures at one depth; got --units {' '.join(map(str, args.units))}. "
                     f"Fix: one value, e.g. --units 12.")
            if args.models:
                fail("--sweep context measures the sweep networks only. Fix: drop --models (the named "
                     "models are measured by --sweep depth).")
            if args.context is not None:
                fail("--context sets the one context of --sweep depth. Fix: give the context lengths "
                     "with --contexts.")
        elif args.contexts is not None:
            fail("--contexts are the context lengths of --sweep context. Fix: add --sweep context, or give "
                 "the one context of the depth sweep with --context.")
    else:
        given = [flag[k] for k in _GPT_ONLY if getattr(args, k) is not None]
        if given or args.sweep != "depth":
            what = " ".join(given) or f"--sweep {args.sweep}"
            fail(f"{what} {'is' if len(given) <= 1 else 'are'} for the language models. Fix: add "
                 f"--family gpt, or drop {what} (--family {family} takes images: --image-size).")
    for name in ("batch", "model_batch"):
        value = getattr(args, name)
        if value is not None and value < 1:
            fail(f"--{name.replace('_', '-')} must be >= 1, got {value}.")


# Flags of the sweep that --breakdown does not take: (dest, flag).
_NOT_BREAKDOWN = (("run", "--run"), ("units", "--units"), ("kinds", "--kinds"),
                  ("model_batch", "--model-batch"), ("block", "--block"), ("compile", "--compile"),
                  ("image_size", "--image-size"), ("quick", "--quick"),
                  *((k, "--" + k.replace("_", "-")) for k in _GPT_ONLY))


def _memory_breakdown(args: argparse.Namespace) -> int:
    """``revnet bench memory --breakdown``: outside torchrun, the same command launched under it on
    ``--nproc`` CPU processes; under it, :func:`revnet.bench.breakdown.breakdown` on every rank, and
    rank 0 prints the table and writes NAME.json, NAME.md and NAME.png into ``--out``."""
    def fail(message: str) -> NoReturn:
        raise SystemExit(f"revnet bench memory --breakdown: {message}")

    given = [flag for dest, flag in _NOT_BREAKDOWN if getattr(args, dest) not in (None, False)]
    given += ["--family"] if args.family != "cnn" else []
    given += ["--sweep"] if args.sweep != "depth" else []
    if given:
        fail(f"{' '.join(given)} {'is' if len(given) == 1 else 'are'} for the sweep; the breakdown takes "
             f"--models, --batch, --nproc, --out and --name. Fix: drop {' '.join(given)}.")
    if args.device not in (None, "cpu"):
        fail(f"it runs on CPU processes (gloo); got --device {args.device}. Fix: drop --device.")
    models = list(DEFAULT_MODELS) if args.models is None else args.models
    try:
        check_models(models)
    except ValueError as e:
        fail(str(e))
    if args.batch is not None and args.batch < 1:
        fail(f"--batch must be >= 1, got {args.batch}.")
    if "WORLD_SIZE" not in os.environ:
        return _launch_breakdown(args, 2 if args.nproc is None else args.nproc)
    if args.nproc is not None:
        fail("--nproc inside torchrun; drop --nproc (torchrun already started the processes).")
    try:
        info = init_from_env("cpu", timeout_s=1800.0)
    except DistributedError as e:
        fail(str(e))
    try:
        if info.world_size < 2:
            fail(f"the FSDP/DDP comparison needs >= 2 processes; this job has {info.world_size}.")
        started = time.time()

        def tick(row: dict[str, Any]) -> None:
            if info.is_main:
                print(f"{row['model']}, {row['mode']}: measured ({time.time() - started:.0f} s)", flush=True)

        result = breakdown(models, info=info, batch=args.batch, progress=tick)
        every: list[Any] = [None] * info.world_size
        dist.all_gather_object(every, result["rows"])
        # No rank tears its group down while another still talks over it (gloo aborted the process
        # now and then at exit without this): the models' wrappers collected, then all wait here.
        gc.collect()
        dist.barrier()
    finally:
        shutdown(info)
    if not info.is_main:
        return 0
    command = "revnet " + shlex.join(args.argv)
    result.update(command=command if "--nproc" in command else f"{command} --nproc {info.world_size}",
                  per_rank=every, environment=environment())
    table = breakdown_table(result)
    print(text_table(*table))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    name = args.name or "breakdown"
    md = out / f"{name}.md"
    env = result["environment"]
    md.write_text(f"Per process at {info.world_size} processes ({info.backend}), one AdamW step, float32 "
                  f"(`{result['command']}`; {env['cpu']}, torch {env['torch']}, {env['date']}):\n\n"
                  f"{markdown_table(*table)}\n")
    print(f"wrote {_save(out, name, result)}, {md} and {plot_breakdown(result, out / f'{name}.png')}")
    return 0


def _launch_breakdown(args: argparse.Namespace, nproc: int) -> int:
    """The same ``revnet bench memory --breakdown`` command under torchrun on ``nproc`` local CPU
    processes, one thread each (as ``revnet train --nproc`` launches itself)."""
    if nproc < 2:
        raise SystemExit(f"revnet bench memory --breakdown: --nproc must be >= 2, got {nproc}: the FSDP/DDP "
                         f"comparison needs >= 2 processes (what is sharded against what is replicated).")
    cmd = launch_command(nproc, without_option(list(args.argv), "--nproc"), command=None)
    env = dict(os.environ, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(p for p in (package_root(), os.environ.get("PYTHONPATH")) if p))
    print("launching: " + shlex.join(cmd), flush=True)
    return subprocess.run(cmd, env=env).returncode


def _memory_of_run(args: argparse.Namespace) -> int:
    """``revnet bench memory --run RUN_DIR``: the activation memory of one of the run's training steps,
    reversible (the units its plan stored, stored) vs plain, each in a fresh process
    (:func:`revnet.bench.memory.measure`), in the line ``revnet train`` ends with."""
    run = Path(args.run)
    try:
        config = json.loads((run / "config.json").read_text())
        summary = json.loads((run / "summary.json").read_text())
    except FileNotFoundError as e:
        raise SystemExit(f"revnet bench memory --run: no {e.filename}; is {run} the --out of a finished "
                         f"`revnet train` run?") from None
    step = step_of_run(config, summary)
    try:
        kind = model_kind(step["model"])
    except ValueError as e:
        raise SystemExit(f"revnet bench memory --run: {e}") from None
    if is_baseline(kind):
        raise SystemExit(f"revnet bench memory --run: {step['model']} has no reversible units; there is no "
                         f"reversible step to compare with plain backprop.")
    args.device = args.device or step["device"]
    out = _setup(args)
    shape = ({"context": step["context_length"]} if "context_length" in step  # a language model's run
             else {"image_size": step["image_size"], "in_chans": step["in_chans"]})
    point = {"model": step["model"], "batch": step["batch"], **shape, "exact": step["exact"],
             "amp": step["amp"], "device": args.device}
    try:
        rev = measure(kind=kind, stored=step["stored"], **point)
        plain = measure(kind=f"{kind}-plain", **point)
    except (RuntimeError, ValueError) as e:
        raise SystemExit(f"revnet bench memory --run: {e}") from None
    print(memory_line({**step, "method": rev["method"], "reversible_bytes": rev["activation_bytes"],
                       "plain_bytes": plain["activation_bytes"]}))
    print(f"wrote {_save(out, 'memory_run', {'run': str(run), 'reversible': rev, 'plain': plain})}")
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    out = _setup(args)
    result = _run_speed(args, **(_QUICK_SPEED if args.quick else {}))
    print(text_table(*speed_table(result)))
    print(" ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items()))
    for name, seconds in result.get("compile_s", {}).items():
        print(f"{name}: compiling took {seconds:.1f} s (first step beyond a step; not in the step times)")
    _report_files(out, "speed", result, plot_speed)
    return 0


def _cmd_budget(args: argparse.Namespace) -> int:
    out = _setup(args)
    results = []
    given = sys.argv[1:] if sys.argv[1:3] == ["bench", "budget"] else ["bench", "budget"]
    command = "revnet " + shlex.join(given)
    for model in (["revnet38"] if args.quick else args.models):
        r = budget_frontier(model, batch=8 if args.quick else args.batch, image_size=args.image_size or 32,
                            fractions=[0.0, 1.0] if args.quick else args.fractions,
                            repeats=2 if args.quick else args.repeats, device=args.device)
        results.append(r)
        print(text_table(*budget_table(r)))
        print(f"{model}: planning (profile + solve + checked steps) took {r['plan_s']:.1f} s, "
              f"{r['plan_s'] / r['points']['revnet']['median_s']:.1f} all-rebuild steps")
        # saved after every model: a long sweep stopped half-way keeps what it measured
        print(f"wrote {_save(out, 'budget', {'runs': results, 'command': command})} and "
              f"{plot_budget(results, out / 'budget.png')}")
    return 0


def _cmd_capacity(args: argparse.Namespace) -> int:
    out = _setup(args)
    result = _run_capacity(args, **(_QUICK_CAPACITY if args.quick else {}))
    print(text_table(*capacity_table(result)))
    _report_files(out, "capacity", result, plot_capacity)
    return 0




def _cmd_data(args: argparse.Namespace) -> int:
    out = _setup(args)
    quick = args.quick
    try:
        result = data_path(args.recipe, dataset=args.dataset, data_dir=args.data_dir, batch=args.batch,
                           batches=20 if quick else args.batches, repeats=3 if quick else args.repeats,
                           warmup=1 if quick else 2, device=args.device)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"revnet bench data: {e}") from None
    print(text_table(*data_table(result)))
    print(f"loader / training step = {result['ratio']:.1f}x")
    print(f"wrote {_save(out, 'data', result)}")
    return 0


def _cmd_drift(args: argparse.Namespace) -> int:
    out = _setup(args)
    state, cfg = None, {}
    if args.checkpoint:
        try:
            saved = load_checkpoint(Path(args.checkpoint))  # full, or sharded (read whole here)
        except FileNotFoundError:
            raise SystemExit(f"revnet bench drift: no checkpoint at {args.checkpoint}.") from None
        if not isinstance(saved, dict) or "model" not in saved or "config" not in saved:
            raise SystemExit(f"revnet bench drift: {args.checkpoint} is not a revnet train checkpoint "
                             f"(no 'model'/'config').")
        state, cfg = saved["model"], saved["config"]
    model = args.model or cfg.get("model", "revnet38")
    name = args.dataset or cfg.get("dataset", "fashion-mnist")
    extra = dict(cfg.get("synthetic") or {}) if name == "synthetic" else {}
    try:
        ds = load_dataset(name, "test", args.data_dir or cfg.get("data_dir"), **extra)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"revnet bench drift: cannot load the batch: {e}") from None
    quick = args.quick
    batch = 4 if quick else args.batch
    images = normalize(ds.images[:batch], ds.mean, ds.std)
    depths = [1, 2, 4] if quick else args.depths
    runs = (len(args.precisions) + len(args.exact_precisions)) * (2 if state else 1)
    tick, close = _progress(runs, "drift")
    try:
        result = drift(model, state_dict=state, images=images, depths=depths,
                             precisions=args.precisions, exact_precisions=args.exact_precisions,
                             num_classes=ds.num_classes, device=args.device, progress=tick,
                             **({} if args.exact_bits is None else {"exact_bits": args.exact_bits}))
    except ValueError as e:
        raise SystemExit(f"revnet bench drift: {e}") from None
    finally:
        close()
    result["config"].update(checkpoint=args.checkpoint, dataset=name)
    print(text_table(*drift_table(result)))
    if args.cost:
        result["cost"] = exact_cost(
            model, batch=8 if quick else args.cost_batch, image_size=ds.image_size[0], in_chans=ds.in_chans,
            repeats=2 if quick else args.repeats, warmup=1 if quick else 2, device=args.device)
        print()
        print(text_table(*exact_cost_table(result["cost"])))
    result["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    _report_files(out, "drift", result, plot_drift)
    return 0


def _report_files(out: Path, name: str, result: dict[str, Any], plot: Callable[..., Path]) -> None:
    print(f"wrote {_save(out, name, result)} and {plot(result, out / f'{name}.png')}")


def _planner_results(out: Path) -> dict[str, Any] | None:
    """What `revnet bench budget --out OUT/budget` measured, if it was run (the planner's frontier
    takes ~40 min on a 2-core CPU, so the report renders it rather than measuring it again)."""
    path = out / "budget" / "budget.json"
    if not path.exists():
        print(f"no {path}: the report leaves out the planner (run `revnet bench budget --out {path.parent}`)")
        return None
    return {"command": f"revnet bench budget --out {path.parent}", **json.loads(path.read_text())}


def _cmd_report(args: argparse.Namespace) -> int:
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        doc = Path(args.doc)
        doc.write_text(render_report(saved["meta"], saved["memory"], saved["speed"], saved["capacity"],
                                     os.path.relpath(Path(args.from_json).parent, doc.parent),
                                     saved.get("flatness"), saved.get("data"), saved.get("compiled_memory"),
                                     saved.get("vit"),
                                     _planner_results(Path(args.from_json).parent) or saved.get("budget")))
        print(f"wrote {doc} from {args.from_json} (measured {saved['meta']['environment']['date']})")
        return 0
    out = _setup(args)
    quick, started, env = args.quick, time.time(), environment()
    ns = argparse.Namespace
    common = {"image_size": args.image_size or 32, "device": args.device}
    memory = _run_memory(ns(
        units=[1, 3, 9, 18, 36], kinds=list(KINDS), batch=32, model_batch=128, block="basic",
        models=[m for pair in PAPER_PAIRS for m in pair], **common),
        **(_QUICK_MEMORY | {"models": ["resnet32", "revnet38"]} if quick else {}))
    _report_files(out, "memory", memory, plot_memory)
    # The flatness target at the paper's batch, where activations dominate the peak.
    flat = _run_memory(ns(units=[3, 36], kinds=["revnet"], batch=128, model_batch=128, block="basic",
                          models=[], **common), **({"units": [1, 3], "batch": 16} if quick else {}))
    _save(out, "memory_flatness", flat)
    compiled = None
    if args.compile:  # revnet.compile must keep the reversible engine's memory: the same step, compiled
        compiled = _run_memory(ns(units=[], kinds=["revnet", "revnet-plain"], batch=32, model_batch=128,
                                  block="basic", models=["revnet38"], compile=args.compile, **common),
                               **({"model_batch": 16} if quick else {}))
        _save(out, "memory_compiled", compiled)
    speeds = []
    plan = [{"channels_last": True, "against": args.against, "compile": args.compile},
            {"channels_last": False, "compile": args.compile}]
    if not quick:
        # The paper's deepest CIFAR pair, for MemCNN's "RevNet-164 1.47x slower than ResNet-164".
        plan.append({"model": "revnet164", "reference": "resnet164", "batch": 32, "repeats": 5,
                     "kinds": ["revnet", "revnet-plain"], "inference_repeats": 0, "compile": args.compile})
        if args.against:  # where per-block Python overhead shows: many small blocks
            plan.append({"model": "revnet110", "reference": None, "batch": 8, "repeats": 15,
                         "kinds": ["revnet", "revnet-plain"], "inference_repeats": 0,
                         "against": args.against})
    for over in plan:
        base = ns(model="revnet38", reference="resnet32", batch=128, repeats=7, warmup=2,
                  inference_repeats=15, channels_last=True, compile=None, **common)
        speeds.append(_run_speed(base, **over, **(_QUICK_SPEED if quick else {})))
        print(text_table(*speed_table(speeds[-1])))
    _save(out, "speed", {"runs": speeds})
    plot_speed(speeds[0], out / "speed.png")
    capacity = _run_capacity(ns(
        budget=args.budget, models=["resnet110", "revnet110"], depth_batch=128, verify_max_batch=2048,
        verify_max_units=36, **common), **(_QUICK_CAPACITY if quick else {}))
    print(text_table(*capacity_table(capacity)))
    _report_files(out, "capacity", capacity, plot_capacity)
    # The data path with all augmentation on (crop + flip: the default recipe's model and step),
    # on synthetic data of the same shape if Fashion-MNIST is absent.
    data_kw = {"batches": 20 if quick else 200, "repeats": 3 if quick else 7, "warmup": 1 if quick else 2,
               "device": args.device}
    try:
        loader_vs_step = data_path("fashion-mnist-long", **data_kw)
    except (FileNotFoundError, ValueError):
        loader_vs_step = data_path("fashion-mnist-long", dataset="synthetic", **data_kw)
    print(text_table(*data_table(loader_vs_step)))
    _save(out, "data", loader_vs_step)
    vit = None
    if args.vit:  # the transformers: ViT vs RevViT across depth and at base/large size, and speed
        quick_memory = {"units": [1, 2], "batch": 2, "models": [], "image_size": 32}
        vit_memory = _run_memory(ns(family="vit", block="basic", device=args.device, image_size=None),
                                 **(quick_memory if quick else {}))
        _report_files(out, "memory_vit", vit_memory, plot_memory)
        vit_speed = _run_speed(ns(model="revvit_base", reference="vit_base", batch=8, repeats=5, warmup=1,
                                  inference_repeats=5, channels_last=False, compile=args.compile,
                                  image_size=None, device=args.device),
                               **({"model": "revvit_small", "reference": "vit_small", "batch": 2,
                                   "repeats": 2, "inference_repeats": 2, "image_size": 32, "compile": None}
                                  if quick else {}))
        print(text_table(*speed_table(vit_speed)))
        _save(out, "speed_vit", vit_speed)
        vit = {"memory": vit_memory, "speed": vit_speed}
    flags = [("--quick", quick), (f"--budget {args.budget}", args.budget != "1GiB" and not quick),
             (f"--against {args.against}", args.against), (f"--threads {args.threads}", args.threads),
             ("--no-compile", not args.compile), ("--no-vit", not args.vit),
             (f"--compile {args.compile}", args.compile not in (None, "inductor")),
             (f"--device {args.device}", args.device != "cpu")]
    meta = {"command": " ".join([f"revnet bench report --out {args.out} --doc {args.doc}",
                                 *(f for f, on in flags if on)]),
            "environment": env, "loadavg_end": environment()["loadavg"],
            "minutes": (time.time() - started) / 60}
    budget = _planner_results(out)
    _save(out, "report", {"meta": meta, "memory": memory, "flatness": flat, "speed": speeds,
                          "capacity": capacity, "data": loader_vs_step, "compiled_memory": compiled,
                          "vit": vit, "budget": budget, "environment": env})
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_report(meta, memory, speeds, capacity, os.path.relpath(out, doc.parent), flat,
                                 loader_vs_step, compiled, vit, budget))
    print(f"wrote {doc} in {meta['minutes']:.1f} min")
    return 0
