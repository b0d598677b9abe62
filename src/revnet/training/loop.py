"""Training: ``fit(config) -> metrics``, with checkpoints that survive interruption.

A run directory holds ``config.json``, ``metrics.jsonl`` (one JSON object per log line),
``last.pt`` and ``best.pt`` (written atomically), ``summary.json`` and ``curves.png``.
Under ``torchrun`` the same loop runs DistributedDataParallel, rank 0 writing the run
directory (docs/DISTRIBUTED.md).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..fidelity import DriftGuard, gradient_angle
from .config import TrainConfig, headline, lr_at
from .distributed import (
    DistInfo,
    DistributedError,
    init_from_env,
    is_group_failure,
    lost_contact,
    shutdown,
)
from .evaluate import evaluate
from .plots import plot_run
from .precision import AMP_DTYPES, autocast
from .setup import Run, build_run, peak_memory_bytes, prediction_loss, to_layout
from .signals import stop_on_signals
from .state import restore, save_checkpoint, write_json

__all__ = ["TrainingDivergedError", "fit"]

log = logging.getLogger(__name__)


class TrainingDivergedError(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _train_step(run: Run, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimiser step on this process's batch: images ``x`` (B, C, H, W) and labels ``y`` (B,),
    or tokens ``x`` and next tokens ``y`` (B, T). Returns the mean loss and the correct predictions
    (a language model computes its loss without logits, :mod:`revnet.models.lm_loss`: no count).

    With ``accum_steps = A`` the batch runs as A micro-batches of B/A whose gradients add
    up (each loss divided by A: the mean over the whole batch). Under DDP all but the last
    backward run inside ``no_sync()``, so gradients are all-reduced once per step.
    """
    net = run.net if run.net is not None else run.model
    steps = run.config.accum_steps
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum, correct = torch.zeros((), device=x.device), torch.zeros((), dtype=torch.long, device=x.device)
    for i, (xi, yi) in enumerate(zip(x.chunk(steps), y.chunk(steps), strict=True)):
        last = i == steps - 1
        syncing = contextlib.nullcontext() if last or not hasattr(net, "no_sync") else net.no_sync()
        with syncing:
            with autocast(run.device, run.config.amp):
                if run.train.unit == "tokens":
                    loss, logits = net(xi, targets=yi), None
                else:
                    logits = net(to_layout(xi, run.config))
                    loss = prediction_loss(logits, yi, run.config.label_smoothing)
            scaled = loss / steps if steps > 1 else loss
            (run.scaler.scale(scaled) if run.scaler is not None else scaled).backward()
        loss_sum += loss.detach()
        if logits is not None:
            correct += (logits.detach().argmax(-1) == yi).sum()
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    return loss_sum / steps, correct


def _fidelity_rows(run: Run, x: torch.Tensor, y: torch.Tensor) -> list[dict[str, Any]]:
    """Gradient-angle telemetry and the drift guard, when due, on the batch of the coming step.

    Both leave the model, buffers and RNG as they were, so the step that follows is the
    one a run without them takes (revnet.fidelity); the guard may switch a sequence to
    exact mode or stored activations.
    """
    cfg, rows = run.config, []

    def forward(m: nn.Module) -> torch.Tensor:
        return m(to_layout(x, cfg))

    def loss_fn(m: nn.Module) -> torch.Tensor:
        with autocast(run.device, cfg.amp):
            return prediction_loss(forward(m), y, cfg.label_smoothing)

    if cfg.grad_angle_every and run.step % cfg.grad_angle_every == 0:
        rows.append({"step": run.step, **gradient_angle(run.model, loss_fn)})
    if cfg.drift_guard_every and run.step % cfg.drift_guard_every == 0:
        with autocast(run.device, cfg.amp):
            guard = DriftGuard(cfg.drift_guard_threshold, cfg.drift_guard_action)
            rows += guard.check(run.model, forward, run.step)
    return rows


