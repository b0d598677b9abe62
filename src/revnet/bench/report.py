"""docs/BENCHMARKS.md, rendered from the results of one ``revnet bench report`` run."""

from __future__ import annotations

from typing import Any

from ..memory.sizes import format_bytes
from .budget import frontier_checks
from .contenders import PAPER_PAIRS, RESNET_CHANNELS, REVNET_CHANNELS
from .tables import (
    Row,
    augmentation,
    budget_table,
    capacity_table,
    data_table,
    markdown_table,
    memory_table,
    mib,
    models_table,
    speed_table,
)

__all__ = ["render_report"]

_MEMCNN_MB = {"32/38": (238.6, 85.6), "110/110": (810.7, 85.7), "164/164": (2452.8, 432.7)}


def _point(memory: dict[str, Any], kind: str, model: str | None = None,
           units: int | None = None, compiled: bool = False) -> dict[str, Any] | None:
    return next((p for p in memory["points"] if p["kind"] == kind and p["model"] == model
                 and (units is None or p["units"] == units) and bool(p.get("compile")) == compiled), None)


def _act(p: dict[str, Any] | None) -> float | None:
    return None if p is None else p["activation_bytes"]


def _growth(res: dict[str, Any], kind: str = "revnet") -> tuple[int, int, float | None, float | None]:
    """RevNet from 3 (or the fewest) to the most units of a sweep (RevViT: blocks); activation, saved."""
    units = res["config"]["units"]
    lo, hi = (3 if 3 in units and kind == "revnet" else min(units)), max(units)
    a, b = _point(res, kind, units=lo), _point(res, kind, units=hi)
    if a is None or b is None:
        return lo, hi, None, None
    return (lo, hi, b["activation_bytes"] / a["activation_bytes"] - 1,
            b["saved_bytes"] / a["saved_bytes"] - 1)


