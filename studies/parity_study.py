"""Parity study: the reversible network vs its residual baseline, and reversible vs plain backprop.

Trains each configuration for each seed with `revnet train` (same recipe, same seeds),
then writes a table (test accuracy mean +- std, wall time, memory) and the curves:

    .venv/bin/python studies/parity_study.py --seeds 0 1 2 --jobs 2 --out runs/parity --doc docs
    .venv/bin/python studies/parity_study.py --family vit --out runs/parity-vit --doc docs

`--family cnn` (default): RevNet-38 vs ResNet-32 on the default recipe; `--family vit`:
RevViT-mini vs the residual ViT-mini on `--recipe fashion-mnist-vit`; `--family gpt`: RevGPT-mini
vs the residual GPT-mini on `--recipe text-lm` (bits per byte on the held-out stdlib files, lower
is better).
Extra arguments after `--` go to every `revnet train` (e.g. `-- --epochs 10`).
`--tune-lr 1e-3 2e-3 4e-3`: first train the reversible network and the residual baseline at
each of those peak learning rates (the first seed), then run the study with each at the
rate that scored best (the plain-backprop run takes the reversible network's rate: it is the
same network); PARITY.md gets the sweep's table too. Each architecture is then compared at
its own best rate rather than at a rate tuned for one of them.
Runs already finished in --out are reused, so an interrupted study continues.
Only the part of --doc/PARITY.md between the family's two parity-study markers is
rewritten; the rest of the page is kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from revnet.bench.environment import environment
from revnet.bench.memory import measure
from revnet.memory.sizes import format_bytes
from revnet.training import read_metrics

# family -> label -> (run folder prefix, memory kind, revnet train arguments); the first
# configuration is the reversible network, the second the same with plain backprop, the third
# the residual baseline.
FAMILIES = {
    "cnn": {
        "RevNet-38 (reversible)": ("revnet38", "revnet", ["--model", "revnet38"]),
        "RevNet-38 (plain backprop)": ("revnet38-plain", "revnet-plain",
                                       ["--model", "revnet38", "--no-reversible"]),
        "ResNet-32": ("resnet32", "resnet", ["--model", "resnet32"]),
    },
    "vit": {
        "RevViT-mini (reversible)": ("revvit_mini", "revvit", ["--recipe", "fashion-mnist-vit"]),
        "RevViT-mini (plain backprop)": ("revvit_mini-plain", "revvit-plain",
                                         ["--recipe", "fashion-mnist-vit", "--no-reversible"]),
        "ViT-mini (residual)": ("vit_mini", "vit", ["--recipe", "fashion-mnist-vit", "--model", "vit_mini"]),
    },
    "gpt": {
        "RevGPT-mini (reversible)": ("revgpt_mini", "revgpt", ["--recipe", "text-lm"]),
        "RevGPT-mini (plain backprop)": ("revgpt_mini-plain", "revgpt-plain",
                                         ["--recipe", "text-lm", "--no-reversible"]),
        "GPT-mini (residual)": ("gpt_mini", "gpt", ["--recipe", "text-lm", "--model", "gpt_mini"]),
    },
}
# family -> (summary key, its name in the table, lower is better)
METRICS = {"cnn": ("test_accuracy", "test accuracy", False), "vit": ("test_accuracy", "test accuracy", False),
           "gpt": ("test_bits_per_byte", "bits per byte", True)}
CONFIGS = FAMILIES["cnn"]  # set by main() from --family
METRIC = METRICS["cnn"]


def run_one(label: str, seed: int, out: Path, extra: list[str], threads: int,
            lr: float | None = None) -> Path:
    """Trains one configuration at one seed (at peak learning rate ``lr`` if given) and returns its folder."""
    prefix, _, train_args = CONFIGS[label]
    run_dir = out / (f"{prefix}-seed{seed}" if lr is None else f"{prefix}-lr{lr:g}-seed{seed}")
    if (run_dir / "summary.json").is_file() and not json.loads(
            (run_dir / "summary.json").read_text())["interrupted"]:
        return run_dir
    cmd = [sys.executable, "-m", "revnet", "train", *train_args, "--seed", str(seed),
           "--out", str(run_dir), "--no-memory-report", *extra, *([] if lr is None else ["--lr", f"{lr:g}"])]
    if not any(a.startswith("--nproc") for a in extra):
        cmd += ["--nproc", "1"]  # one process of --threads threads, as this study's tables say
    if (run_dir / "last.pt").is_file():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(out / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run_dir


def summarize(runs: dict[str, list[Path]], extra: list[str]) -> dict:
    rows = {}
    for label, dirs in runs.items():
        s = [json.loads((d / "summary.json").read_text()) for d in dirs]
        acc = [r[METRIC[0]] for r in s]
        cfg = s[0]["config"]
        shape = ({"context": s[0]["context_length"]} if "vocab_size" in s[0]
                 else {"image_size": s[0]["image_size"], "in_chans": s[0]["in_chans"]})
        mem = measure(kind=CONFIGS[label][1], model=cfg["model"], batch=cfg["batch_size"], **shape)
        rate = "tokens_per_s" if "tokens_per_s" in s[0] else "images_per_s"
        rows[label] = {
            "seeds": [r["config"]["seed"] for r in s], METRIC[0]: acc,
            "mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in s),
            rate: statistics.mean(r[rate] for r in s),
            "peak_rss_bytes": statistics.mean(r["peak_memory_bytes"] for r in s),
            "activation_bytes": mem["activation_bytes"], "params": mem["params"],
            "runs": [str(d) for d in dirs], "config": cfg,
        }
    return rows


def plot(runs: dict[str, list[Path]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for (label, dirs), color in zip(runs.items(), ("C0", "C1", "C2"), strict=False):
        for i, d in enumerate(dirs):
            rows = read_metrics(d)
            train = [r for r in rows if "loss" in r]
            test = [r for r in rows if METRIC[0] in r]
            kw = {"color": color, "alpha": 0.8, "label": label if i == 0 else None}
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], **kw)
            axes[1].plot([r["step"] for r in test], [r[METRIC[0]] for r in test], "o-", **kw)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].set(title=f"test {METRIC[1].removeprefix('test ')}", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def curves_name(family: str) -> str:
    return "curves.png" if family == "cnn" else f"curves-{family}.png"


def markers(family: str) -> tuple[str, str]:
    """The comments that open and close the family's section of PARITY.md."""
    tag = "parity-study" if family == "cnn" else f"parity-study-{family}"
    return f"<!-- {tag}: begin (written by studies/parity_study.py) -->", f"<!-- {tag}: end -->"