class _Window:
    """Running sums between two log lines (kept on the device: no sync per step)."""

    def __init__(self) -> None:
        self.loss, self.correct, self.seen, self.steps, self.start = 0.0, 0, 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, correct: torch.Tensor, n: int) -> None:
        self.loss, self.correct = loss + self.loss, correct + self.correct
        self.seen, self.steps = self.seen + n, self.steps + 1

    def totals(self, run: Run) -> tuple[float, int, int]:
        """Mean loss, correct and seen over the window, summed over all ranks (a collective)."""
        loss, correct, seen = run.dist.sum([float(self.loss), int(self.correct), self.seen], run.device)
        return loss / run.dist.world_size / max(self.steps, 1), int(correct), int(seen)

    def check(self, run: Run, loss: float | None = None) -> float:
        """Mean loss of the window; raises before anything is logged or saved if it is not finite.

        Under DDP the loss is averaged over ranks first, so every rank takes the same decision.
        """
        loss = self.totals(run)[0] if loss is None else loss
        if not math.isfinite(loss):
            raise TrainingDivergedError(
                f"loss became {loss} by step {run.step}; the last good checkpoint is "
                f"{run.out / 'last.pt'}. Try a lower --lr, --amp none, or a different --seed.")
        return loss

    def row(self, run: Run) -> dict[str, Any]:
        loss, correct, seen = self.totals(run)
        self.check(run, loss)
        elapsed = time.perf_counter() - self.start
        accuracy = {"accuracy": correct / max(seen, 1)} if run.train.unit == "images" else {}
        return {"step": run.step, "epoch": run.step / len(run.train), "loss": loss, **accuracy,
                "lr": run.optimizer.param_groups[0]["lr"],
                f"{run.train.unit}_per_s": seen / max(elapsed, 1e-9),
                "peak_memory_bytes": peak_memory_bytes(run.device)}


def fit(config: TrainConfig, *, resume: bool = False, progress: bool = False) -> dict[str, Any]:
    """Trains ``config.model`` on ``config.dataset``; returns the run's summary.

    Under ``torchrun`` (``WORLD_SIZE`` > 1) the process joins the process group (gloo on
    CPU, nccl on CUDA; an existing group is reused) and trains a DistributedDataParallel
    copy on its ``batch_size / world_size`` share of each global batch; rank 0 alone writes
    the run directory (docs/DISTRIBUTED.md).

    Args:
        config: the run.
        resume: continue from ``config.out/last.pt`` (same configuration required).
        progress: show a tqdm bar (else log lines through ``logging``); rank 0 only.

    Returns:
        The summary also written to ``summary.json`` (``interrupted`` is True when a
        signal stopped the run early), the same on every rank.

    Raises:
        TrainingDivergedError: the loss became non-finite; ``last.pt`` is the last good state.
        DistributedError: the process group failed (a rank died, the rendezvous or a
            collective timed out); ``last.pt`` is the last complete checkpoint.
        ValueError: among others, a batch size that the world size does not divide.
    """
    info = init_from_env(config.device, config.dist_timeout)
    try:
        summary = _fit(config, info, resume, progress)
    except RuntimeError as e:
        if info.enabled and not isinstance(e, DistributedError) and is_group_failure(e):
            raise lost_contact(e) from e
        raise
    shutdown(info)  # only on success: after a failure the group may be unusable
    return summary


