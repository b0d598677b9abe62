"""``revnet bench memory | speed | capacity | data | drift | report``: parsing, printing and the report.

The measurements live in :mod:`revnet.bench`; this module runs them, prints tables,
saves JSON (with the configuration and the machine beside every result) and plots, and
``report`` renders docs/BENCHMARKS.md from what one run produced.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from . import bench

Row = Sequence[Any]

_QUICK_MEMORY = {"units": [1, 3], "batch": 8, "models": [], "model_batch": 16}
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
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="WHAT")

    def common(q: argparse.ArgumentParser, out: str) -> None:
        q.add_argument("--out", default=out, help=f"folder for JSON and PNG (default {out})")
        q.add_argument("--device", default="cpu", help="cpu (default) or cuda[:N]")
        q.add_argument("--image-size", type=int, default=32)
        q.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
        q.add_argument("--quick", action="store_true", help="tiny configuration, about a minute")

    q = bsub.add_parser("memory", help="activation memory of one training step across depth")
    common(q, "runs/bench")
    q.add_argument("--units", type=int, nargs="+", default=[1, 3, 9, 18, 36],
                   help="RevNet units per stage (the ResNet gets twice as many: same depth)")
    q.add_argument("--kinds", nargs="+", choices=bench.KINDS, default=list(bench.KINDS))
    q.add_argument("--models", nargs="*", default=[m for pair in bench.PAPER_PAIRS for m in pair],
                   help="registered models measured at --model-batch (none: skip)")
    q.add_argument("--batch", type=int, default=32, help="batch of the depth sweep")
    q.add_argument("--model-batch", type=int, default=128, help="batch of the named models")
    q.add_argument("--block", choices=["basic", "bottleneck"], default="basic")
    q.set_defaults(func=_cmd_memory)

    q = bsub.add_parser("speed", help="training-step and inference time, alternated in one process")
    common(q, "runs/bench")
    q.add_argument("--model", default="revnet38")
    q.add_argument("--reference", default="resnet32", help="a ResNet timed alongside (none: skip)")
    q.add_argument("--batch", type=int, default=128)
    q.add_argument("--repeats", type=int, default=7)
    q.add_argument("--warmup", type=int, default=2)
    q.add_argument("--inference-repeats", type=int, default=15)
    q.add_argument("--contiguous", dest="channels_last", action="store_false",
                   help="NCHW memory layout (default: channels_last, as revnet train; faster on CPU)")
    q.add_argument("--channels-last", dest="channels_last", action="store_true", default=True,
                   help=argparse.SUPPRESS)  # the default; kept so older commands still run
    q.add_argument("--against", default=None, metavar="GIT_REV",
                   help="also time the reversible engine of this git revision (e.g. before a change)")
    q.set_defaults(func=_cmd_speed)

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
    q.add_argument("--precisions", nargs="*", choices=bench.DRIFT_PRECISIONS,
                   default=list(bench.DRIFT_PRECISIONS))
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
    q.add_argument("--from", dest="from_json", default=None, metavar="REPORT_JSON",
                   help="measure nothing: render --doc again from a report.json this command wrote")
    q.set_defaults(func=_cmd_report)


def _budget(text: str) -> str:
    try:
        bench.parse_bytes(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


# --------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------

def _setup(args: argparse.Namespace) -> Path:
    if args.threads is not None:
        import torch

        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _progress(total: int, desc: str) -> tuple[Callable[[dict[str, Any]], None], Callable[[], None]]:
    from tqdm import tqdm

    bar = tqdm(total=total, desc=desc, unit="pt", leave=False)
    return (lambda _: bar.update()), bar.close


def _save(out: Path, name: str, result: dict[str, Any]) -> Path:
    result = {**result, "environment": result.get("environment") or bench.environment()}
    path = out / f"{name}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def _run_memory(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    kw = {"units": args.units, "kinds": args.kinds, "models": args.models, "batch": args.batch,
          "model_batch": args.model_batch, "block": args.block, "image_size": args.image_size,
          "device": args.device, **over}
    n_models = sum(len([k for k in kw["kinds"] if (k != "resnet") == m.startswith("revnet")])
                   for m in kw["models"])
    tick, close = _progress(len(kw["units"]) * len(kw["kinds"]) + n_models, "memory")
    try:
        return bench.memory_sweep(**kw, progress=tick)
    finally:
        close()


def _run_speed(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    kw = {"model": args.model, "reference": None if str(args.reference).lower() == "none" else args.reference,
          "batch": args.batch, "repeats": args.repeats, "warmup": args.warmup,
          "inference_repeats": args.inference_repeats, "channels_last": args.channels_last,
          "against": getattr(args, "against", None), "image_size": args.image_size,
          "device": args.device, **over}
    tick, close = _progress(kw["repeats"], "speed " + ("channels_last" if kw["channels_last"] else ""))
    try:
        return bench.speed(**kw, progress=tick)
    finally:
        close()


def _run_capacity(args: argparse.Namespace, **over: Any) -> dict[str, Any]:
    kw = {"models": args.models, "depth_batch": args.depth_batch, "verify_max_batch": args.verify_max_batch,
          "verify_max_units": args.verify_max_units, "image_size": args.image_size,
          "device": args.device, **over}
    budget = bench.parse_bytes(kw.pop("budget", args.budget))
    tick, close = _progress(0, "capacity probes")
    try:
        return bench.capacity(budget, **kw, progress=tick)
    finally:
        close()


def _cmd_memory(args: argparse.Namespace) -> int:
    out = _setup(args)
    result = _run_memory(args, **(_QUICK_MEMORY if args.quick else {}))
    print(_text(*memory_table(result)))
    if result["config"]["models"]:
        print()
        print(_text(*models_table(result)))
    _report_files(out, "memory", result, bench.plot_memory)
    return 0


def _cmd_speed(args: argparse.Namespace) -> int:
    out = _setup(args)
    result = _run_speed(args, **(_QUICK_SPEED if args.quick else {}))
    print(_text(*speed_table(result)))
    print(" ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items()))
    _report_files(out, "speed", result, bench.plot_speed)
    return 0


def _cmd_capacity(args: argparse.Namespace) -> int:
    out = _setup(args)
    result = _run_capacity(args, **(_QUICK_CAPACITY if args.quick else {}))
    print(_text(*capacity_table(result)))
    _report_files(out, "capacity", result, bench.plot_capacity)
    return 0


def _run_data(recipe: str, dataset: str | None, data_dir: str | None, batch: int | None,
              batches: int, repeats: int, warmup: int, device: str) -> dict[str, Any]:
    """The loader of ``recipe`` (or ``dataset``) against its training step, images/s each."""
    import torch

    from . import data
    from .train import RECIPES, TrainConfig, resolve_amp

    if recipe not in RECIPES:
        raise SystemExit(f"revnet bench data: unknown recipe {recipe!r}; known: {sorted(RECIPES)}")
    cfg = {**TrainConfig().__dict__, **RECIPES[recipe]}
    cfg["amp"] = resolve_amp(cfg["amp"], torch.device(device))
    name = dataset or cfg["dataset"]
    batch = batch or cfg["batch_size"]
    ds = data.load_dataset(name, "train", data_dir, **(cfg["synthetic"] if name == "synthetic" else {}))
    loader = data.Loader(ds, batch, train=True, device=device, pad=cfg["crop_pad"], flip=cfg["flip"])
    load = data.loader_throughput(loader, batches=batches)
    step = bench.train_step_rate(cfg["model"], batch=batch, image_size=ds.image_size[0],
                                 in_chans=ds.in_chans, amp=cfg["amp"], channels_last=cfg["channels_last"],
                                 repeats=repeats, warmup=warmup, device=device)
    return {"config": {"recipe": recipe, "dataset": name, "batch": batch, "device": device,
                       "model": cfg["model"], "amp": cfg["amp"], "crop_pad": cfg["crop_pad"],
                       "flip": cfg["flip"], "threads": step["config"]["threads"]},
            "loader": load, "train_step": step, "ratio": load["images_per_s"] / step["images_per_s"]}


def _augmentation(c: dict[str, Any]) -> str:
    done = [f"random crop (pad {c['crop_pad']})"] * bool(c["crop_pad"]) + ["random flip"] * bool(c["flip"])
    return " and ".join(done) or "no augmentation"


def data_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    c, load, step = result["config"], result["loader"], result["train_step"]
    return ["path", "images/s", "what"], [
        ("loader", f"{load['images_per_s']:,.0f}",
         f"{c['dataset']} batch {c['batch']}: gather + {_augmentation(c).replace(' and ', ' + ')} "
         "+ normalise"),
        ("training step", f"{step['images_per_s']:,.0f}",
         f"{c['model']}, amp {c['amp']}, forward + backward + SGD"),
    ]


def _cmd_data(args: argparse.Namespace) -> int:
    out = _setup(args)
    quick = args.quick
    result = _run_data(args.recipe, args.dataset, args.data_dir, args.batch, 20 if quick else args.batches,
                       3 if quick else args.repeats, 1 if quick else 2, args.device)
    print(_text(*data_table(result)))
    print(f"loader / training step = {result['ratio']:.1f}x")
    print(f"wrote {_save(out, 'data', result)}")
    return 0


def _cmd_drift(args: argparse.Namespace) -> int:
    import torch

    from . import data

    out = _setup(args)
    state, cfg = None, {}
    if args.checkpoint:
        try:
            saved = torch.load(args.checkpoint, map_location="cpu", weights_only=False)
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
        ds = data.load_dataset(name, "test", args.data_dir or cfg.get("data_dir"), **extra)
    except (FileNotFoundError, ValueError) as e:
        raise SystemExit(f"revnet bench drift: cannot load the batch: {e}") from None
    quick = args.quick
    batch = 4 if quick else args.batch
    images = data.normalize(ds.images[:batch], ds.mean, ds.std)
    depths = [1, 2, 4] if quick else args.depths
    runs = (len(args.precisions) + len(args.exact_precisions)) * (2 if state else 1)
    tick, close = _progress(runs, "drift")
    try:
        result = bench.drift(model, state_dict=state, images=images, depths=depths,
                             precisions=args.precisions, exact_precisions=args.exact_precisions,
                             num_classes=ds.num_classes, device=args.device, progress=tick,
                             **({} if args.exact_bits is None else {"exact_bits": args.exact_bits}))
    except ValueError as e:
        raise SystemExit(f"revnet bench drift: {e}") from None
    finally:
        close()
    result["config"].update(checkpoint=args.checkpoint, dataset=name)
    print(_text(*drift_table(result)))
    if args.cost:
        result["cost"] = bench.exact_cost(
            model, batch=8 if quick else args.cost_batch, image_size=ds.image_size[0], in_chans=ds.in_chans,
            repeats=2 if quick else args.repeats, warmup=1 if quick else 2, device=args.device)
        print()
        print(_text(*exact_cost_table(result["cost"])))
    result["args"] = {k: v for k, v in vars(args).items() if k != "func"}
    _report_files(out, "drift", result, bench.plot_drift)
    return 0


def _report_files(out: Path, name: str, result: dict[str, Any], plot: Callable[..., Path]) -> None:
    print(f"wrote {_save(out, name, result)} and {plot(result, out / f'{name}.png')}")


def _cmd_report(args: argparse.Namespace) -> int:
    if args.from_json:
        saved = json.loads(Path(args.from_json).read_text())
        doc = Path(args.doc)
        doc.write_text(render_report(saved["meta"], saved["memory"], saved["speed"], saved["capacity"],
                                     os.path.relpath(Path(args.from_json).parent, doc.parent),
                                     saved.get("flatness"), saved.get("data")))
        print(f"wrote {doc} from {args.from_json} (measured {saved['meta']['environment']['date']})")
        return 0
    out = _setup(args)
    quick, started, env = args.quick, time.time(), bench.environment()
    ns = argparse.Namespace
    common = {"image_size": args.image_size, "device": args.device}
    memory = _run_memory(ns(
        units=[1, 3, 9, 18, 36], kinds=list(bench.KINDS), batch=32, model_batch=128, block="basic",
        models=[m for pair in bench.PAPER_PAIRS for m in pair], **common),
        **(_QUICK_MEMORY | {"models": ["resnet32", "revnet38"]} if quick else {}))
    _report_files(out, "memory", memory, bench.plot_memory)
    # The flatness target at the paper's batch, where activations dominate the peak.
    flat = _run_memory(ns(units=[3, 36], kinds=["revnet"], batch=128, model_batch=128, block="basic",
                          models=[], **common), **({"units": [1, 3], "batch": 16} if quick else {}))
    _save(out, "memory_flatness", flat)
    speeds = []
    plan = [{"channels_last": True, "against": args.against}, {"channels_last": False}]
    if not quick:
        # The paper's deepest CIFAR pair, for MemCNN's "RevNet-164 1.47x slower than ResNet-164".
        plan.append({"model": "revnet164", "reference": "resnet164", "batch": 32, "repeats": 5,
                     "kinds": ["revnet", "revnet-plain"], "inference_repeats": 0})
        if args.against:  # where per-block Python overhead shows: many small blocks
            plan.append({"model": "revnet110", "reference": None, "batch": 8, "repeats": 15,
                         "kinds": ["revnet", "revnet-plain"], "inference_repeats": 0,
                         "against": args.against})
    for over in plan:
        base = ns(model="revnet38", reference="resnet32", batch=128, repeats=7, warmup=2,
                  inference_repeats=15, channels_last=True, **common)
        speeds.append(_run_speed(base, **over, **(_QUICK_SPEED if quick else {})))
        print(_text(*speed_table(speeds[-1])))
    _save(out, "speed", {"runs": speeds})
    bench.plot_speed(speeds[0], out / "speed.png")
    capacity = _run_capacity(ns(
        budget=args.budget, models=["resnet110", "revnet110"], depth_batch=128, verify_max_batch=2048,
        verify_max_units=36, **common), **(_QUICK_CAPACITY if quick else {}))
    print(_text(*capacity_table(capacity)))
    _report_files(out, "capacity", capacity, bench.plot_capacity)
    # The data path with all augmentation on (crop + flip: the default recipe's model and step),
    # on synthetic data of the same shape if Fashion-MNIST is absent.
    try:
        loader_vs_step = _run_data("fashion-mnist-long", None, None, None, 20 if quick else 200,
                                   3 if quick else 7, 1 if quick else 2, args.device)
    except (FileNotFoundError, ValueError):
        loader_vs_step = _run_data("fashion-mnist-long", "synthetic", None, None, 20 if quick else 200,
                                   3 if quick else 7, 1 if quick else 2, args.device)
    print(_text(*data_table(loader_vs_step)))
    _save(out, "data", loader_vs_step)
    flags = [("--quick", quick), (f"--budget {args.budget}", args.budget != "1GiB" and not quick),
             (f"--against {args.against}", args.against), (f"--threads {args.threads}", args.threads),
             (f"--device {args.device}", args.device != "cpu")]
    meta = {"command": " ".join([f"revnet bench report --out {args.out} --doc {args.doc}",
                                 *(f for f, on in flags if on)]),
            "environment": env, "loadavg_end": bench.environment()["loadavg"],
            "minutes": (time.time() - started) / 60}
    _save(out, "report", {"meta": meta, "memory": memory, "flatness": flat, "speed": speeds,
                          "capacity": capacity, "data": loader_vs_step, "environment": env})
    doc = Path(args.doc)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(render_report(meta, memory, speeds, capacity, os.path.relpath(out, doc.parent), flat,
                                 loader_vs_step))
    print(f"wrote {doc} in {meta['minutes']:.1f} min")
    return 0


# --------------------------------------------------------------------------------------
# Tables (rows of strings; rendered as text here and as markdown by cli_report)
# --------------------------------------------------------------------------------------

def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def memory_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Activation memory (MiB) per depth, one column per kind."""
    kinds = result["config"]["kinds"]
    sweep = [p for p in result["points"] if p["model"] is None]
    by = {(p["depth"], p["kind"]): p for p in sweep}
    rows = []
    for depth in sorted({p["depth"] for p in sweep}):
        rows.append([str(depth), *(_mib(by[(depth, k)]["activation_bytes"]) if (depth, k) in by else "-"
                                   for k in kinds)])
    return ["depth", *(f"{k} MiB" for k in kinds)], rows


