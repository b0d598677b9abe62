"""Fidelity study: gradient angle during a Fashion-MNIST run, and exact mode's accuracy.

Runs `revnet train` one run at a time (the default recipe: RevNet-38, Fashion-MNIST, bf16
autocast, 1.75 epochs):

1. `--grad-angle-every 50 --drift-guard-every 50` (seed 0, float mode) into OUT/grad-angle;
2. `--exact --drift-guard-every 100` for each seed into OUT/exact-seedN;

then writes docs/fidelity/training.json (angle and drift rows, accuracies, speeds, the
float reference of docs/parity/results.json) and docs/fidelity/grad_angle.png:

    .venv/bin/python studies/fidelity_study.py --seeds 0 1 2 --out runs --doc-dir docs/fidelity

Extra arguments after `--` go to every `revnet train` (e.g. `-- --steps 20` for a smoke
test). Runs already finished are reused, so an interrupted study continues.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from revnet.training import read_metrics

ANGLE_ARGS = ["--grad-angle-every", "50", "--drift-guard-every", "50"]
EXACT_ARGS = ["--exact", "--drift-guard-every", "100"]  # the guard logs stream size and rebuild error


def run(args: list[str], run_dir: Path, threads: int, extra: list[str]) -> Path:
    """`revnet train ARGS --out RUN_DIR`, unless it already finished; resumes a broken one."""
    done = run_dir / "summary.json"
    if done.is_file() and not json.loads(done.read_text())["interrupted"]:
        return run_dir
    cmd = [sys.executable, "-m", "revnet", "train", *args, *extra, "--out", str(run_dir),
           "--no-memory-report", *([] if any(a.startswith("--nproc") for a in extra) else ["--nproc", "1"])]
    if (run_dir / "last.pt").is_file():
        cmd.append("--resume")
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(run_dir.parent / f"{run_dir.name}.log", "w") as log:
        subprocess.run(cmd, check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
    return run_dir


def _summary(run_dir: Path) -> dict:
    s = json.loads((run_dir / "summary.json").read_text())
    return {"run": str(run_dir), "seed": s["config"]["seed"], "test_accuracy": s["test_accuracy"],
            "best_test_accuracy": s["best_test_accuracy"], "wall_seconds": s["wall_seconds"],
            "images_per_s": s["images_per_s"], "exact": s["config"].get("exact", False),
            "model": s["model"], "dataset": s["dataset"], "amp": s["config"]["amp"]}


def summarize(angle_dir: Path | None, exact_dirs: list[Path], parity: Path) -> dict:
    out: dict = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__}
    if angle_dir is not None:
        rows = read_metrics(angle_dir)
        angles = [r for r in rows if "grad_angle_deg" in r]
        whole = [r["grad_angle_deg"] for r in angles if r["grad_angle_deg"] is not None]
        names = angles[0]["grad_angle_by_stage"] if angles else {}
        stages = {k: [v for r in angles if (v := r["grad_angle_by_stage"].get(k)) is not None] for k in names}
        drift = [r for r in rows if isinstance(r.get("drift"), dict)]
        out["grad_angle"] = {
            **_summary(angle_dir), "every": 50, "angles": angles, "drift": drift,
            "drift_events": [r for r in rows if r.get("event") == "drift"],
            "angle_deg": {"first": whole[0], "last": whole[-1], "median": statistics.median(whole),
                          "min": min(whole), "max": max(whole)} if whole else None,
            "angle_deg_by_stage_median": {k: statistics.median(v) for k, v in stages.items() if v},
            "drift_rel_error_max": max((v for r in drift for v in r["drift"].values()), default=None),
            "stream_input_max": max((v for r in drift for v in r.get("drift_input_max", {}).values()),
                                    default=None),
        }
    if exact_dirs:
        runs = []
        for d in exact_dirs:
            drift = [r for r in read_metrics(d) if isinstance(r.get("drift"), dict)]
            runs.append({**_summary(d),
                         "drift_rel_error_max": max((v for r in drift for v in r["drift"].values()),
                                                    default=None),
                         "stream_input_max": max((v for r in drift for v in r["drift_input_max"].values()),
                                                 default=None)})
        acc = [r["test_accuracy"] for r in runs]
        out["exact"] = {"runs": runs, "mean": statistics.mean(acc),
                        "std": statistics.stdev(acc) if len(acc) > 1 else 0.0}
    if parity.is_file():
        ref = json.loads(parity.read_text())["RevNet-38 (reversible)"]
        out["float_reference"] = {"source": str(parity), "seeds": ref["seeds"], "mean": ref["mean"],
                                  "test_accuracy": ref["test_accuracy"], "std": ref["std"]}
    return out


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    g = result["grad_angle"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2), dpi=120)
    ax = axes[0]
    steps = [r["step"] for r in g["angles"]]
    ax.plot(steps, [r["grad_angle_deg"] for r in g["angles"]], "k.-", lw=2, label="whole model")
    for stage in g["angles"][0]["grad_angle_by_stage"]:
        ax.plot(steps, [r["grad_angle_by_stage"][stage] for r in g["angles"]], ".-", lw=1, label=stage)
    ax.set(title="angle between reversible and plain-autograd gradients", xlabel="training step",
           ylabel="degrees")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax = axes[1]
    for seq in g["drift"][0]["drift"] if g["drift"] else []:
        ax.plot([r["step"] for r in g["drift"]], [r["drift"][seq] for r in g["drift"]], ".-", label=seq)
    ax.set(title="rebuild error of each sequence's input (drift guard)", xlabel="training step",
           ylabel="max |x' - x| / max |x|", yscale="log")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.suptitle(f"{g['model']} on {g['dataset']}, amp {g['amp']}, seed {g['seed']}: "
                 f"test accuracy {100 * g['test_accuracy']:.2f}%", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_results(result: dict, doc_dir: Path) -> dict:
    """Writes ``summarize``'s ``result`` as DOC_DIR/training.json and, when it holds the
    grad-angle run, its plot as DOC_DIR/grad_angle.png; returns the result without the
    per-step rows (what the study prints)."""
    doc_dir.mkdir(parents=True, exist_ok=True)
    (doc_dir / "training.json").write_text(json.dumps(result, indent=1) + "\n")
    if "grad_angle" in result:
        plot(result, doc_dir / "grad_angle.png")
    brief = {k: v for k, v in result.items() if k != "grad_angle"}
    if "grad_angle" in result:
        brief["grad_angle"] = {k: v for k, v in result["grad_angle"].items() if k not in ("angles", "drift")}
    return brief


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="*", default=[0, 1, 2], help="seeds of the --exact runs")
    p.add_argument("--no-angle", dest="angle", action="store_false", help="skip the grad-angle run")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", type=Path, default=Path("runs"))
    p.add_argument("--doc-dir", type=Path, default=Path("docs/fidelity"))
    p.add_argument("--parity", type=Path, default=Path("docs/parity/results.json"),
                   help="float-mode reference (studies/parity_study.py)")
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    args = p.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    angle_dir = None
    if args.angle:
        angle_dir = run([*ANGLE_ARGS, "--seed", "0"], args.out / "grad-angle", args.threads, extra)
    exact_dirs = [run([*EXACT_ARGS, "--seed", str(s)], args.out / f"exact-seed{s}", args.threads, extra)
                  for s in args.seeds]
    result = summarize(angle_dir, exact_dirs, args.parity)
    result["command"] = "python studies/fidelity_study.py " + " ".join(sys.argv[1:])
    print(json.dumps(write_results(result, args.doc_dir), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