def _fit(config: TrainConfig, info: DistInfo, resume: bool, progress: bool) -> dict[str, Any]:
    """:func:`fit` once the process knows its rank: rank 0 alone writes files and logs."""
    if resume and config.amp == "auto":
        config = _saved_precision(config, info)
    run = build_run(config, info, init_weights=not resume)
    last = run.out / "last.pt"
    error: BaseException | None = None
    if info.is_main:  # the run directory lives on rank 0's node; the others learn its verdict
        if resume and not last.exists():
            error = FileNotFoundError(f"resume: no checkpoint {last}; check --out.")
        elif not resume and last.exists():
            error = FileExistsError(f"{run.out} already holds a run (last.pt); pass --resume to "
                                    f"continue it or choose another --out.")
    info.raise_together(error)
    if resume:
        restore(run, last)  # a changed configuration is an error here
        if run.step >= run.total:  # a scheduler that requeues a finished job: nothing to do, no failure
            return _finished(run, info)
        log.info("resumed from %s at step %d", last, run.step)
    if info.enabled:
        log.info("DDP: %d processes (%s), %d samples per process per step, peak lr %g", info.world_size,
                 info.backend, run.train.batch_size, config.lr * run.lr_scale)
    if info.is_main:
        run.out.mkdir(parents=True, exist_ok=True)
        write_json(asdict(run.config), run.out / "config.json")
        if run.plan is not None:
            (run.out / "plan.txt").write_text(f"{run.plan}\n")
    t0 = time.perf_counter()
    # Under torchrun a Ctrl-C reaches each worker twice (from the terminal and from torchrun):
    # within the grace period the second one does not abort the checkpoint being written.
    with stop_on_signals(grace=5.0 if info.enabled else 0.0) as stop, \
            (open(run.out / "metrics.jsonl", "a") if info.is_main else contextlib.nullcontext()) as metrics:
        interrupted = _loop(run, metrics, stop, progress and info.is_main)
    summary = _summarize(run, time.perf_counter() - t0, interrupted)
    if info.is_main:
        write_json(summary, run.out / "summary.json")
        with contextlib.suppress(Exception):  # a plot is a convenience; never lose a run to it
            plot_run(run.out)
    info.barrier()  # no rank leaves before rank 0's files are complete
    return summary


def _finished(run: Run, info: DistInfo) -> dict[str, Any]:
    """``--resume`` of a run that already took its last step: its summary, marked
    ``nothing_to_do``. A run stopped between its last checkpoint and its summary gets its final
    evaluation and summary now."""
    summary = None
    if info.is_main:
        with contextlib.suppress(OSError, ValueError):
            summary = json.loads((run.out / "summary.json").read_text())
    summary = info.broadcast(summary)
    if summary is None:
        with open(run.out / "metrics.jsonl", "a") if info.is_main else contextlib.nullcontext() as metrics:
            _evaluate_and_keep_best(run, metrics)
        summary = _summarize(run, 0.0, False)
        if info.is_main:
            write_json(summary, run.out / "summary.json")
    log.info("resume: %s finished at step %d of %d; nothing to do", run.out, run.step, run.total)
    info.barrier()
    return {**summary, "nothing_to_do": True}


def _saved_precision(config: TrainConfig, info: DistInfo) -> TrainConfig:
    """A resumed ``amp="auto"`` run keeps the precision it chose at its start (its config.json)."""
    saved = None
    if info.is_main:
        with contextlib.suppress(OSError, ValueError):
            d = json.loads((Path(config.out) / "config.json").read_text())
            saved = (d["amp"], d.get("amp_reason", "")) if d.get("amp") in AMP_DTYPES else None
    saved = info.broadcast(saved)
    return dataclasses.replace(config, amp=saved[0], amp_reason=saved[1]) if saved else config


