"""Training-step time of revnet's RevNet-38 against MemCNN 1.5.2's, alternated in one process.

MemCNN (van de Leemput et al. 2019) is the reversible-network library most people reach for;
its RevNet-38 is built here from its own experiment configuration (``resnet32`` base with
``revnet38``'s layers, widths and ``RevBasicBlock``). Both train one step (forward,
cross-entropy, backward) on the same random batch; runs alternate, the order rotated every
repeat; ratios of medians are the figures to read. MemCNN is not a dependency of revnet:

    .venv/bin/pip install --no-deps memcnn==1.5.2     # it imports only torch and numpy
    .venv/bin/python studies/memcnn_compare.py --out docs/benchmarks/memcnn

Runs: ``memcnn`` (its RevNet-38, reversible), ``revnet`` (ours, eager, reversible) and
``revnet+compile`` (ours under ``revnet.compile``, inductor; compile time reported apart).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import revnet
from revnet.bench.contenders import time_stats
from revnet.bench.environment import environment


def memcnn_revnet38() -> nn.Module:
    """MemCNN's RevNet-38 as its experiments.json builds it (CIFAR-10)."""
    from memcnn import InvertibleModuleWrapper
    from memcnn.models.resnet import ResNet, RevBasicBlock

    model = ResNet(RevBasicBlock, layers=[3, 3, 3], num_classes=10, channels_per_layer=[32, 32, 64, 112],
                   strides=[1, 1, 2, 2], init_max_pool=False, init_kernel_size=3, batch_norm_fix=False)
    # MemCNN frees a reversible block's input (storage().resize_(0)) and restores it in backward with
    # Tensor.set_(), which bumps the version counter. The first block's input is the stem ReLU's
    # output, which ReLU's backward checks: under torch 2.13 the step fails ("modified by an inplace
    # operation"). That one block keeps its input; all others free theirs as MemCNN intends.
    next(m for m in model.modules() if isinstance(m, InvertibleModuleWrapper)).keep_input = True
    return model


def summarize(times: dict[str, list[float]], first: dict[str, float], batch: int) -> dict:
    """Per run its time statistics (``time_stats``); each of ours against MemCNN as a ratio of
    medians and as the median of the per-repeat ratios; the compile time of ``revnet+compile``
    (its first step less its median step). ``times``: per run, one step's seconds per repeat
    (the repeats alternate the runs); ``first``: per run, its first step's seconds."""
    stats = {name: time_stats(v, batch) for name, v in times.items()}
    ratios = {f"{a}/memcnn": stats[a]["median_s"] / stats["memcnn"]["median_s"]
              for a in ("revnet", "revnet+compile")}
    pairs = {k: statistics.median(a / b for a, b in zip(times[k.split("/")[0]], times["memcnn"], strict=True))
             for k in ratios}
    return {"train": stats, "ratios": ratios, "median_of_per_repeat_ratios": pairs,
            "compile_s": {"revnet+compile": first["revnet+compile"] - stats["revnet+compile"]["median_s"]}}


def write_results(result: dict, out: Path) -> Path:
    """Writes ``result`` as OUT/memcnn.json, prints its table and returns the file's path."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "memcnn.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'run':<15} {'params':>8} {'median ms':>10} {'img/s':>7}")
    for name, s in result["train"].items():
        print(f"{name:<15} {result['params'][name] / 1e6:>7.3f}M {s['median_s'] * 1e3:>10.0f} "
              f"{s['images_per_s']:>7.0f}")
    print("  ".join(f"{k} = {v:.3f}" for k, v in result["ratios"].items()),
          f"(compile took {result['compile_s']['revnet+compile']:.0f} s beyond a step)")
    print(f"wrote {path}")
    return path


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="every model and the batch channels_last")
    p.add_argument("--backend", default="inductor", help="torch.compile backend of revnet+compile")
    p.add_argument("--out", type=Path, default=Path("runs/memcnn"))
    args = p.parse_args()
    try:
        import memcnn
    except ImportError:
        raise SystemExit("memcnn_compare: MemCNN is not installed; "
                         "`pip install --no-deps memcnn==1.5.2`.") from None
    torch.manual_seed(0)
    fmt = torch.channels_last if args.channels_last else torch.contiguous_format
    ours = revnet.create_model("revnet38").to(memory_format=fmt)
    runs = {"memcnn": memcnn_revnet38().to(memory_format=fmt), "revnet": ours,
            "revnet+compile": revnet.compile(revnet.create_model("revnet38"), backend=args.backend)}
    runs["revnet+compile"].load_state_dict(ours.state_dict())
    runs["revnet+compile"].to(memory_format=fmt)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (args.batch,))

    def step(model: nn.Module) -> float:
        model.zero_grad(set_to_none=True)
        t = time.perf_counter()
        F.cross_entropy(model(x), y).backward()
        return time.perf_counter() - t

    first = {name: [step(m) for _ in range(max(args.warmup, 2 if "compile" in name else 1))][0]
             for name, m in runs.items()}
    times: dict[str, list[float]] = {name: [] for name in runs}
    names = list(runs)
    for r in range(args.repeats):
        for name in names[r % len(names):] + names[:r % len(names)]:
            times[name].append(step(runs[name]))
    result = {
        "config": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "memcnn": memcnn.__version__, "threads": torch.get_num_threads()},
        "params": {name: sum(q.numel() for q in m.parameters()) for name, m in runs.items()},
        **summarize(times, first, args.batch),
        "environment": environment(),
    }
    write_results(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
