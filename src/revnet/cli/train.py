"""``revnet train``: flags onto a :class:`TrainConfig`, the run, and what it printed."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import pickle
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..training.config import CONVERT_METHODS, RECIPES, TrainConfig, headline, is_reversible_model
from ..training.distributed import DistributedError, launch_command
from ..training.footprint import memory_line, saved_bytes_of_run
from ..training.loop import TrainingDivergedError, fit
from ..training.precision import AMP_MODES
from ..training.setup import auto_nproc, per_process_batch
from ._common import rank, without_option

__all__ = ["add_parser"]


def _or_auto(cast: Callable[[str], Any], expected: str) -> Callable[[str], Any]:
    """An argparse type: ``auto``, or ``cast`` of the text (else an error saying ``expected``)."""
    def parse(text: str) -> Any:
        if text == "auto":
            return text
        try:
            return cast(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected} or auto, got {text!r}") from None
    return parse


_nproc = _or_auto(int, "a number of processes")
_gamma = _or_auto(float, "a number in (0, 1)")

# flag -> TrainConfig field; every flag defaults to None so that only what the user
# typed overrides the recipe (or, with --resume, the saved configuration).
_TRAIN_FLAGS: list[tuple[str, str, dict[str, Any]]] = [
    ("--model", "model", {"help": "model name (see `revnet models`); default revnet38"}),
    ("--dataset", "dataset", {"help": "fashion-mnist (default), cifar10, cifar100, synthetic, or text "
                                      "(bytes of a folder of text files, for a language model)"}),
    ("--data-dir", "data_dir", {"help": "data folder (default: $REVNET_DATA or the system location; text: "
                                        "the Python standard library's source)"}),
    ("--context-length", "context_length", {"type": int, "help": "text: bytes per training window (default "
                                                                 "128)"}),
    ("--epochs", "epochs", {"type": float, "help": "passes over the training set (may be fractional)"}),
    ("--steps", "steps", {"type": int, "help": "total optimiser steps (overrides --epochs)"}),
    ("--batch-size", "batch_size", {"type": int, "help": "global batch: samples per optimiser step over "
                                     "all processes (each of N processes takes batch/N); default 128"}),
    ("--lr", "lr", {"type": float, "help": "peak learning rate"}),
    ("--memory-budget", "memory_budget", {
        "metavar": "SIZE", "help": "store the blocks that fit SIZE of activation memory (e.g. 1.5GiB; auto: "
                                   "what the GPU has free; min: no more than rebuilding every block needs; "
                                   "none: rebuild every block, whatever the recipe says) and rebuild the "
                                   "rest: revnet.plan, once before training; the plan goes to plan.txt"}),
    ("--optimizer", "optimizer", {"choices": ["sgd", "adamw"],
                                  "help": "sgd (Nesterov momentum; default) or adamw (transformer recipes)"}),
    ("--momentum", "momentum", {"type": float, "help": "SGD momentum; AdamW's beta1"}),
    ("--weight-decay", "weight_decay", {"type": float}),
    ("--schedule", "schedule", {"choices": ["onecycle", "step"]}),
    ("--crop-pad", "crop_pad", {"type": int, "help": "random-crop padding in pixels (0: none)"}),
    ("--label-smoothing", "label_smoothing", {"type": float}),
    ("--seed", "seed", {"type": int}),
    ("--device", "device", {"help": "auto (cuda if present), cpu, cuda, cuda:N"}),
    ("--amp", "amp", {"choices": list(AMP_MODES),
                      "help": "mixed precision; auto (default): bf16 on GPUs that have it (else fp16); on "
                              "CPUs bf16 with AMX, float32 without native bf16, and where the flags do not "
                              "tell a timed probe of one step in each decides (the reason is logged)"}),
    ("--eval-every", "eval_every", {"type": int, "help": "steps between evaluations (default: each epoch)"}),
    ("--log-every", "log_every", {"type": int}),
    ("--ckpt-every", "ckpt_every", {"type": int}),
    ("--out", "out", {"help": "run directory (default runs/MODEL-DATASET-TIME)"}),
    ("--norm", "norm", {"choices": ["batch", "group"],
                        "help": "batch (BatchNorm, default) or group (GroupNorm: per-sample statistics)"}),
    ("--accum-steps", "accum_steps", {"type": int, "help": "micro-batches per optimiser step on each process "
                                      "(gradient accumulation; DDP all-reduces only the last); default 1"}),
    ("--lr-scaling", "lr_scaling", {"choices": ["none", "linear"],
                                    "help": "none (default): peak lr = --lr whatever the number of processes "
                                            "(the batch is global); linear: peak lr = --lr x world size "
                                            "(Goyal et al. 2017), for a --batch-size grown with the "
                                            "world size"}),
    ("--dist-timeout", "dist_timeout", {"type": float, "help": "seconds the rendezvous and each collective "
                                        "wait for the other processes before failing (default 600)"}),
    ("--grad-angle-every", "grad_angle_every", {
        "type": int, "metavar": "K", "help": "every K steps, log the angle between the reversible and the "
                                             "plain-autograd gradient (docs/FIDELITY.md)"}),
    ("--drift-guard-every", "drift_guard_every", {
        "type": int, "metavar": "N", "help": "every N steps, rebuild each reversible sequence's input and "
                                             "compare it with the stored one"}),
    ("--drift-guard-threshold", "drift_guard_threshold", {
        "type": float, "help": "relative rebuild error that trips the guard (default 0.1)"}),
    ("--init", "init", {"metavar": "CHECKPOINT", "help": "start from these weights (a last.pt/best.pt, or a "
                                                         "saved state dict); a classifier head of another "
                                                         "shape starts fresh (fine-tuning)"}),
    ("--convert", "convert", {"choices": list(CONVERT_METHODS),
                              "help": "make the (residual) model reversible with "
                                                               "revnet.convert before training "
                                                               "(docs/guide/convert.md)"}),
    ("--gamma", "convert_gamma", {"type": _gamma, "help": "the gamma of --convert: auto (default; the "
                                                          "smallest the rebuild allows for the depth) or a "
                                                          "number in (0, 1)"}),
    ("--drift-guard-action", "drift_guard_action", {
        "choices": ["warn", "exact", "store"], "help": "past the threshold: warn (default), switch the "
                                                       "sequence to exact mode, or store its activations"}),
]


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Registers ``revnet train``."""
    p = sub.add_parser("train", help="train a model (default: RevNet-38 on Fashion-MNIST)",
                       description="Train a model; every run writes config, metrics, checkpoints, "
                                   "a summary and curves into its run directory.")
    p.add_argument("--recipe", choices=sorted(RECIPES), default=None,
                   help="starting values: fashion-mnist (default), fashion-mnist-long, fashion-mnist-vit, "
                        "text-lm (a byte-level RevGPT on the standard library's source), paper-cifar, "
                        "paper-imagenet")
    for flag, dest, kw in _TRAIN_FLAGS:
        p.add_argument(flag, dest=dest, default=None, **kw)
    p.add_argument("--no-reversible", dest="reversible", action="store_false", default=None,
                   help="plain backprop on the same model (the baseline)")
    p.add_argument("--fsdp", dest="fsdp", action="store_true", default=None,
                   help="with several processes, shard parameters, gradients and optimizer state with "
                        "FSDP2, per reversible block and the rest of the model, instead of DDP "
                        "(docs/DISTRIBUTED.md)")
    p.add_argument("--checkpoint", dest="checkpoint", choices=("auto", "full", "sharded"), default=None,
                   help="checkpoint files: full (one torch file), sharded (each --fsdp rank writes its "
                        "own part with torch.distributed.checkpoint; no rank holds the whole model); "
                        "auto (default): sharded under --fsdp")
    p.add_argument("--optimizer-in-backward", dest="optimizer_in_backward", action="store_true", default=None,
                   help="step each parameter inside backward, as soon as its gradient is complete, so the "
                        "whole model's gradients never exist at once (revnet.optimizer_in_backward)")
    p.add_argument("--exact", dest="exact", action="store_true", default=None,
                   help="exact (fixed-point) couplings: bit-exact reconstruction at any depth (also "
                        "of --convert's)")
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None)
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", default=None)
    p.add_argument("--compile", dest="compile", nargs="?", const="inductor", default=None, metavar="BACKEND",
                   help="revnet.compile the model: F and G inside the engine, the openers, stem and head "
                        "(torch.compile backend, default inductor; the first step compiles)")
    p.add_argument("--no-compile", dest="compile", action="store_const", const="",
                   help="train eagerly (when the recipe compiles)")
    p.add_argument("--sync-bn", dest="sync_bn", action="store_true", default=None,
                   help="under DDP, convert BatchNorm to SyncBatchNorm (statistics over the global batch; "
                        "CUDA only)")
    p.add_argument("--nproc", type=_nproc, default="auto", metavar="N",
                   help="run on N processes on this machine: launches `torchrun --standalone "
                        "--nproc-per-node N -m revnet train ...` (see docs/DISTRIBUTED.md); 1: this process "
                        "alone, with a thread per core; auto (default): on a CPU, one one-thread process per "
                        "core where that trains faster (the choice and its reason go to config.json)")
    p.add_argument("--nproc-reason", dest="nproc_reason", default=None, help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help="continue the run in --out from last.pt")
    p.add_argument("--no-memory-report", dest="memory_report", action="store_false",
                   help="skip the reversible-vs-plain activation memory comparison at the end (bytes "
                        "saved for backward in one step, counted in this process; `revnet bench memory "
                        "--run RUN_DIR` measures the peaks in fresh processes)")
    p.set_defaults(func=_cmd_train, needs_extras=True)