def _loop(run: Run, metrics: Any, stop: dict[str, int], progress: bool) -> bool:
    from tqdm.auto import tqdm

    cfg, per_epoch = run.config, len(run.train)
    bar = tqdm(total=run.total, initial=run.step, disable=not progress, unit="step", dynamic_ncols=True)
    window = _Window()
    with bar:
        while run.step < run.total:
            epoch, start = divmod(run.step, per_epoch)
            for x, y in run.train.epoch(epoch, start):
                for group in run.optimizer.param_groups:
                    group["lr"] = lr_at(run.step, run.total, cfg) * run.lr_scale
                paused = time.perf_counter()
                for row in _fidelity_rows(run, x, y):  # telemetry on this batch, before the step
                    _emit(metrics, row, run)
                window.start += time.perf_counter() - paused  # images/s counts training alone
                started = time.perf_counter()
                try:
                    window.add(*_train_step(run, x, y), y.numel())
                except RuntimeError as e:  # DDP's all-reduce in backward: a rank died or hung
                    if run.dist.enabled and not isinstance(e, DistributedError) and is_group_failure(e):
                        raise lost_contact(e, f" at step {run.step + 1}") from e
                    raise
                if run.first_step_s is None:
                    run.first_step_s = time.perf_counter() - started
                    if cfg.compile and run.dist.is_main:
                        log.info("first step (compiles the model, %s): %.1f s", cfg.compile, run.first_step_s)
                run.step += 1
                bar.update(1)
                done = run.step >= run.total
                stopping = run.dist.any(bool(stop), run.device)  # all ranks stop at the same step
                if run.step % cfg.log_every == 0 or done:
                    row = window.row(run)
                    _emit(metrics, row, run)
                    rate, unit = row[f"{run.train.unit}_per_s"], _RATE_UNITS[run.train.unit]
                    acc = {"acc": f"{row['accuracy']:.3f}"} if "accuracy" in row else {}
                    bar.set_postfix({"loss": f"{row['loss']:.3f}", **acc,
                                     unit.replace("/", "_"): f"{rate:.0f}"})
                    if not progress and run.dist.is_main:
                        log.info("step %d/%d loss %.4f%s lr %.4g %.0f %s", run.step, run.total, row["loss"],
                                 f" acc {row['accuracy']:.4f}" if acc else "", row["lr"], rate, unit)
                    window = _Window()
                eval_due = (run.step % cfg.eval_every == 0) if cfg.eval_every else (run.step % per_epoch == 0)
                paused = time.perf_counter()
                if eval_due or done:
                    window.check(run)
                    _evaluate_and_keep_best(run, metrics)
                if eval_due or done or run.step % cfg.ckpt_every == 0 or stopping:
                    window.check(run)
                    save_checkpoint(run, "last.pt")
                window.start += time.perf_counter() - paused  # images/s counts training alone
                if done:  # a signal during the last step: the run is complete all the same
                    break
                if stopping:
                    return True
    return False


_RATE_UNITS = {"images": "img/s", "tokens": "tok/s"}


def _emit(metrics: Any, row: dict[str, Any], run: Run) -> None:
    """Records ``row``; only rank 0 holds the metrics file (``metrics`` is None elsewhere)."""
    run.history.append(row)
    if metrics is not None:
        metrics.write(json.dumps(row) + "\n")
        metrics.flush()


def _evaluate_and_keep_best(run: Run, metrics: Any) -> None:
    # BatchNorm running statistics: every rank takes rank 0's, those that DDP broadcasts
    # before each forward and that the checkpoint holds.
    run.dist.broadcast_tensors(list(run.model.buffers()))
    result = evaluate(run.model, run.test, run.config, run.device, run.dist)
    _emit(metrics, {"step": run.step, "epoch": run.step / len(run.train), **result}, run)
    key, lower = headline(run.config)
    if run.dist.is_main:
        log.info("step %d: %s %.4f, test loss %.4f", run.step, key.replace("_", " "), result[key],
                 result["test_loss"])
    # run.best < 0: nothing evaluated yet (neither accuracy nor bits per byte is ever negative)
    if run.best < 0 or (result[key] < run.best if lower else result[key] > run.best):
        run.best = result[key]
        save_checkpoint(run, "best.pt")


def _summarize(run: Run, wall: float, interrupted: bool) -> dict[str, Any]:
    tests = [r for r in run.history if "test_accuracy" in r]
    rate = f"{run.train.unit}_per_s"
    trains = [r for r in run.history if rate in r]
    last = tests[-1] if tests else {}
    key, _ = headline(run.config)
    return {
        "model": run.config.model, "dataset": run.config.dataset, "reversible": run.config.reversible,
        "step": run.step, "total_steps": run.total, "interrupted": interrupted,
        "test_accuracy": last.get("test_accuracy"), "test_loss": last.get("test_loss"),
        **({key: last.get(key)} if key != "test_accuracy" else {}),
        f"best_{key}": run.best if run.best >= 0 else None,
        "wall_seconds": wall, "first_step_seconds": run.first_step_s,
        "peak_memory_bytes": peak_memory_bytes(run.device),
        rate: (sum(r[rate] for r in trains) / len(trains)) if trains else None,
        **run.train.shape_info(),
        "device": str(run.device), "torch": torch.__version__, "config": asdict(run.config),
        "world_size": run.dist.world_size,
        "stored": run.plan.stored if run.plan is not None else [],  # units --memory-budget stored
    }
