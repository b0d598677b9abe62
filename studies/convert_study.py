"""Fine-tuning a converted model against fine-tuning the original: the evidence of docs/CONVERT.md.

Two transfers on data that ships with the machine, each pretrained here first (no hub):

- vision: the zoo's residual ``vit_mini`` pretrained on Fashion-MNIST classes 0-4, then fine-tuned
  (a new 5-way head) on classes 5-9, test accuracy on the test images of classes 5-9;
- text: a Hugging Face GPT-2 built from a config (4 blocks of 128, 4 heads, bytes, context 128)
  pretrained on the Python standard library's source, then fine-tuned on the C headers at the top
  of /usr/include (every 10th file held out), bits per byte on the held-out headers.

Each fine-tuning runs for each seed in two arms on the same pretrained weights: ``plain``, the
model as it is (full fine-tuning under autograd), and ``converted``, after
``revnet.convert(model, gamma=...)`` (reversible backward). Recorded per run: the metric right after
conversion and every ``--eval-every`` steps, the activation memory of a training step (saved
tensors, ``revnet.memory.measure.saved_bytes``), and the wall time. The report gives the final
metric (mean and spread over seeds), the converted arm's difference, the steps it took to reach the
plain arm's final mean, and the memory ratio; ``--doc`` writes it into docs/CONVERT.md between its
``convert-study`` markers, with docs/convert/results.json and docs/convert/curves.png.

    python studies/convert_study.py --seeds 0 1 2 --gamma 0.9 0.5 0.25 --out runs/convert --doc docs
    python studies/convert_study.py --tasks text --method two-stream --gamma 0.5 --exact --out runs/convert

A pretrained model and every finished run are kept under ``--out`` and reused, so an interrupted
study continues. bf16 autocast when the CPU has it fast (``--amp``).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import revnet
from revnet.bench.environment import environment
from revnet.memory.measure import saved_bytes
from revnet.models.lm_loss import linear_cross_entropy
from revnet.training.datasets import load_dataset
from revnet.training.loader import normalize
from revnet.training.text import eval_windows, load_text, train_windows

TASKS = ("vision", "text")
ARMS = ("plain", "converted")
MARK = ("<!-- convert-study:start -->", "<!-- convert-study:end -->")


# --------------------------------------------------------------------------------------
# Tasks: data, model, loss, metric
# --------------------------------------------------------------------------------------

class Vision:
    """vit_mini, Fashion-MNIST classes 0-4 -> 5-9."""

    name, metric, higher = "vision", "test accuracy", True
    batch, pretrain_lr, finetune_lr, weight_decay = 128, 2e-3, 1e-3, 0.05

    def __init__(self) -> None:
        train, test = load_dataset("fashion-mnist", "train"), load_dataset("fashion-mnist", "test")
        self.mean, self.std = train.mean, train.std

        def part(ds, first: bool) -> tuple[torch.Tensor, torch.Tensor]:
            keep = ds.labels < 5 if first else ds.labels >= 5
            return ds.images[keep], ds.labels[keep] - (0 if first else 5)

        self.pre = part(train, True)
        self.fine = part(train, False)
        self.test = part(test, False)

    def model(self) -> nn.Module:
        return revnet.create_model("vit_mini", num_classes=5, in_chans=1)

    def new_head(self, model: nn.Module, seed: int) -> None:
        torch.manual_seed(seed)
        old = model.head
        model.head = nn.Linear(old.in_features, old.out_features)

    def batches(self, which: str, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.pre if which == "pre" else self.fine
        g = torch.Generator().manual_seed(seed)
        while True:
            for idx in torch.randperm(len(labels), generator=g).split(self.batch):
                if len(idx) < self.batch:
                    continue
                x = normalize(images[idx], self.mean, self.std)
                flip = torch.rand(len(idx), generator=g) < 0.5
                x[flip] = x[flip].flip(-1)
                yield x, labels[idx]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(model(x).float(), y, label_smoothing=0.1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        images, labels = self.test
        model.eval()
        correct = 0
        for i in range(0, len(labels), 1000):
            x = normalize(images[i:i + 1000], self.mean, self.std)
            correct += int((model(x).argmax(-1) == labels[i:i + 1000]).sum())
        model.train()
        return correct / len(labels)


class _LM(nn.Module):
    """A Hugging Face causal LM's training loss without its logits held at once."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        hidden = self.model.transformer(input_ids=x, use_cache=False).last_hidden_state
        if y is None:
            return self.model.lm_head(hidden)
        return linear_cross_entropy(hidden, self.model.lm_head.weight, y)