def _data(cfg: dict) -> str:
    return {"text": "the standard library's source, bytes", "fashion-mnist": "Fashion-MNIST"}.get(
        cfg.get("dataset", "fashion-mnist"), cfg.get("dataset", "fashion-mnist"))


def write_doc(rows: dict, args: argparse.Namespace, extra: list[str], doc: Path, commit: str,
              sweep: dict[str, dict[float, float]]) -> None:
    cmd = "python studies/parity_study.py " + " ".join(
        (["--family", args.family] if args.family != "cnn" else [])
        + ["--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), "--out", str(args.out),
           "--doc", str(args.doc)] + (["--tune-lr", *(f"{lr:g}" for lr in args.tune_lr)] if sweep else [])
        + (["--", *extra] if extra else []))
    (rev_label, rev), (plain_label, plain), (res_label, res) = rows.items()
    cfg = rev["config"]
    begin, end = markers(args.family)
    length = f"{cfg['steps']} steps" if cfg.get("steps") else f"{cfg['epochs']:g} epochs"  # steps win
    aug = ", ".join(name for name, on in ((f"crop (pad {cfg['crop_pad']})", cfg["crop_pad"]),
                                          ("flip", cfg["flip"])) if on)
    precision = f"{cfg['amp']} autocast" if cfg["amp"] != "none" else "float32"
    lr = "peak lr per row" if sweep else f"lr {cfg['lr']:g}"
    optimizer = (f"AdamW {lr} weight decay {cfg['weight_decay']:g}"
                 if cfg.get("optimizer") == "adamw" else f"SGD {lr}")
    smoothing = f", label smoothing {cfg['label_smoothing']:g}" if cfg.get("label_smoothing") else ""
    lines = [
        begin, "",
        f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}, {environment()['cpu'] or platform.machine()}, "
        f"torch {torch.__version__}, revnet at commit {commit}, {args.jobs} runs at a time with "
        f"{args.threads} thread(s) each (so wall times are comparable within this table, not with a "
        "run that has the whole machine).",
        "", f"Recipe: `revnet train --recipe {cfg['recipe']}` ({_data(cfg)}: {precision}, {length}, batch "
        f"{cfg['batch_size']}, {optimizer} {cfg['schedule']}{smoothing}, "
        f"{(aug or 'no augmentation') if cfg.get('dataset') != 'text' else 'random windows'}; see "
        "`config.json` of each run)" + (f" plus `{' '.join(extra)}`" if extra else "") + ".", "",
    ]
    key, name_of_metric, lower = METRIC
    pick = min if lower else max

    def cell(v: float) -> str:  # accuracy in percent, bits per byte as they are
        return f"{v:.4f}" if lower else f"{100 * v:.2f}"

    if sweep:
        tried = sorted({lr for scores in sweep.values() for lr in scores})
        lines += [
            f"Peak learning rate, tuned first: {name_of_metric} of seed {args.seeds[0]} at each rate (the "
            "best in bold; chosen on the test set, as there is no held-out split, for every architecture "
            "alike).",
            "", "| configuration | " + " | ".join(f"lr {lr:g}" for lr in tried) + " |",
            "|---|" + "---|" * len(tried),
        ]
        for label, scores in sweep.items():
            best = pick(scores, key=scores.__getitem__)
            cells = [(f"**{cell(scores[lr])}**" if lr == best else cell(scores[lr]))
                     if lr in scores else "" for lr in tried]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += [
        "| configuration | params | " + ("peak lr | " if sweep else "") + f"{name_of_metric} (mean +- std) "
        f"| per seed | wall s | {'tokens' if lower else 'img'}/s | activation memory / step |",
        "|---|---|" + ("---|" if sweep else "") + "---|---|---|---|---|",
    ]
    for label, r in rows.items():
        per = ", ".join(f"{a:.4f}" for a in r[key])
        lr_cell = f"{r['config']['lr']:g} | " if sweep else ""
        rate = r.get("tokens_per_s", r.get("images_per_s"))
        lines.append(f"| {label} | {r['params'] / 1e6:.3f}M | {lr_cell}{cell(r['mean'])} +- "
                     f"{cell(r['std'])} | {per} | {r['wall_seconds']:.0f} | {rate:.0f} "
                     f"| {format_bytes(r['activation_bytes'])} |")
    name = rev_label.split(" (")[0]

    def diff(a: dict, b: dict) -> str:  # points of accuracy; bits per byte relative to b's
        if lower:
            return f"{a['mean'] - b['mean']:+.4f} bits per byte ({100 * (a['mean'] / b['mean'] - 1):+.2f}%)"
        return f"{100 * (a['mean'] - b['mean']):+.2f} points"

    lines += [
        "", f"- {name} minus {res_label}: {diff(rev, res)}.",
        f"- {name} reversible minus plain backprop: {diff(rev, plain)} "
        "(same weights at step 0 and the same batches; they differ only by floating-point "
        "reconstruction error).",
        "- Activation memory: one training step at the recipe's batch, measured in a fresh process "
        "(`revnet.measure`, VmHWM - VmRSS on CPU, parameter gradients excluded).",
        "", f"![curves](parity/{curves_name(args.family)})", "", end,
    ]
    text = doc.read_text() if doc.is_file() else "# Parity study: do RevNets train as well as ResNets?\n\n"
    opening = begin.split(" (", 1)[0]  # also finds a section written when the study lived in scripts/
    if opening + " " in text and end in text:
        head, rest = text.split(opening + " ", 1)
        text = head + "\n".join(lines) + rest.split(end, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    doc.write_text(text)


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=sorted(FAMILIES), default="cnn",
                   help="cnn: RevNet-38 / ResNet-32; vit: RevViT-mini / ViT-mini (fashion-mnist-vit); gpt: "
                        "RevGPT-mini / GPT-mini (text-lm)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, default=Path("runs/parity"))
    p.add_argument("--doc", type=Path, default=Path("docs"))
    p.add_argument("--tune-lr", type=float, nargs="+", metavar="LR",
                   help="peak learning rates to try (first seed) before the study; each architecture then "
                        "trains at its best")
    args = p.parse_args(argv)
    global CONFIGS, METRIC
    CONFIGS, METRIC = FAMILIES[args.family], METRICS[args.family]
    # Before the runs: the commit they train with (environment reads the package's checkout).
    commit = environment()["git_commit"] or "unknown (not a git checkout)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.doc / "parity").mkdir(parents=True, exist_ok=True)
    rev_label, plain_label, res_label = CONFIGS
    lrs: dict[str, float | None] = dict.fromkeys(CONFIGS)
    sweep: dict[str, dict[float, float]] = {}
    if args.tune_lr:
        tries = [(label, lr) for lr in args.tune_lr for label in (rev_label, res_label)]
        with ThreadPoolExecutor(args.jobs) as pool:
            dirs = list(pool.map(lambda j: run_one(j[0], args.seeds[0], args.out, extra, args.threads, j[1]),
                                 tries))
        for (label, lr), d in zip(tries, dirs, strict=True):
            sweep.setdefault(label, {})[lr] = json.loads((d / "summary.json").read_text())[METRIC[0]]
        for label, scores in sweep.items():
            lrs[label] = (min if METRIC[2] else max)(scores, key=scores.__getitem__)
        lrs[plain_label] = lrs[rev_label]  # the same network: only the backward differs
    jobs = [(label, seed) for seed in args.seeds for label in CONFIGS]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: run_one(j[0], j[1], args.out, extra, args.threads, lrs[j[0]]), jobs))
    runs = {label: [d for (lab, _), d in zip(jobs, done, strict=True) if lab == label] for label in CONFIGS}
    rows = summarize(runs, extra)
    suffix = "" if args.family == "cnn" else f"-{args.family}"
    results = {**rows, **({"lr_sweep": {k: {f"{lr:g}": a for lr, a in v.items()} for k, v in sweep.items()}}
                          if sweep else {})}
    (args.doc / "parity" / f"results{suffix}.json").write_text(json.dumps(results, indent=2) + "\n")
    plot(runs, args.doc / "parity" / curves_name(args.family))
    write_doc(rows, args, extra, args.doc / "PARITY.md", commit, sweep)
    print((args.doc / "PARITY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
