"""The benchmarks' plots, as PNG (matplotlib is imported here only, when a plot is drawn)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from ..memory.sizes import format_bytes
from .contenders import (
    GPT_KINDS,
    GPT_PAIRS,
    KINDS,
    PAPER_PAIRS,
    VIT_KINDS,
    VIT_PAIRS,
    is_baseline,
    model_kind,
)

__all__ = ["plot_breakdown", "plot_budget", "plot_capacity", "plot_drift", "plot_memory", "plot_speed"]

_STYLE = {"resnet": ("tab:red", "o"), "revnet": ("tab:blue", "s"),
          "revnet-plain": ("tab:orange", "^"), "revnet-checkpoint": ("tab:green", "D"),
          "vit": ("tab:red", "o"), "revvit": ("tab:blue", "s"), "revvit-plain": ("tab:orange", "^"),
          "revvit-checkpoint": ("tab:green", "D"), "gpt": ("tab:red", "o"), "revgpt": ("tab:blue", "s"),
          "revgpt-plain": ("tab:orange", "^"), "gpt-checkpoint": ("tab:green", "D")}


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # a log axis's tick labels ask for mathtext fonts a minimal system lacks; the fallback is fine
    logging.getLogger("matplotlib.font_manager").setLevel(logging.ERROR)
    return plt


def plot_memory(sweep: dict[str, Any], path: str | Path) -> Path:
    """Activation memory against depth, one line per kind (and the named models); PNG.

    A language-model sweep across context length (``config["sweep"] == "context"``): against
    the tokens per sequence, at its one depth.
    """
    plt = _pyplot()
    c = sweep["config"]
    x_key = "context" if c.get("sweep") == "context" else "depth"
    named = [p for p in sweep["points"] if p["model"] is not None]
    fig, axes = plt.subplots(1, 2 if named else 1, figsize=(12 if named else 7, 4.5), dpi=120,
                             squeeze=False, gridspec_kw={"width_ratios": [3, 2] if named else [1]})
    ax = axes[0][0]
    for kind in c["kinds"]:
        for compiled in (False, True):
            pts = sorted((p[x_key], p["activation_bytes"] / 2**20) for p in sweep["points"]
                         if p["kind"] == kind and p["model"] is None and bool(p.get("compile")) == compiled)
            if pts:
                color, marker = _STYLE[kind]
                ax.plot(*zip(*pts, strict=True), marker=marker, color=color, ls="--" if compiled else "-",
                        label=f"{kind}+compile" if compiled else kind)
    family = c.get("family")
    if x_key == "context":
        xlabel, title = "context (tokens per sequence)", f"Across context: {c['units'][0]} blocks"
    else:
        xlabel = "depth (blocks)" if family in ("vit", "gpt") else "depth (layers with weights)"
        title = "Across depth"
    if family == "gpt":
        where = (f"batch {c['batch']}" + (f", context {c['context']}" if x_key == "depth" else "")
                 + f", width {c['embed_dim']}, vocab {c['vocab_size']}, {c['device']}")
    else:
        where = f"batch {c['batch']}, {c['image_size']}px, {c['device']}"
    ax.set(xlabel=xlabel, ylabel="activation memory of one training step (MiB)", title=f"{title}: {where}")
    if x_key == "context":
        ax.set_xticks(c["contexts"])
    ax.grid(alpha=0.3)
    ax.legend()
    if named:
        ax = axes[0][1]
        kinds = [k for k in KINDS + VIT_KINDS + GPT_KINDS if any(p["kind"] == k for p in named)]
        known = PAPER_PAIRS + VIT_PAIRS + GPT_PAIRS
        pairs = [pair for pair in known if any(p["model"] in pair for p in named)]
        pairs += [(p["model"], "") for p in named  # a model of no known pair: a group of its own
                  if not any(p["model"] in pair for pair in pairs) and (p["model"], "") not in pairs]
        width = 0.8 / len(kinds)
        for i, kind in enumerate(kinds):
            vals = [next((p["activation_bytes"] / 2**20 for p in named
                          if p["kind"] == kind and p["model"] in pair and not p.get("compile")), 0.0)
                    for pair in pairs]
            bars = ax.bar([j + i * width for j in range(len(pairs))], vals, width,
                          color=_STYLE[kind][0], label=kind)
            ax.bar_label(bars, fmt="%.0f", fontsize=7)
        ax.set_xticks([j + width * (len(kinds) - 1) / 2 for j in range(len(pairs))],
                      [f"{a} / {b}" if b else a for a, b in pairs], fontsize=8)
        context = f", context {c['context']}" if family == "gpt" else ""
        ax.set(ylabel="MiB", title=f"Named models, batch {c['model_batch']}{context}")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_speed(result: dict[str, Any], path: str | Path) -> Path:
    """Median training-step time per run (bars, quartiles as error bars); saved as PNG."""
    plt = _pyplot()
    names = list(result["train"])
    med = [result["train"][n]["median_s"] for n in names]
    err = [[m - result["train"][n]["p25_s"] for n, m in zip(names, med, strict=True)],
           [result["train"][n]["p75_s"] - m for n, m in zip(names, med, strict=True)]]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=120)
    bars = ax.bar(names, med, yerr=err, capsize=4,
                  color=[_STYLE.get(n.removesuffix("+compile"), ("tab:gray", ""))[0] for n in names],
                  hatch=["//" if n.endswith("+compile") else "" for n in names])
    ax.bar_label(bars, [f"{result['train'][n]['images_per_s']:.0f} img/s" for n in names],
                 label_type="center", fontsize=8, color="white")
    ax.tick_params(axis="x", labelsize=8, rotation=15)
    c = result["config"]
    ax.set(ylabel="seconds per training step (median)",
           title=f"{c['model']} vs {c['reference']}, batch {c['batch']}, {c['device']}"
                 f"{', channels_last' if c['channels_last'] else ''}")
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_budget(results: list[dict[str, Any]], path: str | Path) -> Path:
    """Step time against measured activation memory: the planner's frontier and the references."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(results), figsize=(6 * len(results), 4.5), dpi=120, squeeze=False)
    for ax, r in zip(axes[0], results, strict=True):
        pts = r["points"]
        plans = sorted((p["activation_bytes"] / 2**20, p["median_s"]) for n, p in pts.items()
                       if n.startswith("plan@"))
        ax.plot(*zip(*plans, strict=True), "o-", color="tab:purple", label="revnet.plan (budgets)")
        for kind in ("revnet", "revnet-plain", "revnet-checkpoint"):
            p = pts[kind]
            ax.plot(p["activation_bytes"] / 2**20, p["median_s"], _STYLE[kind][1], color=_STYLE[kind][0],
                    ms=9, label={"revnet": "all rebuilt", "revnet-plain": "all stored (plain autograd)",
                                 "revnet-checkpoint": "checkpoint per block"}[kind])
        c = r["config"]
        ax.set(xlabel="activation memory of one training step (MiB)", ylabel="seconds per step (median)",
               title=f"{c['model']}, batch {c['batch']}, {c['device']}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_capacity(result: dict[str, Any], path: str | Path) -> Path:
    """Largest batch per model under the budget; saved as PNG."""
    plt = _pyplot()
    names = list(result["batch"])
    vals = [result["batch"][n]["largest"] or 0 for n in names]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    # Reversible or not: the kind each model was measured as (results before it was recorded: the model's).
    kinds = [result["batch"][n].get("kind") or model_kind(n) for n in names]
    bars = ax.bar(names, vals, color=["tab:red" if is_baseline(k) else "tab:blue" for k in kinds])
    ax.bar_label(bars)
    ax.set(ylabel="largest batch that trains",
           title=f"Under a {format_bytes(result['config']['budget_bytes'])} budget "
                 f"({result['config']['device']})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


_PRECISION_COLORS = {"float64": "tab:green", "float32": "tab:blue", "bf16": "tab:orange",
                     "bf16-model": "tab:red"}


def plot_drift(result: dict[str, Any], path: str | Path) -> Path:
    """Reconstruction error against depth (worst sequence), float modes as lines, exact mode
    as a note (its error is zero, off a log axis); saved as PNG."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(12, 5), dpi=120)
    c = result["config"]
    for key, ax, label in (("rel_error", axes[0], "relative error (max |x' - x| / max |x|)"),
                           ("max_abs_error", axes[1], "max |x' - x|")):
        for row in _drift_lines(result):
            w, precision, pts = row
            pts = [(d, v) for d, v in pts[key] if v]  # zero does not go on a log axis
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o" if w == "trained" else "s",
                        ls="-" if w == "trained" else "--", label=f"{precision}, {w} weights",
                        color=_PRECISION_COLORS.get(precision, "tab:gray"))
        ax.set(xscale="log", yscale="log", xlabel="blocks inverted (N)", ylabel=label)
        ax.set_xticks(c["depths"], [str(d) for d in c["depths"]])
        ax.grid(alpha=0.3, which="both")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8)
    exact = [s for s in result["summary"] if s["exact"]]
    if exact:
        worst = max((s["max_abs_error"] or 0.0) for s in exact)
        over = sum(s["range_errors"] for s in exact)
        note = (f"exact mode ({', '.join(c['exact_precisions'])}):\nmax error {worst:g} at every depth"
                + (f"\n({over} point(s) left the range: see the table)" if over else ""))
        axes[1].text(0.98, 0.42, note, transform=axes[1].transAxes, fontsize=8, ha="right", va="center",
                     bbox={"facecolor": "white", "alpha": 0.8})
    fig.suptitle(f"{c['model']}: input of each reversible sequence rebuilt after N blocks "
                 f"(worst sequence; batch {c['batch']}, {c['image_size']}px, BN train mode)", fontsize=10)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _drift_lines(result: dict[str, Any]) -> list[tuple[str, str, dict[str, list[tuple[int, float]]]]]:
    lines: dict[tuple[str, str], dict[str, list[tuple[int, float]]]] = {}
    for s in result["summary"]:
        if s["exact"]:
            continue
        line = lines.setdefault((s["weights"], s["precision"]), {"rel_error": [], "max_abs_error": []})
        line["rel_error"].append((s["depth"], s["rel_error"]))
        line["max_abs_error"].append((s["depth"], s["max_abs_error"]))
    return [(w, p, v) for (w, p), v in lines.items()]


_PARTS = (("params_mib", "parameters", "tab:blue"), ("grads_mib", "gradients", "tab:orange"),
          ("optimizer_mib", "optimizer state", "tab:green"), ("activations_mib", "activations", "tab:red"))


def plot_breakdown(result: dict[str, Any], path: str | Path) -> Path:
    """Per model, one stacked bar per mode: this rank's parameters, gradients, optimizer state and
    activations (``revnet bench memory --breakdown``); PNG."""
    plt = _pyplot()
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 5.5), dpi=120,
                             squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        rows = [r for r in result["rows"] if r["model"] == model]
        names = [r["mode"].replace(" + ", "\n+ ") for r in rows]
        bottom = [0.0] * len(rows)
        for key, label, color in _PARTS:
            vals = [r[key] for r in rows]
            ax.bar(names, vals, bottom=bottom, color=color, label=label)
            bottom = [b + v for b, v in zip(bottom, vals, strict=True)]
        for i, total in enumerate(bottom):
            ax.annotate(f"{total:.0f}", (i, total), ha="center", va="bottom", fontsize=8)
        ax.set_xticks(range(len(rows)), names, fontsize=7, rotation=25, ha="right", rotation_mode="anchor")
        ax.set(ylabel="MiB on one rank", title=f"{model}, batch {rows[0]['batch']} per rank")
        ax.grid(axis="y", alpha=0.3)
        ax.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"One {c['optimizer'].split('(')[0]} step, {c['dtype']}, {c['world_size']} processes "
                 f"({c['backend']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)
