"""A run's curves: ``metrics.jsonl`` read back and drawn into ``curves.png`` (matplotlib: loaded here)."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

__all__ = ["plot_run", "read_metrics"]

log = logging.getLogger(__name__)


def read_metrics(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"plot: no metrics.jsonl in {run_dir}; is it a run directory?")
    rows, bad = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            row = json.loads(line) if line.strip() else None
        except json.JSONDecodeError:
            row = None
            bad.append(number)
        if isinstance(row, dict):
            rows.append(row)
        elif row is not None:
            bad.append(number)
    if bad and not rows:
        raise ValueError(f"plot: {path} holds no JSON object per line (line {bad[0]} is not one); "
                         f"is it a revnet run's metrics file?")
    if bad:  # a process killed mid-write leaves a partial line; the rest is still good
        log.warning("%s: skipped %d line(s) that are not JSON objects (first: line %d)",
                    path, len(bad), bad[0])
    return rows


def plot_run(run_dir: str | os.PathLike) -> Path:
    """Draws loss, accuracy (bits per byte for a language model) and learning rate against step
    into ``RUN_DIR/curves.png``.

    Runs with ``grad_angle_every`` get a panel of the gradient angle (whole model and per
    stage), runs with ``drift_guard_every`` one of each sequence's rebuild error.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a log axis's tick labels ask for mathtext fonts a minimal system lacks; the fallback is fine
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    rows = read_metrics(run_dir)
    train = [r for r in rows if "loss" in r]
    test = [r for r in rows if "test_accuracy" in r]
    angles = [r for r in rows if r.get("grad_angle_deg") is not None]
    drift = [r for r in rows if isinstance(r.get("drift"), dict)]
    panels = 3 + bool(angles) + bool(drift)
    fig, axes = plt.subplots(1, panels, figsize=(13 * panels / 3, 3.6))
    axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    axes[0].plot([r["step"] for r in test], [r["test_loss"] for r in test], "o-", label="test")
    axes[0].set(title="loss", xlabel="step", yscale="log")
    if any("test_bits_per_byte" in r for r in test):  # a language model: bits per byte, lower is better
        axes[1].plot([r["step"] for r in train], [r["loss"] / math.log(2) for r in train], label="train")
        axes[1].plot([r["step"] for r in test], [r["test_bits_per_byte"] for r in test], "o-", label="test")
        axes[1].set(title="bits per byte", xlabel="step")
    else:
        axes[1].plot([r["step"] for r in train], [r["accuracy"] for r in train], label="train")
        axes[1].plot([r["step"] for r in test], [r["test_accuracy"] for r in test], "o-", label="test")
        axes[1].set(title="accuracy", xlabel="step")
    axes[2].plot([r["step"] for r in train], [r["lr"] for r in train])
    axes[2].set(title="learning rate", xlabel="step")
    for ax in axes[:2]:
        ax.legend()
        ax.grid(alpha=0.3)
    if angles:
        _plot_angles(axes[3], angles)
    if drift:
        _plot_drift(axes[-1], drift, [r for r in rows if r.get("event") == "drift"])
    fig.suptitle(str(run_dir))
    fig.tight_layout()
    out = Path(run_dir) / "curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _plot_angles(ax: Any, rows: list[dict[str, Any]]) -> None:
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r["grad_angle_deg"] for r in rows], "k.-", lw=2, label="whole model")
    for stage in dict.fromkeys(k for r in rows for k in r.get("grad_angle_by_stage", {})):
        vals = [(r["step"], r["grad_angle_by_stage"].get(stage)) for r in rows]
        vals = [(a, v) for a, v in vals if v is not None]
        if vals:
            ax.plot(*zip(*vals, strict=True), ".-", lw=1, alpha=0.8, label=stage)
    ax.set(title="reversible vs plain-autograd gradient", xlabel="step", ylabel="angle (degrees)")
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


def _plot_drift(ax: Any, rows: list[dict[str, Any]], events: list[dict[str, Any]]) -> None:
    for seq in dict.fromkeys(k for r in rows for k in r["drift"]):
        vals = [(r["step"], r["drift"][seq]) for r in rows if r["drift"].get(seq)]
        if vals:
            ax.plot(*zip(*vals, strict=True), ".-", label=seq)
    for e in events:
        ax.axvline(e["step"], color="tab:red", alpha=0.4, lw=1)
    ax.set(title="rebuild error (drift guard; red: events)", xlabel="step",
           ylabel="max |x' - x| / max |x|", yscale="log")
    if ax.get_lines():
        ax.legend(fontsize=7)
    else:  # zero does not go on a log axis: exact mode, or nothing rebuilt
        ax.text(0.5, 0.5, "every check: 0", transform=ax.transAxes, ha="center")
    ax.grid(alpha=0.3)