class Text:
    """A GPT-2 from a config, the stdlib's source -> the C headers of /usr/include."""

    name, metric, higher = "text", "test bits per byte", False
    batch, context, pretrain_lr, finetune_lr, weight_decay = 32, 128, 3e-3, 1e-3, 0.1
    eval_windows = 256  # of the held-out headers (32 KiB): the same bytes for every run

    def __init__(self, headers: str = "/usr/include") -> None:
        self.pre, _ = load_text()
        self.fine, held = load_text(headers)
        self.test = eval_windows(held, self.context)[: self.eval_windows]

    def model(self) -> nn.Module:
        import transformers

        config = transformers.GPT2Config(n_embd=128, n_layer=4, n_head=4, vocab_size=256, n_positions=128,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0,
                                         eos_token_id=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return _LM(transformers.GPT2LMHeadModel(config))

    def new_head(self, model: nn.Module, seed: int) -> None:
        pass  # the same bytes: the head (tied to the embedding) carries over

    def batches(self, which: str, seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        streams = self.pre if which == "pre" else self.fine
        step = 0
        while True:
            yield train_windows(streams, self.batch, self.context, seed=seed, epoch=0, step=step)
            step += 1

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return model(x, y)

    @torch.no_grad()
    def evaluate(self, model: nn.Module) -> float:
        model.eval()
        total = count = 0.0
        for x, y in self.test:
            total += float(F.cross_entropy(model(x).float().flatten(0, 1), y.flatten(), reduction="sum"))
            count += y.numel()
        model.train()
        return total / count / math.log(2)


# --------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------

def train(task, model: nn.Module, batches: Iterator, steps: int, lr: float, amp: torch.dtype | None,
          evaluate: Callable[[], float] | None = None, eval_every: int = 0) -> list[tuple[int, float]]:
    """AdamW with linear warmup (10%) and cosine decay; the metric every ``eval_every`` steps."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": task.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=lr)
    warm = max(1, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / warm if s < warm
        else 0.5 * (1 + math.cos(math.pi * (s - warm) / (steps - warm))))
    curve = [(0, evaluate())] if evaluate is not None else []
    model.train()
    for step in range(1, steps + 1):
        x, y = next(batches)
        with torch.autocast("cpu", dtype=amp, enabled=amp is not None):
            loss = task.loss(model, x, y)
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if evaluate is not None and eval_every and (step % eval_every == 0 or step == steps):
            curve.append((step, evaluate()))
            print(f"    step {step}: {curve[-1][1]:.4f}", flush=True)
    return curve


def pretrained(task, out: Path, steps: int, amp: torch.dtype | None) -> nn.Module:
    path = out / f"{task.name}-pretrained.pt"
    model = task.model()
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
        return model
    print(f"pretraining {task.name} ({steps} steps)", flush=True)
    torch.manual_seed(1234)
    start = time.perf_counter()
    train(task, model, task.batches("pre", 1234), steps, task.pretrain_lr, amp)
    print(f"  {time.perf_counter() - start:.0f} s", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def finetune(task, base: nn.Module, arm: str, seed: int, steps: int, eval_every: int, gamma: float | None,
             amp: torch.dtype | None, method: str = "momentum", exact: bool = False) -> dict:
    model = copy.deepcopy(base)
    task.new_head(model, seed)
    if arm == "converted":
        revnet.convert(model, method=method, gamma=gamma, exact=exact)
    batches = task.batches("fine", seed)
    x, y = next(task.batches("fine", seed))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        memory = saved_bytes(model, x, lambda loss: loss, autocast=amp,
                             forward_kwargs={"y": y}) if task.name == "text" else \
            saved_bytes(model, x, lambda out: F.cross_entropy(out.float(), y), autocast=amp)
    torch.manual_seed(seed)
    start = time.perf_counter()
    curve = train(task, model, batches, steps, task.finetune_lr, amp, lambda: task.evaluate(model),
                  eval_every)
    converted = {"method": method, "exact": exact} if arm == "converted" else {}
    return {"task": task.name, "arm": arm, "seed": seed, "gamma": gamma, **converted,
            "steps": steps, "curve": curve, "final": curve[-1][1], "start": curve[0][1],
            "saved_mib": round(memory / 2**20, 2), "seconds": round(time.perf_counter() - start, 1)}


# --------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------

def variant(run: dict) -> tuple[str, bool, float] | None:
    """A converted run's (method, exact, gamma); None for a plain run (older runs: momentum, float)."""
    if run["arm"] != "converted":
        return None
    return run.get("method", "momentum"), bool(run.get("exact", False)), run["gamma"]


def label(v: tuple[str, bool, float] | None) -> str:
    if v is None:
        return "plain fine-tuning"
    method, exact, gamma = v
    return f"converted, {method}{' exact' if exact else ''}, gamma {gamma:g}"


def summarize(runs: list[dict]) -> list[dict]:
    """One row per (task, arm, method, exact, gamma): final metric mean/spread, start, memory, steps to
    the plain final."""
    rows = []
    for task in TASKS:
        plain = [r for r in runs if r["task"] == task and r["arm"] == "plain"]
        if not plain:
            continue
        higher = task == "vision"
        target = statistics.mean(r["final"] for r in plain)
        variants = sorted({variant(r) for r in runs if r["task"] == task and r["arm"] == "converted"})
        for v in [None, *variants]:
            got = [r for r in runs if r["task"] == task and variant(r) == v]
            finals = [r["final"] for r in got]

            def reached(r: dict, target: float = target, higher: bool = higher) -> int | None:
                return next((s for s, v in r["curve"] if (v >= target if higher else v <= target)), None)

            steps = [reached(r) for r in got]
            mean = statistics.mean(finals)
            rows.append({
                "task": task, "arm": "plain" if v is None else "converted", "seeds": len(got),
                "final_mean": mean,
                "final_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
                "start_mean": statistics.mean(r["start"] for r in got),
                "vs_plain": (mean - target) * 100 if higher else (mean - target) / target * 100,
                "steps_to_plain_final": None if None in steps else statistics.mean(steps),
                "saved_mib": statistics.mean(r["saved_mib"] for r in got),
                "seconds": statistics.mean(r["seconds"] for r in got),
                "gamma": None if v is None else v[2], "method": None if v is None else v[0],
                "exact": None if v is None else v[1], "label": label(v)})
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| Transfer | Arm | Seeds | At step 0 | Final | vs plain | Steps to plain's final "
             "| Activation memory of a step |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        vision = r["task"] == "vision"
        fmt = (lambda v: f"{100 * v:.2f}%") if vision else (lambda v: f"{v:.4f}")
        arm = r["label"]
        diff = "" if r["arm"] == "plain" else (
            f"{r['vs_plain']:+.2f} points" if vision else f"{r['vs_plain']:+.2f}%")
        steps = "" if r["arm"] == "plain" else (
            "not reached" if r["steps_to_plain_final"] is None else f"{r['steps_to_plain_final']:.0f}")
        what = "Fashion-MNIST 0-4 -> 5-9, vit_mini, accuracy" if vision else \
            "stdlib -> /usr/include, GPT-2 config, bits per byte"
        lines.append(f"| {what} | {arm} | {r['seeds']} | {fmt(r['start_mean'])} | {fmt(r['final_mean'])} "
                     f"± {fmt(r['final_std'])} | {diff} | {steps} | {r['saved_mib']:.1f} MiB |")
    return "\n".join(lines)


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    variants = sorted({variant(r) for r in runs if r["arm"] == "converted"})
    for ax, task in zip(axes, TASKS, strict=True):
        labelled = set()
        for r in (r for r in runs if r["task"] == task):
            key = label(variant(r))
            color = "C0" if r["arm"] == "plain" else f"C{(1 + variants.index(variant(r))) % 10}"
            steps, values = zip(*r["curve"], strict=True)
            ax.plot(steps, values, color=color, alpha=0.8, label=None if key in labelled else key)
            labelled.add(key)
        ax.set_title({"vision": "vit_mini: Fashion-MNIST 0-4 -> 5-9",
                      "text": "GPT-2 config: stdlib -> C headers"}[task])
        ax.set_xlabel("fine-tuning step")
        ax.set_ylabel({"vision": "test accuracy", "text": "test bits per byte"}[task])
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write_doc(doc: Path, runs: list[dict], meta: dict) -> None:
    folder = doc / "convert"
    folder.mkdir(parents=True, exist_ok=True)
    rows = summarize(runs)
    results = {"meta": meta, "summary": rows, "runs": runs}
    (folder / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    if len({r["task"] for r in runs}) == len(TASKS):
        plot(runs, folder / "curves.png")
    section = (f"{MARK[0]}\n{table(rows)}\n\nMeasured by `{meta['command']}` on {meta['cpu']} "
               f"({meta['date']}); every run in docs/convert/results.json.\n{MARK[1]}")
    page = doc / "CONVERT.md"
    text = (page.read_text() if page.exists()
            else f"# Converting models: the evidence\n\n{MARK[0]}\n{MARK[1]}\n")
    head, _, rest = text.partition(MARK[0])
    _, _, tail = rest.partition(MARK[1])
    page.write_text(head + section + tail)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", nargs="+", choices=TASKS, default=list(TASKS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--gamma", type=float, nargs="+", default=[0.9],
                        help="the converted arm's gamma; several: one converted arm each")
    parser.add_argument("--method", nargs="+", choices=["momentum", "two-stream"], default=["momentum"],
                        help="the conversion method; several: one converted arm each")
    parser.add_argument("--exact", action="store_true", help="the converted arms in exact mode")
    parser.add_argument("--pretrain-steps", type=int, nargs=2, default=[800, 800],
                        metavar=("VISION", "TEXT"))
    parser.add_argument("--finetune-steps", type=int, nargs=2, default=[400, 400],
                        metavar=("VISION", "TEXT"))
    parser.add_argument("--eval-every", type=int, default=50)
    parser.add_argument("--amp", choices=["bf16", "none"], default="bf16")
    parser.add_argument("--out", type=Path, default=Path("runs/convert"))
    parser.add_argument("--doc", type=Path,
                        help="write docs/CONVERT.md's table, results.json and the plot here")
    parser.add_argument("--doc-only", action="store_true",
                        help="train nothing: report every finished run under --out (all gammas)")
    args = parser.parse_args(argv)
    amp = torch.bfloat16 if args.amp == "bf16" else None
    runs = []
    if args.doc_only:
        runs = [json.loads(p.read_text()) for p in sorted(args.out.glob("*-s*-n*.json"))]
        runs = [r for r in runs if r["task"] in args.tasks]
    for name in [] if args.doc_only else args.tasks:
        task = Vision() if name == "vision" else Text()
        i = TASKS.index(name)
        base = pretrained(task, args.out, args.pretrain_steps[i], amp)
        for seed in args.seeds:
            arms = [("plain", None, "momentum"),
                    *(("converted", g, m) for m in args.method for g in args.gamma)]
            for arm, gamma, method in arms:
                n = args.finetune_steps[i]
                # a float momentum run keeps the tag of the runs before methods were an option
                kind = "" if (method, args.exact) == ("momentum", False) else \
                    f"{method}{'-exact' if args.exact else ''}-"
                tag = (f"{name}-{arm}-{kind}g{gamma:g}-s{seed}-n{n}" if arm == "converted"
                       else f"{name}-{arm}-s{seed}-n{n}")
                path = args.out / f"{tag}.json"
                if path.exists():
                    runs.append(json.loads(path.read_text()))
                    continue
                print(f"{tag}", flush=True)
                run = finetune(task, base, arm, seed, n, args.eval_every, gamma, amp, method, args.exact)
                path.write_text(json.dumps(run) + "\n")
                runs.append(run)
    for row in summarize(runs):
        print(json.dumps(row))
    if args.doc:
        env = environment()
        meta = {"command": " ".join(["python", "studies/convert_study.py", *(argv or sys.argv[1:])]),
                "cpu": env.get("cpu", "?"), "date": time.strftime("%Y-%m-%d"), "environment": env}
        write_doc(args.doc, runs, meta)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