def models_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """The named models: activation, bytes saved for backward and whole step, in MiB."""
    rows = [[p["model"], p["kind"], f"{p['params'] / 1e6:.2f}M", str(p["batch"]), _mib(p["activation_bytes"]),
             _mib(p["saved_bytes"]), _mib(p["total_bytes"])]
            for p in result["points"] if p["model"] is not None]
    return ["model", "kind", "params", "batch", "activation MiB", "saved MiB", "step total MiB"], rows


def speed_table(result: dict[str, Any]) -> tuple[list[str], list[Row]]:
    """Training step and inference times per run."""
    c = result["config"]
    rows = []
    for name, s in result["train"].items():
        label = name if name in bench.KINDS or "@" in name else f"{name} (reference)"
        rows.append([label, "train",
                     f"{s['median_s'] * 1e3:.0f}", f"{s['p25_s'] * 1e3:.0f}-{s['p75_s'] * 1e3:.0f}",
                     f"{s['images_per_s']:.0f}", _ratio(result, f"{c['kinds'][0]}/{name}")])
    for name, s in result["inference"].items():
        rows.append([name, "inference", f"{s['median_s'] * 1e3:.1f}",
                     f"{s['p25_s'] * 1e3:.1f}-{s['p75_s'] * 1e3:.1f}", f"{s['images_per_s']:.0f}",
                     _ratio(result, "inference revnet/revnet-plain") if name == "revnet-plain" else ""])
    return ["run", "pass", "median ms", "quartiles ms", "images/s", f"{c['kinds'][0]} / this"], rows