def _headline(memory: dict[str, Any], speeds: list[dict[str, Any]], flat: dict[str, Any] | None = None,
              compiled: dict[str, Any] | None = None) -> dict[str, float | None]:
    """The issue's target figures, from the results (None where a run did not measure it)."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or not b else a / b

    h: dict[str, float | None] = {}
    for res, rev in (("resnet110", "revnet110"), ("resnet164", "revnet164"), ("resnet32", "revnet38")):
        h[f"{rev}/{res}"] = ratio(_act(_point(memory, "revnet", rev)), _act(_point(memory, "resnet", res)))
    for tag, res in (("sweep", memory), ("flat", flat)):
        h[f"growth {tag}"], h[f"saved growth {tag}"] = _growth(res)[2:] if res else (None, None)
    h["revnet38 revnet/checkpoint memory"] = ratio(_act(_point(memory, "revnet", "revnet38")),
                                                    _act(_point(memory, "revnet-checkpoint", "revnet38")))
    for sp in speeds[:2]:
        tag = "channels_last" if sp["config"]["channels_last"] else "contiguous"
        for key in ("revnet/revnet-plain", "revnet/revnet-checkpoint", "inference revnet/revnet-plain",
                    "revnet+compile/revnet-plain", "revnet+compile/revnet-plain+compile"):
            h[f"{key} ({tag})"] = sp["ratios"].get(key)
    if compiled:
        h["compiled/eager reversible memory"] = ratio(
            _act(_point(compiled, "revnet", "revnet38", compiled=True)),
            _act(_point(compiled, "revnet", "revnet38")))
    return h


def _fmt(v: float | None, spec: str) -> str:
    return "n/a" if v is None else format(v, spec)


def _check(v: float | None, ok: bool) -> str:
    return "n/a" if v is None else ("met" if ok else "**not met**")


def _targets(h: dict[str, float | None], memory: dict[str, Any], flat: dict[str, Any] | None) -> list[Row]:
    rows: list[Row] = []
    for sweep in (flat, memory):
        if not sweep:
            continue
        lo, hi, g, sg = _growth(sweep)
        measured = "n/a" if g is None or sg is None else f"{g:+.1%} (saved for backward: {sg:+.1%})"
        rows.append([f"RevNet activation memory, {lo} -> {hi} units per stage, batch "
                     f"{sweep['config']['batch']}", "grows <= 5%", measured,
                     _check(g, g is not None and g <= 0.05)])
    for rev, res, limit in (("revnet110", "resnet110", 10), ("revnet164", "resnet164", 8)):
        r = h[f"{rev}/{res}"]
        rows.append([f"{rev} / {res} activation memory, batch 128", f"<= 1/{limit}",
                     "n/a" if r is None else f"1/{1 / r:.1f}", _check(r, r is not None and r <= 1 / limit)])
    for tag in ("contiguous", "channels_last"):
        r = h.get(f"revnet/revnet-checkpoint ({tag})")
        rows.append([f"revnet38 step, reversible / checkpoint ({tag})", "<= 1.00",
                     _fmt(r, ".3f"), _check(r, r is not None and r <= 1.0)])
    r = h["revnet38 revnet/checkpoint memory"]
    rows.append(["revnet38 activation memory, reversible / checkpoint", "< 1", _fmt(r, ".3f"),
                 _check(r, r is not None and r < 1)])
    for tag in ("contiguous", "channels_last"):
        r = h.get(f"inference revnet/revnet-plain ({tag})")
        over = None if r is None else r - 1
        rows.append([f"inference overhead of reversible mode ({tag})", "<= 2%",
                     "n/a" if over is None else f"{over:+.1%}", _check(r, over is not None and over <= 0.02)])
    for tag in ("channels_last", "contiguous"):
        r = h.get(f"revnet+compile/revnet-plain ({tag})")
        if r is not None:
            rows.append([f"revnet38 step, compiled reversible / eager plain autograd ({tag})", "<= 1.00",
                         f"{r:.3f}", _check(r, r <= 1.0)])
    r = h.get("compiled/eager reversible memory")
    if r is not None:
        rows.append(["revnet38 activation memory, compiled / eager reversible, batch 128", "within 10%",
                     f"{r - 1:+.1%}", _check(r, abs(r - 1) <= 0.1)])
    return rows


FLOOR_LIMIT = 1.05  # the engine's step over the rebuild floor (plain autograd + the rebuilt units' forward)


def floor_rows(sp: dict[str, Any]) -> list[Row]:
    """A speed run's engine over its rebuild floor, eager and compiled: the standing speed target.

    A fixed reversible/plain bound (the paper's ~1.3x, MemCNN's 1.47x) can lie below what rebuilding
    costs on a given machine; the floor is measured beside the step, so the target is what the
    engine adds over it (``revnet.bench.speed.speed``'s ``floor``)."""
    c, ratios = sp["config"], sp["ratios"]
    if not c.get("floor"):
        return []
    rev, plain = c["floor"]
    layout = "channels_last" if c["channels_last"] else "contiguous"
    rows = []
    for suffix, how in (("", "eager"), ("+compile", "compiled")):
        r = ratios.get(f"{rev}{suffix}/floor{suffix}")
        if r is None:
            continue
        step = ratios.get(f"{rev}{suffix}/{plain}{suffix}")
        floor = ratios.get(f"floor{suffix}/{plain}{suffix}")
        rows.append([f"{c['model']} step over the rebuild floor ({how}, {layout}, batch {c['batch']})",
                     f"<= {FLOOR_LIMIT:.2f}", f"{r:.3f} (step {_fmt(step, '.2f')}x plain autograd, floor "
                     f"{_fmt(floor, '.2f')}x)", _check(r, r <= FLOOR_LIMIT)])
    return rows


def _memcnn_rows(memory: dict[str, Any]) -> list[Row]:
    rows = []
    for (res, rev), (m_res, m_rev) in zip(PAPER_PAIRS, _MEMCNN_MB.values(), strict=True):
        a, b = _act(_point(memory, "resnet", res)), _act(_point(memory, "revnet", rev))
        ours = "n/a" if a is None or b is None else f"{mib(a)} vs {mib(b)} ({a / b:.1f}x)"
        rows.append([f"{res} vs {rev}", ours, f"{m_res} vs {m_rev} MB ({m_res / m_rev:.1f}x)"])
    return rows


def _at_most(what: str, limit: float, v: float | None, spec: str = ".3f") -> Row:
    return [what, f"<= {limit:.2f}", _fmt(v, spec), _check(v, v is not None and v <= limit)]


def _all_of(what: str, target: str, n: int, misses: dict[str, str], verb: str, miss: str) -> Row:
    """A row for a target every one of ``n`` points must meet; ``misses``: point -> by how much."""
    listed = "" if not misses else f" ({miss}: " + ", ".join(f"{p} by {d}" for p, d in misses.items()) + ")"
    return [what, target, f"{n - len(misses)} of {n} {verb}{listed}", _check(float(len(misses)), not misses)]


def _budget_targets(budget: dict[str, Any] | None) -> list[Row]:
    """The planner's targets (issue: memory-budget planner), per model of `revnet bench budget`."""
    rows: list[Row] = []
    for r in (budget or {}).get("runs", []):
        m, k = r["config"]["model"], frontier_checks(r)
        n = max(0, len(r["config"]["fractions"]) - 2)
        rows += [
            _at_most(f"{m}: plan at the all-stored budget / plain autograd, step time", 1.03,
                     k["stored_vs_plain"]),
            _at_most(f"{m}: plan at the all-rebuild minimum / all-rebuild, step time", 1.02,
                     k["minimum_vs_rebuild"]),
            _all_of(f"{m}: plans between the ends, measured activation memory", "<= budget", n,
                    {p: f"{mib(b)} MiB" for p, b in k["over_budget"].items()}, "within", "over"),
            _all_of(f"{m}: plans between the ends, step time (median of the rounds)",
                    "<= the all-rebuild/all-stored line", n,
                    {p: f"{v:.1%} (rounds' quartiles {lo:+.1%} to {hi:+.1%})"
                     for p, (v, lo, hi) in k["line_excess"].items() if v > 0}, "at or below", "above"),
            _at_most(f"{m}: the planner's step at checkpoint-per-block's memory / checkpoint's step", 1.0,
                     k["vs_checkpoint"]),
        ]
        v = k["plan_steps"]
        rows.append([f"{m}: planning (profile + solve + checked steps), in all-rebuild steps", "< 10",
                     f"{v:.1f}", _check(v, v < 10)])
    return rows


def _budget_section(budget: dict[str, Any], rel: str) -> list[str]:
    env = budget.get("environment") or {}
    parts = [
        "## Memory-budget planner: step time against activation memory", "",
        f"![the planner's frontier]({rel}/budget/budget.png)", "",
        f"Measured by `{budget.get('command', 'revnet bench budget')}` (run apart from the rest of this "
        "report; "
        f"{env.get('date', '?')}, {env.get('cpu', '?')}, torch threads {env.get('torch_threads', '?')}, "
        f"commit {env.get('git_commit', '?')}) and rendered from its JSON. For each budget "
        "`minimum + f x (all stored - minimum)`, `revnet.plan` chooses which blocks and stage openers to "
        "store; every configuration's activation memory is measured in a fresh process, and the step times "
        "of all of them (with all-rebuild `revnet`, all-stored `revnet-plain` and per-block "
        "`revnet-checkpoint`) alternate in one process on the same weights. `predicted` is the plan's own "
        "prediction; `time / all-rebuild` the median of the per-repeat ratios.", "",
    ]
    for r in budget.get("runs", []):
        parts += [markdown_table(*budget_table(r)), "",
                  f"Planning took {r['plan_s']:.1f} s ({frontier_checks(r)['plan_steps']:.1f} all-rebuild "
                  f"steps) for {r['units']} units.", ""]
    return parts


def _vit_targets(vit: dict[str, Any] | None) -> list[Row]:
    """The transformer targets (RevViT, Mangalam et al. 2022: "up to 15.5x" at ViT-L size)."""
    if not vit:
        return []
    memory, rows = vit["memory"], []
    lo, hi, g, sg = _growth(memory, kind="revvit")
    if g is not None:
        rows.append([f"RevViT activation memory, {lo} -> {hi} blocks, batch {memory['config']['batch']}",
                     "grows <= 5%", f"{g:+.1%} (saved for backward: {sg:+.1%})", _check(g, g <= 0.05)])
    for res, rev, limit in (("vit_base", "revvit_base", 8), ("vit_large", "revvit_large", 15.5)):
        a, b = _act(_point(memory, "revvit", rev)), _act(_point(memory, "vit", res))
        if a is not None and b is not None:
            rows.append([f"{rev} / {res} activation memory, batch {memory['config']['model_batch']}",
                         f"<= 1/{limit:g}", f"1/{b / a:.1f}", _check(a, a <= b / limit)])
    return rows + floor_rows(vit["speed"])


def _vit_section(vit: dict[str, Any], rel: str) -> list[str]:
    mc, sc = vit["memory"]["config"], vit["speed"]["config"]
    return [
        "## Reversible transformers: ViT against RevViT", "",
        f"![ViT and RevViT activation memory]({rel}/memory_vit.png)", "",
        f"One training step at batch {mc['batch']}, {mc['image_size']}px, {mc['device']}, {mc['dtype']}; "
        "the sweep at ViT-Ti/16 widths (192 wide, 3 heads, patch 16) with its number of blocks swept. "
        "`vit` is the residual ViT (CLS token); `revvit` the RevViT (two streams, no CLS token) in "
        "reversible mode, `revvit-plain` the same weights under plain autograd, `revvit-checkpoint` "
        "every block through `torch.utils.checkpoint`.", "",
        markdown_table(*memory_table(vit["memory"])), "",
        markdown_table(*models_table(vit["memory"])), "",
        f"**{sc['model']} against {sc['reference']}, batch {sc['batch']}, {sc['image_size']}px, "
        f"{sc['device']}, {sc['threads']} torch thread{'s' if sc['threads'] != 1 else ''}, "
        f"{sc['repeats']} repeats**", "",
        markdown_table(*speed_table(vit["speed"])), "",
    ]


def render_report(meta: dict[str, Any], memory: dict[str, Any], speeds: list[dict[str, Any]],
                  capacity: dict[str, Any], rel: str, flat: dict[str, Any] | None = None,
                  loader_vs_step: dict[str, Any] | None = None,
                  compiled: dict[str, Any] | None = None, vit: dict[str, Any] | None = None,
                  budget: dict[str, Any] | None = None) -> str:
    """docs/BENCHMARKS.md: every number below comes from the results passed in."""
    env, h = meta["environment"], _headline(memory, speeds, flat, compiled)
    load0, load1 = env["loadavg"][0], meta["loadavg_end"][0]
    busy = max(load0, load1) > env["torch_threads"] + 0.5  # more than this run's own threads
    mc, sc0 = memory["config"], speeds[0]["config"]
    parts = [
        "# Benchmarks: memory, speed and capacity of reversible backprop",
        "",
        f"Generated by `{meta['command']}` ({meta['minutes']:.1f} min). Do not edit by hand: rerun it.",
        "",
        f"- machine: {env['cpu']}, {env['cpu_count']} cores (torch threads: {env['torch_threads']}), "
        f"{mib(env['memory_bytes'] or 0)} MiB RAM{', GPU ' + env['cuda'] if env['cuda'] else ''}",
        f"- software: torch {env['torch']}, Python {env['python']}, {env['platform']}",
        f"- date: {env['date']}, git commit {env['git_commit']}",
        f"- load average (1 min) at start / end: {load0:.2f} / {load1:.2f}"
        + (" -- **the machine was busy with other work: absolute times are inflated; the ratios "
           "alternate the runs in one process and are the figures to read.**" if busy else ""),
        "",
        "## Targets",
        "",
        markdown_table(["what", "target", "measured", ""], _targets(h, memory, flat)
                       + [row for sp in speeds for row in floor_rows(sp)] + _vit_targets(vit)
                       + _budget_targets(budget)),
        "",
        "## Activation memory across depth",
        "",
        f"![activation memory against depth]({rel}/memory.png)",
        "",
        f"One training step (forward, cross-entropy, backward) at batch {mc['batch']}, "
        f"{mc['image_size']}x{mc['image_size']} images, {mc['device']}, {mc['dtype']}. "
        f"ResNet: widths {'-'.join(map(str, RESNET_CHANNELS))} with 2n units per stage "
        f"(6(2n)+2 layers); RevNet: widths {'-'.join(map(str, REVNET_CHANNELS))} with n units "
        "per stage (12n+2 layers), so each row compares networks of equal depth and about equal "
        "parameters. The three RevNet columns are the same network and weights trained three ways. "
        "Each parameter gradient is freed the moment it is accumulated, so the figures hold "
        "activations, workspace and the gradients still in flight. The reversible engine runs one "
        "autograd Function per block, so a block's parameter gradients leave as soon as that block's "
        "backward ends, and the stage openers (which cannot be inverted) keep only their input, "
        "which the stage before them keeps anyway, and are recomputed in backward. The three kinds "
        "differ in what they keep: `revnet-checkpoint` keeps every block's input (its openers are "
        "checkpointed too); `revnet-plain` and `resnet` keep every activation. The bytes saved for "
        "backward (the cross-check) show the activations alone.",
        "",
        markdown_table(*memory_table(memory)),
        "",
    ]
    if mc["models"]:
        parts += [
            f"## The paper's models at batch {mc['model_batch']}",
            "",
            "`activation` = peak of the step above the level before it, each parameter gradient "
            "being freed the moment it has been accumulated (so the figure holds activations, "
            "workspace and gradients still in flight); `saved` = distinct tensors the autograd graph "
            "keeps for backward (the cross-check); `step total` = weights, buffers, the batch and all "
            "gradients plus that peak.",
            "",
            markdown_table(*models_table(memory)),
            "",
            "Against the published reference points (MemCNN, CIFAR-10 at batch 128, PyTorch on a GPU; "
            "our CPU figures count activations only and differ in what is stored, so compare the ratios):",
            "",
            markdown_table(["pair", "this machine, activation MiB", "MemCNN"], _memcnn_rows(memory)),
            "",
        ]
    parts += ["## Speed", "", f"![training step time]({rel}/speed.png)", "",
              "One training step = forward + cross-entropy + backward; the optimizer update (the same "
              "for all) is left out. Runs alternate in one process, the order rotated every repeat; "
              "medians with quartiles. `revnet` runs the same model and weights as `revnet-plain` and "
              "`revnet-checkpoint`; the ResNet is a separate model, timed in the same loop for scale. "
              "Inference: `eval()` under `torch.no_grad()`.", ""]
    for sp in speeds:
        c = sp["config"]
        layout = "channels_last" if c["channels_last"] else "contiguous (NCHW)"
        parts += [f"**{c['model']}, batch {c['batch']}, {c['image_size']}px, {c['device']}, {layout}, "
                  f"{c['threads']} torch thread{'s' if c['threads'] != 1 else ''}, {c['repeats']} repeats "
                  f"after {c['warmup']} warm-up**", "",
                  markdown_table(*speed_table(sp)), "",
                  "Spread of the per-repeat ratios: " + "; ".join(
                      f"{k} {v['median']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})"
                      for k, v in sp["pair_ratios"].items()), ""]
    if sc0.get("compile"):
        cs = "; ".join(f"{k} {v:.0f} s" for k, v in speeds[0].get("compile_s", {}).items())
        parts += [f"`+compile` rows: copies of the same weights under `revnet.compile(model, backend="
                  f"\"{sc0['compile']}\")` (F and G of every coupling, forward and recomputation, the "
                  "recomputed openers, stem and head). Compiling is not in the step times; the first step "
                  f"took this much longer than a step (channels_last run): {cs}.", ""]
    if compiled:
        parts += ["Activation memory of the same step compiled (`revnet bench memory --models revnet38 "
                  f"--compile {compiled['config']['compile']}`, fresh process per point):", "",
                  markdown_table(*models_table(compiled)), ""]
    ab = "measured above" if sc0.get("against") else "not measured in this run: pass --against REV"
    parts += ["For scale: the paper reports 1.5-2x per update for its implementation, the theory 1.33x "
              "(four passes instead of three), and MemCNN RevNet-164 1.47x slower than ResNet-164.", "",
              "Engine before/after: runs named `revnet@REV` use the reversible engine of git revision REV "
              f"on the same model and weights, alternated with the current one ({ab}).", ""]
    cc = capacity["config"]
    parts += [
        f"## Capacity under {format_bytes(cc['budget_bytes'])}", "",
        f"![largest batch under the budget]({rel}/capacity.png)", "",
        "Memory here is the whole training step, gradients kept as in ordinary training: weights, "
        "buffers, the batch, gradients, activations and workspace. It is "
        "affine in batch and in depth, so a line through two small probes predicts the limit; real steps "
        f"then check it (batches up to {cc['verify_max_batch']}, RevNet depths up to "
        f"{cc['verify_max_units']} units per stage). `first over` is the smallest probe that did not fit. "
        "A RevNet's depth limit is set by its weights alone and lies far beyond what a CPU can "
        "check in minutes: that figure is the line's extrapolation, marked as such.", "",
        markdown_table(*capacity_table(capacity)), "",
    ]
    if loader_vs_step:
        c = loader_vs_step["config"]
        parts += [
            "## Data path", "",
            f"The in-memory loader of `revnet train --recipe {c['recipe']}` alone (index gather, batched "
            f"{augmentation(c)}, normalisation) against that recipe's whole training step on random "
            f"data, {c['threads']} torch thread{'s' if c['threads'] != 1 else ''} each "
            "(`revnet bench data`):", "",
            markdown_table(*data_table(loader_vs_step)), "",
            f"The loader delivers **{loader_vs_step['ratio']:.0f}x** the training step's images/s "
            "(target: at least 20x).", "",
        ]
    if vit:
        parts += _vit_section(vit, rel)
    if budget:
        parts += _budget_section(budget, rel)
    parts += [
        "## How it is measured", "",
        "- CPU memory: each point runs in a fresh process with `MALLOC_MMAP_THRESHOLD_=65536` (freed "
        "tensors go back to the kernel at once, so resident memory follows live tensors). The model is "
        "built and one warm-up step runs; gradients are freed; the peak-RSS mark is reset "
        "(`/proc/self/clear_refs`), the step runs, and `VmHWM` minus the `VmRSS` before the step is its "
        "peak. On CUDA: `torch.cuda.max_memory_allocated` around the same step. Activation figures "
        "free each gradient as it is accumulated (`register_post_accumulate_grad_hook`); capacity "
        "keeps them. Every point is also checked against the bytes the autograd graph saves for "
        "backward (`torch.autograd.graph.saved_tensors_hooks`).",
        "- `revnet-checkpoint` wraps every coupling of every `ReversibleSequence`, and every stage "
        "opener, in `torch.utils.checkpoint.checkpoint(..., use_reentrant=False)`, on the same modules "
        "and weights. "
        "(Checkpointing also updates BatchNorm running statistics twice per step; the reversible engine "
        "updates them once.)",
        "- Times: `time.perf_counter` around one step, after warm-up; ratios are ratios of medians. "
        "This machine is shared and noisy, so read the ratios; absolute times move with the load.",
        "- Host memory while timing: the timing process keeps freed memory for reuse "
        "(`revnet.memory.measure.keep_freed_memory`: glibc's blocks up to 1 GiB from a heap never "
        "trimmed, as CUDA's caching allocator keeps memory), as `revnet train` does; with glibc's "
        "defaults each step faults its memory in again, which costs plain autograd, the kind that "
        "frees the most, the most (`studies/page_faults.py`).",
        "- The planner reads its peaks from the CPU allocator's allocation and free events "
        "(PyTorch's profiler, `profile_memory`), exact in any process; the frontier's memory column "
        "is the fresh-process measure above.",
        "",
    ]
    return "\n".join(parts)