def _train_config(args: argparse.Namespace) -> Any:
    given = {dest: getattr(args, dest) for _, dest, _ in _TRAIN_FLAGS}
    given.update(reversible=args.reversible, flip=args.flip, channels_last=args.channels_last,
                 sync_bn=args.sync_bn, exact=args.exact, compile=args.compile,
                 optimizer_in_backward=args.optimizer_in_backward, fsdp=args.fsdp,
                 checkpoint=args.checkpoint, nproc_reason=args.nproc_reason)
    given = {k: v for k, v in given.items() if v is not None}
    if given.get("compile") == "":  # --no-compile
        given["compile"] = None
    if str(given.get("memory_budget", "")).lower() == "none":  # every block rebuilt, whatever the recipe says
        given["memory_budget"] = None
    if args.resume:
        if "out" not in given:
            raise SystemExit("revnet train: --resume needs --out RUN_DIR (the run to continue).")
        saved = Path(given["out"]) / "config.json"
        if not saved.is_file():
            raise SystemExit(f"revnet train: --resume: no {saved}; is --out a run directory?")
        base = json.loads(saved.read_text())
        base["milestones"] = tuple(base.get("milestones", ()))
    else:
        recipe = args.recipe or "fashion-mnist"
        if recipe == "paper-imagenet" and "dataset" not in given:
            raise SystemExit(
                "revnet train: --recipe paper-imagenet documents the paper's ImageNet schedule "
                "(RevNet-104, batch 256, 600k steps); revnet ships no ImageNet loader, and without "
                "--dataset it would train on Fashion-MNIST. Pass --dataset to run the schedule on "
                "another data set.")
        base = {**dataclasses.asdict(TrainConfig()), **RECIPES[recipe], "recipe": recipe}
    fields = {**base, **given}
    if "out" not in given and not args.resume:
        fields["out"] = f"runs/{fields['model']}-{fields['dataset']}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        return TrainConfig(**fields)
    except ValueError as e:
        raise SystemExit(f"revnet train: {e}") from None