def _ratio(result: dict[str, Any], key: str) -> str:
    r = result["ratios"].get(key)
    return "" if r is None else f"{r:.3f}"


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
    budget = bench.format_bytes(result["config"]["budget_bytes"])
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
        rows.append(["activation memory, float32", f"{_mib(a)} MiB", f"{_mib(b)} MiB", f"{b / a:.3f}"])
        a, b = mem["float"]["saved_bytes"], mem["exact"]["saved_bytes"]
        rows.append(["saved for backward", f"{_mib(a)} MiB", f"{_mib(b)} MiB", f"{b / a:.3f}"])
    c = cost["config"]
    return [f"{c['model']}, batch {c['batch']}", "float", "exact", "exact / float"], rows


def _opt(v: Any) -> str:
    return "-" if v is None else str(v)


def _text(header: Sequence[str], rows: Sequence[Row]) -> str:
    cells = [list(map(str, header))] + [list(map(str, r)) for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return os.linesep.join(lines)


def _markdown(header: Sequence[str], rows: Sequence[Row]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------
# docs/BENCHMARKS.md
# --------------------------------------------------------------------------------------

# MemCNN (van de Leemput et al. 2019), Table: CIFAR-10 training memory in MB at batch 128.
_MEMCNN_MB = {"32/38": (238.6, 85.6), "110/110": (810.7, 85.7), "164/164": (2452.8, 432.7)}


def _point(memory: dict[str, Any], kind: str, model: str | None = None,
           units: int | None = None) -> dict[str, Any] | None:
    return next((p for p in memory["points"] if p["kind"] == kind and p["model"] == model
                 and (units is None or p["units"] == units)), None)


def _act(p: dict[str, Any] | None) -> float | None:
    return None if p is None else p["activation_bytes"]


def _growth(res: dict[str, Any]) -> tuple[int, int, float | None, float | None]:
    """RevNet from 3 (or the fewest) to the most units of a sweep: activation, saved growth."""
    units = res["config"]["units"]
    lo, hi = (3 if 3 in units else min(units)), max(units)
    a, b = _point(res, "revnet", units=lo), _point(res, "revnet", units=hi)
    if a is None or b is None:
        return lo, hi, None, None
    return (lo, hi, b["activation_bytes"] / a["activation_bytes"] - 1,
            b["saved_bytes"] / a["saved_bytes"] - 1)


def _headline(memory: dict[str, Any], speeds: list[dict[str, Any]],
              flat: dict[str, Any] | None = None) -> dict[str, float | None]:
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
        for key in ("revnet/revnet-plain", "revnet/revnet-checkpoint", "inference revnet/revnet-plain"):
            h[f"{key} ({tag})"] = sp["ratios"].get(key)
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
        r = h.get(f"revnet/revnet-plain ({tag})")
        rows.append([f"revnet38 step, reversible / plain autograd ({tag})", "<= 1.25",
                     _fmt(r, ".3f"), _check(r, r is not None and r <= 1.25)])
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
    return rows


def _memcnn_rows(memory: dict[str, Any]) -> list[Row]:
    rows = []
    for (res, rev), (m_res, m_rev) in zip(bench.PAPER_PAIRS, _MEMCNN_MB.values(), strict=True):
        a, b = _act(_point(memory, "resnet", res)), _act(_point(memory, "revnet", rev))
        ours = "n/a" if a is None or b is None else f"{_mib(a)} vs {_mib(b)} ({a / b:.1f}x)"
        rows.append([f"{res} vs {rev}", ours, f"{m_res} vs {m_rev} MB ({m_res / m_rev:.1f}x)"])
    return rows


def render_report(meta: dict[str, Any], memory: dict[str, Any], speeds: list[dict[str, Any]],
                  capacity: dict[str, Any], rel: str, flat: dict[str, Any] | None = None,
                  loader_vs_step: dict[str, Any] | None = None) -> str:
    """docs/BENCHMARKS.md: every number below comes from the results passed in."""
    env, h = meta["environment"], _headline(memory, speeds, flat)
    load0, load1 = env["loadavg"][0], meta["loadavg_end"][0]
    busy = max(load0, load1) > env["torch_threads"] + 0.5  # more than this run's own threads
    mc, sc0 = memory["config"], speeds[0]["config"]
    parts = [
        "# Benchmarks: memory, speed and capacity of reversible backprop",
        "",
        f"Generated by `{meta['command']}` ({meta['minutes']:.1f} min). Do not edit by hand: rerun it.",
        "",
        f"- machine: {env['cpu']}, {env['cpu_count']} cores (torch threads: {env['torch_threads']}), "
        f"{_mib(env['memory_bytes'] or 0)} MiB RAM{', GPU ' + env['cuda'] if env['cuda'] else ''}",
        f"- software: torch {env['torch']}, Python {env['python']}, {env['platform']}",
        f"- date: {env['date']}, git commit {env['git_commit']}",
        f"- load average (1 min) at start / end: {load0:.2f} / {load1:.2f}"
        + (" -- **the machine was busy with other work: absolute times are inflated; the ratios "
           "alternate the runs in one process and are the figures to read.**" if busy else ""),
        "",
        "## Targets",
        "",
        _markdown(["what", "target", "measured", ""], _targets(h, memory, flat)),
        "",
        "## Activation memory across depth",
        "",
        f"![activation memory against depth]({rel}/memory.png)",
        "",
        f"One training step (forward, cross-entropy, backward) at batch {mc['batch']}, "
        f"{mc['image_size']}x{mc['image_size']} images, {mc['device']}, {mc['dtype']}. "
        f"ResNet: widths {'-'.join(map(str, bench.RESNET_CHANNELS))} with 2n units per stage "
        f"(6(2n)+2 layers); RevNet: widths {'-'.join(map(str, bench.REVNET_CHANNELS))} with n units "
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
        _markdown(*memory_table(memory)),
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
            _markdown(*models_table(memory)),
            "",
            "Against the published reference points (MemCNN, CIFAR-10 at batch 128, PyTorch on a GPU; "
            "our CPU figures count activations only and differ in what is stored, so compare the ratios):",
            "",
            _markdown(["pair", "this machine, activation MiB", "MemCNN"], _memcnn_rows(memory)),
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
                  _markdown(*speed_table(sp)), "",
                  "Spread of the per-repeat ratios: " + "; ".join(
                      f"{k} {v['median']:.3f} (min {v['min']:.3f}, max {v['max']:.3f})"
                      for k, v in sp["pair_ratios"].items()), ""]
    ab = "measured above" if sc0.get("against") else "not measured in this run: pass --against REV"
    parts += ["For scale: the paper reports 1.5-2x per update for its implementation, the theory 1.33x "
              "(four passes instead of three), and MemCNN RevNet-164 1.47x slower than ResNet-164.", "",
              "Engine before/after: runs named `revnet@REV` use the reversible engine of git revision REV "
              f"on the same model and weights, alternated with the current one ({ab}).", ""]
    cc = capacity["config"]
    parts += [
        f"## Capacity under {bench.format_bytes(cc['budget_bytes'])}", "",
        f"![largest batch under the budget]({rel}/capacity.png)", "",
        "Memory here is the whole training step, gradients kept as in ordinary training: weights, "
        "buffers, the batch, gradients, activations and workspace. It is "
        "affine in batch and in depth, so a line through two small probes predicts the limit; real steps "
        f"then check it (batches up to {cc['verify_max_batch']}, RevNet depths up to "
        f"{cc['verify_max_units']} units per stage). `first over` is the smallest probe that did not fit. "
        "A RevNet's depth limit is set by its weights alone and lies far beyond what a CPU can "
        "check in minutes: that figure is the line's extrapolation, marked as such.", "",
        _markdown(*capacity_table(capacity)), "",
    ]
    if loader_vs_step:
        c = loader_vs_step["config"]
        parts += [
            "## Data path", "",
            f"The in-memory loader of `revnet train --recipe {c['recipe']}` alone (index gather, batched "
            f"{_augmentation(c)}, normalisation) against that recipe's whole training step on random "
            f"data, {c['threads']} torch thread{'s' if c['threads'] != 1 else ''} each "
            "(`revnet bench data`):", "",
            _markdown(*data_table(loader_vs_step)), "",
            f"The loader delivers **{loader_vs_step['ratio']:.0f}x** the training step's images/s "
            "(target: at least 20x).", "",
        ]
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
        "",
    ]
    return "\n".join(parts)
