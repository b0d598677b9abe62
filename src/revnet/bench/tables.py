"""Results as tables: rows of strings, rendered as text (the CLI) or markdown (the report)."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from ..memory.sizes import format_bytes
from .breakdown import static_mib
from .contenders import KINDS, VIT_KINDS

__all__ = ["Row", "breakdown_table", "budget_table", "capacity_table", "data_table", "drift_table",
           "exact_cost_table", "markdown_table", "label", "memory_table", "mib", "models_table",
           "speed_table", "text_table"]

Row = Sequence[Any]


def mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def label(point: dict[str, Any]) -> str:
    """A memory point's kind, marked ``+compile`` when measured under revnet.compile."""
    return point["kind"] + ("+compile" if point.get("compile") else "")


def memory_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Activation memory (MiB) per depth (per context, for a language model's context sweep), one
    column per kind."""
    kinds = result["config"]["kinds"]
    kinds = kinds + [f"{k}+compile" for k in kinds if any(p.get("compile") and p["kind"] == k
                                                              for p in result["points"])]
    key = "context" if result["config"].get("sweep") == "context" else "depth"
    sweep = [p for p in result["points"] if p["model"] is None]
    by = {(p[key], label(p)): p for p in sweep}
    rows = []
    for x in sorted({p[key] for p in sweep}):
        rows.append([str(x), *(mib(by[(x, k)]["activation_bytes"]) if (x, k) in by else "-" for k in kinds)])
    return [key, *(f"{k} MiB" for k in kinds)], rows


def models_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """The named models: activation, bytes saved for backward and whole step, in MiB."""
    rows = [[p["model"], label(p), f"{p['params'] / 1e6:.2f}M", str(p["batch"]), mib(p["activation_bytes"]),
             mib(p["saved_bytes"]), mib(p["total_bytes"])]
            for p in result["points"] if p["model"] is not None]
    return ["model", "kind", "params", "batch", "activation MiB", "saved MiB", "step total MiB"], rows


def speed_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Training step and inference times per run."""
    c = result["config"]
    rows = []
    for name, s in result["train"].items():
        ours = name.removesuffix("+compile") in KINDS + VIT_KINDS or "@" in name
        label = name if ours else f"{name} (reference)"
        ratio = _ratio(result, f"{c['kinds'][0]}/{name}")
        if name.startswith("floor"):  # not a step: the rebuilt units' forward, and the floor it sets
            suffix = name.removeprefix("floor")
            rev, plain = (k + suffix for k in c["floor"])
            label = "rebuilt units' forward" + (" (compiled)" if suffix else "")
            ratio = (f"{rev} = {_ratio(result, f'{rev}/{name}')}x the floor (= {plain} + this = "
                     f"{_ratio(result, f'{name}/{plain}')}x {plain})")
        rows.append([label, "forward" if name.startswith("floor") else "train",
                     f"{s['median_s'] * 1e3:.0f}", f"{s['p25_s'] * 1e3:.0f}-{s['p75_s'] * 1e3:.0f}",
                     f"{s['images_per_s']:.0f}", ratio])
    for name, s in result["inference"].items():
        rows.append([name, "inference", f"{s['median_s'] * 1e3:.1f}",
                     f"{s['p25_s'] * 1e3:.1f}-{s['p75_s'] * 1e3:.1f}", f"{s['images_per_s']:.0f}",
                     _ratio(result, "inference revnet/revnet-plain") if name == "revnet-plain" else ""])
    return ["run", "pass", "median ms", "quartiles ms", "images/s", f"{c['kinds'][0]} / this"], rows


def _ratio(result: dict[str, Any], key: str) -> str:
    r = result["ratios"].get(key)
    return "" if r is None else f"{r:.3f}"


def breakdown_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Where a training step's bytes go on one rank (``revnet bench memory --breakdown``), per model and
    mode, in MiB; the last column: parameters + gradients + optimizer state against ``ddp plain``'s."""
    rows = []
    for r in result["rows"]:
        static = static_mib(r)
        ratio = "-" if r.get("ratio") is None else f"{r['ratio']:.2f}x"
        rows.append([r["model"], r["mode"], *(f"{r[k]:.1f}" for k in ("params_mib", "grads_mib",
                                                                       "optimizer_mib", "activations_mib")),
                     f"{static + r['activations_mib']:.1f}", f"{static:.1f} ({ratio})"])
    return ["model", "training", "params MiB", "grads MiB", "optimizer MiB", "activations MiB", "total MiB",
            "params+grads+optimizer MiB (vs ddp plain)"], rows


def budget_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """The planner's frontier: per configuration, memory (planned and measured) and step time."""
    rows = []
    for name, p in result["points"].items():
        rows.append([name, str(len(p["stored"])), mib(p.get("budget")), mib(p.get("predicted_peak")),
                     mib(p["activation_bytes"]), f"{p['median_s'] * 1e3:.0f}", f"{p['vs_rebuild']:.3f}"])
    c = result["config"]
    return [f"{c['model']} b{c['batch']}", "stored", "budget MiB", "predicted MiB", "measured MiB",
            "step ms", "time / all-rebuild"], rows


def capacity_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Largest batch per model and largest depth per kind under the budget."""
    rows = []
    for name, r in result["batch"].items():
        rows.append([name, "batch", _opt(r["largest"]), _opt(r["smallest_over"]), _opt(r["predicted"]),
                     "yes" if r["verified"] else "no (extrapolated)"])
    for kind, r in result["depth"].items():
        rows.append([kind, f"depth @ batch {result['config']['depth_batch']}", _opt(r["largest_depth"]),
                     _opt(r["smallest_over_depth"]), _opt(r["predicted_depth"]),
                     "yes" if r["verified"] else "no (extrapolated)"])
    budget = format_bytes(result["config"]["budget_bytes"])
    return ["model", f"largest under {budget}", "value (fits)", "first over", "line fit", "checked"], rows


def drift_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Worst relative reconstruction error per configuration (rows) and depth (columns)."""
    depths = result["config"]["depths"]
    by = {(s["weights"], s["precision"], s["exact"], s["depth"]): s for s in result["summary"]}
    rows = []
    for key in dict.fromkeys(k[:3] for k in by):
        cells = []
        for d in depths:
            s = by[(*key, d)]
            cells.append("range" if s["range_errors"] else "-" if s["rel_error"] is None
                         else "0" if s["rel_error"] == 0 else f"{s['rel_error']:.1e}")
        rows.append([key[0], key[1], "exact" if key[2] else "float", *cells])
    return ["weights", "precision", "mode", *(f"N={d}" for d in depths)], rows


def exact_cost_table(cost: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Training-step time and activation memory, float vs exact mode."""
    rows = []
    for amp, r in cost["speed"].items():
        rows.append([f"train step, amp {amp}", f"{r['float']['median_s'] * 1e3:.0f} ms",
                     f"{r['exact']['median_s'] * 1e3:.0f} ms", f"{r['ratio']:.3f}"])
    mem = cost.get("memory") or {}
    if mem:
        a, b = mem["float"]["activation_bytes"], mem["exact"]["activation_bytes"]
        rows.append(["activation memory, float32", f"{mib(a)} MiB", f"{mib(b)} MiB", f"{b / a:.3f}"])
        a, b = mem["float"]["saved_bytes"], mem["exact"]["saved_bytes"]
        rows.append(["saved for backward", f"{mib(a)} MiB", f"{mib(b)} MiB", f"{b / a:.3f}"])
    c = cost["config"]
    return [f"{c['model']}, batch {c['batch']}", "float", "exact", "exact / float"], rows


def augmentation(c: dict[str, Any]) -> str:
    done = [f"random crop (pad {c['crop_pad']})"] * bool(c["crop_pad"]) + ["random flip"] * bool(c["flip"])
    return " and ".join(done) or "no augmentation"


def data_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    c, load, step = result["config"], result["loader"], result["train_step"]
    return ["path", "images/s", "what"], [
        ("loader", f"{load['images_per_s']:,.0f}",
         f"{c['dataset']} batch {c['batch']}: gather + {augmentation(c).replace(' and ', ' + ')} "
         "+ normalise"),
        ("training step", f"{step['images_per_s']:,.0f}",
         f"{c['model']}, amp {c['amp']}, forward + backward + SGD"),
    ]


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


def text_table(header: Sequence[str], rows: Sequence[Row]) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return os.linesep.join(lines)


def markdown_table(header: Sequence[str], rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)
