"""Parity study: RevNet-38 vs ResNet-32, and RevNet-38 reversible vs plain backprop.

Trains each configuration for each seed with `revnet train` (same recipe, same seeds),
then writes a table (test accuracy mean +- std, wall time, memory) and the curves:

    .venv/bin/python scripts/parity_study.py --seeds 0 1 2 --jobs 2 --out runs/parity --doc docs

Extra arguments after `--` go to every `revnet train` (e.g. `-- --epochs 10`).
Runs already finished in --out are reused, so an interrupted study continues.
Only the part of --doc/PARITY.md between the two parity-study markers is rewritten; the
rest of the page (the longer recipe) is kept.
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
from revnet.environment import environment

from revnet.bench.memory import measure
from revnet.bench.sizes import format_bytes
from revnet.training import read_metrics

CONFIGS = {  # label -> revnet train arguments
    "RevNet-38 (reversible)": ["--model", "revnet38"],
    "RevNet-38 (plain backprop)": ["--model", "revnet38", "--no-reversible"],
    "ResNet-32": ["--model", "resnet32"],
}


def run_one(label: str, seed: int, out: Path, extra: list[str], threads: int) -> Path:
    run_dir = out / f"{CONFIGS[label][1]}{'-plain' if '--no-reversible' in CONFIGS[label] else ''}-seed{seed}"
    if (run_dir / "summary.json").is_file() and not json.loads(
            (run_dir / "summary.json").read_text())["interrupted"]:
        return run_dir
    cmd = [sys.executable, "-m", "revnet", "train", *CONFIGS[label], "--seed", str(seed),
           "--out", str(run_dir), "--no-memory-report", *extra]
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
        acc = [r["test_accuracy"] for r in s]
        cfg = s[0]["config"]
        kind = "resnet" if cfg["model"].startswith("resnet") else (
            "revnet" if cfg["reversible"] else "revnet-plain")
        mem = measure(kind=kind, model=cfg["model"], batch=cfg["batch_size"],
                            image_size=s[0]["image_size"])
        rows[label] = {
            "seeds": [r["config"]["seed"] for r in s], "test_accuracy": acc,
            "mean": statistics.mean(acc), "std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
            "wall_seconds": statistics.mean(r["wall_seconds"] for r in s),
            "images_per_s": statistics.mean(r["images_per_s"] for r in s),
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
            test = [r for r in rows if "test_accuracy" in r]
            kw = {"color": color, "alpha": 0.8, "label": label if i == 0 else None}
            axes[0].plot([r["step"] for r in train], [r["loss"] for r in train], **kw)
            axes[1].plot([r["step"] for r in test], [r["test_accuracy"] for r in test], "o-", **kw)
    axes[0].set(title="training loss", xlabel="step", yscale="log")
    axes[1].set(title="test accuracy", xlabel="step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


BEGIN, END = "<!-- parity-study: begin (written by scripts/parity_study.py) -->", "<!-- parity-study: end -->"


def write_doc(rows: dict, args: argparse.Namespace, extra: list[str], doc: Path, commit: str) -> None:
    cmd = "python scripts/parity_study.py " + " ".join(
        ["--seeds", *map(str, args.seeds), "--jobs", str(args.jobs), "--out", str(args.out),
         "--doc", str(args.doc)] + (["--", *extra] if extra else []))
    cfg = rows["RevNet-38 (reversible)"]["config"]
    length = f"{cfg['epochs']:g} epochs" if cfg.get("epochs") else f"{cfg['steps']} steps"
    aug = ", ".join(name for name, on in ((f"crop (pad {cfg['crop_pad']})", cfg["crop_pad"]),
                                          ("flip", cfg["flip"])) if on)
    precision = f"{cfg['amp']} autocast" if cfg["amp"] != "none" else "float32"
    lines = [
        BEGIN, "",
        f"Produced by `{cmd}` on {time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"torch {torch.__version__}, revnet at commit {commit}, {args.jobs} runs at a time with "
        f"{args.threads} thread(s) each (so wall times are comparable within this table, not with a "
        "run that has the whole machine).",
        "", f"Recipe: `revnet train` defaults (Fashion-MNIST: {precision}, {length}, batch "
        f"{cfg['batch_size']}, SGD lr {cfg['lr']:g} {cfg['schedule']}, {aug or 'no augmentation'}; see "
        "`config.json` of each run)" + (f" plus `{' '.join(extra)}`" if extra else "") + ".", "",
        "| configuration | params | test accuracy (mean +- std) | per seed | wall s | img/s "
        "| activation memory / step |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        per = ", ".join(f"{a:.4f}" for a in r["test_accuracy"])
        lines.append(f"| {label} | {r['params'] / 1e6:.3f}M | {100 * r['mean']:.2f} +- {100 * r['std']:.2f} "
                     f"| {per} | {r['wall_seconds']:.0f} | {r['images_per_s']:.0f} "
                     f"| {format_bytes(r['activation_bytes'])} |")
    rev, res = rows["RevNet-38 (reversible)"], rows["ResNet-32"]
    plain = rows["RevNet-38 (plain backprop)"]
    lines += [
        "", f"- RevNet-38 minus ResNet-32: {100 * (rev['mean'] - res['mean']):+.2f} points.",
        f"- RevNet-38 reversible minus plain backprop: {100 * (rev['mean'] - plain['mean']):+.2f} points "
        "(same weights at step 0 and the same batches; they differ only by floating-point "
        "reconstruction error).",
        "- Activation memory: one training step at the recipe's batch, measured in a fresh process "
        "(`revnet.measure`, VmHWM - VmRSS on CPU, parameter gradients excluded).",
        "", "![curves](parity/curves.png)", "", END,
    ]
    text = doc.read_text() if doc.is_file() else "# Parity study: do RevNets train as well as ResNets?\n\n"
    if BEGIN in text and END in text:
        head, rest = text.split(BEGIN, 1)
        text = head + "\n".join(lines) + rest.split(END, 1)[1]
    else:
        text = text.rstrip("\n") + "\n\n" + "\n".join(lines) + "\n"
    doc.write_text(text)


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--jobs", type=int, default=2, help="runs at a time")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, default=Path("runs/parity"))
    p.add_argument("--doc", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    # Before the runs: the commit they train with (environment reads the package's checkout).
    commit = environment()["git_commit"] or "unknown (not a git checkout)"
    args.out.mkdir(parents=True, exist_ok=True)
    (args.doc / "parity").mkdir(parents=True, exist_ok=True)
    jobs = [(label, seed) for seed in args.seeds for label in CONFIGS]
    with ThreadPoolExecutor(args.jobs) as pool:
        done = list(pool.map(lambda j: run_one(j[0], j[1], args.out, extra, args.threads), jobs))
    runs = {label: [d for (lab, _), d in zip(jobs, done, strict=True) if lab == label] for label in CONFIGS}
    rows = summarize(runs, extra)
    (args.doc / "parity" / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    plot(runs, args.doc / "parity" / "curves.png")
    write_doc(rows, args, extra, args.doc / "PARITY.md", commit)
    print((args.doc / "PARITY.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