def _processes(args: argparse.Namespace, config: Any) -> tuple[int, str]:
    """How many local processes train, and why: ``--nproc N`` as asked; ``auto`` by
    :func:`auto_nproc`'s rule, or on ``--resume`` as many as the run trained on (the same run)."""
    if args.nproc != "auto":
        if args.nproc < 1:
            raise SystemExit(f"revnet train: --nproc must be >= 1, got {args.nproc}.")
        if "WORLD_SIZE" in os.environ:
            raise SystemExit("revnet train: --nproc inside torchrun; drop --nproc (torchrun already "
                             "started the processes).")
        return args.nproc, f"asked for (--nproc {args.nproc})"
    if "WORLD_SIZE" in os.environ:  # under torchrun: as launched
        return 1, config.nproc_reason or f"launched by torchrun ({os.environ['WORLD_SIZE']} processes)"
    if args.resume:
        # no readable checkpoint (missing, not a torch file, not a training state): fit() says so
        with contextlib.suppress(OSError, RuntimeError, EOFError, pickle.UnpicklingError, AttributeError):
            saved = torch.load(Path(config.out) / "last.pt", mmap=True, weights_only=False,
                               map_location="cpu")
            world = int(saved.get("world_size", 1))
            return world, f"auto: as the run trained ({world} process{'es' if world > 1 else ''})"
    return auto_nproc(config)


def _launch(args: argparse.Namespace, config: Any, nproc: int, reason: str) -> int:
    """``revnet train --nproc N ...``: the same command under torchrun on N local processes."""
    try:
        per_process_batch(config, nproc)
    except ValueError as e:
        raise SystemExit(f"revnet train: {e}") from None
    rest = list(args.argv)
    rest = without_option(rest[rest.index("train") + 1:], "--nproc")
    if "--out" not in rest and not any(a.startswith("--out=") for a in rest):
        rest += ["--out", config.out]  # one run directory, not one timestamp per process
    cmd = launch_command(nproc, rest)
    print(f"{reason}\nlaunching: {shlex.join(cmd)}", flush=True)
    cmd += ["--nproc-reason", reason]  # config.json says why this many
    # one thread per process unless asked otherwise (torchrun would set it too, with a warning)
    proc = subprocess.Popen(cmd, env={"OMP_NUM_THREADS": "1", **os.environ})

    # Ctrl-C reaches torchrun and its workers from the terminal already; a SIGTERM sent to
    # this process alone is passed on, so the workers save a checkpoint and stop.
    def forward(signum: int, _frame: Any) -> None:
        if signum == signal.SIGTERM:
            proc.send_signal(signum)

    old = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        return proc.wait()
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _mode(config: TrainConfig) -> str:
    """How the model trains, for the first line: a residual baseline has nothing to rebuild."""
    try:  # built on the meta device: no memory, no initialisation cost
        rebuilds = is_reversible_model(config.model)
    except (TypeError, ValueError):  # the run itself reports a model it cannot build
        rebuilds = True
    if not rebuilds:
        return "no reversible blocks: plain backprop"
    return "reversible" if config.reversible else "plain backprop"


def _cmd_train(args: argparse.Namespace) -> int:
    config = _train_config(args)
    nproc, reason = _processes(args, config)
    if nproc > 1:
        return _launch(args, config, nproc, reason)
    config = dataclasses.replace(config, nproc_reason=reason)
    main_rank = rank() == 0
    if main_rank:
        print(f"training {config.model} on {config.dataset} ({_mode(config)}) -> {config.out}")
    try:
        summary = fit(config, resume=args.resume, progress=sys.stderr.isatty())
    except (TrainingDivergedError, DistributedError, FileNotFoundError, FileExistsError, ValueError) as e:
        print(f"revnet train{'' if main_rank else f' (rank {rank()})'}: {e}", file=sys.stderr)
        return 1
    if not main_rank:
        return 130 if summary["interrupted"] else 0
    if summary.get("nothing_to_do"):
        key, _ = headline(config)
        print(f"nothing to do: {config.out} finished at step {summary['step']} of {summary['total_steps']} "
              f"({key.replace('_', ' ')} {summary.get(key, float('nan')):.4f}); its results are in "
              f"{config.out}/summary.json. To train more, start a new --out with more --epochs/--steps.")
        return 0
    if summary["interrupted"]:
        world = summary.get("world_size", 1)
        again = f"revnet train --nproc {world} --resume" if world > 1 else "revnet train --resume"
        print(f"interrupted at step {summary['step']}/{summary['total_steps']}; checkpoint saved. "
              f"Continue with: {again} --out {config.out}"
              + (" (or your torchrun command with --resume)" if world > 1 else ""))
        return 130
    key, _ = headline(config)
    rate = "tokens_per_s" if "tokens_per_s" in summary else "images_per_s"
    unit = "tok/s" if rate == "tokens_per_s" else "img/s"
    print(f"{key.replace('_', ' ')} {summary[key]:.4f}  (best {summary['best_' + key]:.4f})  "
          f"in {summary['wall_seconds']:.0f} s, {summary[rate]:.0f} {unit}, "
          f"peak memory {summary['peak_memory_bytes'] / 2**20:.0f} MiB")
    print(f"run directory: {config.out} (curves.png, metrics.jsonl, summary.json, best.pt)")
    if args.memory_report:
        _memory_report(summary)
    return 0


def _memory_report(summary: dict[str, Any]) -> None:
    """What reversibility saved: the bytes one training step of the run keeps for backward,
    reversible (the units its plan stored, stored) vs plain, in its precision, at one process's
    micro-batch; counted in this process (revnet.training.footprint), nothing printed for a model
    with nothing to rebuild."""
    try:
        report = saved_bytes_of_run(summary["config"], summary)
    except (RuntimeError, OSError) as e:  # a report, not the job: say so and go on
        print(f"(activation memory comparison skipped: {e})", file=sys.stderr)
        return
    if report is not None:
        print(memory_line(report))
        print(f"(the bytes autograd keeps for backward, counted in this process; the step's peak, which adds "
              f"the backward's working memory, in fresh processes: revnet bench memory --run "
              f"{summary['config']['out']})")
