"""Activation memory of a Hugging Face GPT-2-shaped model before and after ``revnet.convert``.

Builds ``transformers.GPT2LMHeadModel`` from a config (GPT-2 small's width: 768, 12 heads, 50257
tokens, context 1024; random weights, nothing downloaded) at several depths, and measures one
training step's activation memory, unconverted and converted (momentum, gamma 0.9), two ways:

- saved: the bytes autograd keeps for backward in one forward (``revnet.memory.measure.saved_bytes``;
  exact and repeatable, no backward run);
- peak (``--peak``): the CPU allocator's peak over a whole step, forward and backward, above what
  was allocated before it: the weights and their gradients (from a first step, as in training;
  ``revnet.memory.measure.peak_of``), so activations, workspaces and the gradients in flight.

and two losses: ``fused``, the cross-entropy on the last hidden states without the logits ever held
(``revnet.models.lm_loss.linear_cross_entropy``, what examples/finetune_hf.py trains with), and
``hf``, the model's own ``labels=`` loss, which keeps the float32 logits (B, T, 50257) and their
softmax: the same in both models, so it caps the ratio.

    python studies/convert_memory.py [--depths 4 12 24 48] [--batch 2] [--peak 4 24 48] \
        [--out docs/benchmarks/convert_memory.json] [--doc docs/CONVERT.md]

``--doc`` writes the table into docs/CONVERT.md between its ``convert-memory`` markers;
``--table-from JSON`` writes it from a finished measurement without measuring again.

``--methods`` measures instead the saved bytes of each conversion method, in float and exact mode
(exact mode keeps a one-byte remainder per element of each scaled half until backward), at the
same depths, and writes them between the ``convert-methods`` markers:

    python studies/convert_memory.py --methods --batch 2 --depths 4 24 48 \
        --out docs/benchmarks/convert_methods.json --doc docs/CONVERT.md
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import sys
import warnings
from pathlib import Path

import torch
from torch import nn

import revnet
from revnet.bench.environment import environment
from revnet.memory.measure import peak_of, saved_bytes
from revnet.models.lm_loss import linear_cross_entropy

MiB = 2**20


class Step(nn.Module):
    """One language-model training step's forward: token ids -> loss."""

    def __init__(self, model: nn.Module, loss: str) -> None:
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.loss == "hf":
            return self.model(input_ids=ids, labels=ids, use_cache=False).loss
        hidden = self.model.transformer(input_ids=ids, use_cache=False).last_hidden_state
        return linear_cross_entropy(hidden[:, :-1], self.model.lm_head.weight, ids[:, 1:])


def build(depth: int, context: int) -> nn.Module:
    import transformers

    config = transformers.GPT2Config(n_embd=768, n_head=12, n_layer=depth, vocab_size=50257,
                                     n_positions=context, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return transformers.GPT2LMHeadModel(config).train()


def measure(depths: list[int], batch: int, context: int, peak_depths: list[int], gamma: float) -> list[dict]:
    rows = []
    ids = torch.randint(0, 50257, (batch, context), generator=torch.Generator().manual_seed(0))
    for depth in depths:
        plain = build(depth, context)
        converted = revnet.convert(copy.deepcopy(plain), gamma=gamma)
        for loss in ("fused", "hf"):
            row = {"depth": depth, "batch": batch, "context": context, "loss": loss}
            for name, model in (("plain", plain), ("converted", converted)):
                step = Step(model, loss)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    row[f"{name}_saved_mib"] = round(saved_bytes(step, ids, loss_fn=lambda out: out) / MiB, 1)
                    if depth in peak_depths:
                        def work(step: nn.Module = step) -> None:
                            step(ids).backward()  # into the gradients the first step made

                        work()  # the gradients exist from here on, as in training: not counted
                        row[f"{name}_peak_mib"] = round(peak_of(work, ids.device) / MiB, 1)
                        step.zero_grad(set_to_none=True)
                gc.collect()
            row["saved_ratio"] = round(row["plain_saved_mib"] / row["converted_saved_mib"], 2)
            if "plain_peak_mib" in row:
                row["peak_ratio"] = round(row["plain_peak_mib"] / row["converted_peak_mib"], 2)
            print(json.dumps(row), flush=True)
            rows.append(row)
        del plain, converted
        gc.collect()
    return rows


VARIANTS = (("momentum", False), ("momentum", True), ("two-stream", False), ("two-stream", True))


def measure_methods(depths: list[int], batch: int, context: int, gamma: float) -> list[dict]:
    """Saved bytes of a training step (fused loss) per conversion method and mode, at each depth."""
    rows = []
    ids = torch.randint(0, 50257, (batch, context), generator=torch.Generator().manual_seed(0))
    for depth in depths:
        plain = build(depth, context)
        for method, exact in VARIANTS:
            model = revnet.convert(copy.deepcopy(plain), method=method, gamma=gamma, exact=exact)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                mib = saved_bytes(Step(model, "fused"), ids, loss_fn=lambda out: out) / MiB
            row = {"depth": depth, "batch": batch, "context": context, "method": method, "exact": exact,
                   "couplings": len(revnet.conversion.converted_stacks(model)[0][1].sequence),
                   "saved_mib": round(mib, 1)}
            print(json.dumps(row), flush=True)
            rows.append(row)
            del model
            gc.collect()
        del plain
        gc.collect()
    return rows


def methods_table(result: dict) -> str:
    rows = result["rows"]
    depths = sorted({r["depth"] for r in rows})
    cell = {(r["depth"], r["method"], r["exact"]): r for r in rows}
    lines = ["| blocks | " + " | ".join(f"{m}{', exact' if e else ''}" for m, e in VARIANTS) + " |",
             "|---|" + "---|" * len(VARIANTS)]
    for d in depths:
        cells = [f"{cell[d, m, e]['saved_mib']:.1f} MiB ({cell[d, m, e]['couplings']} couplings)"
                 if (d, m, e) in cell else "-" for m, e in VARIANTS]
        lines.append(f"| {d} | " + " | ".join(cells) + " |")
    env = result["environment"]
    lines.append("")
    lines.append(f"Measured by `{result['command']}` on {env.get('cpu', '?')} ({env.get('date', '?')}, "
                 f"commit {env.get('git_commit', '?')}); the numbers in "
                 f"docs/benchmarks/convert_methods.json.")
    return "\n".join(lines)


MARK = ("<!-- convert-memory:start -->", "<!-- convert-memory:end -->")
METHODS_MARK = ("<!-- convert-methods:start -->", "<!-- convert-methods:end -->")


def table(result: dict) -> str:
    rows = result["rows"]
    fused = {r["depth"]: r for r in rows if r["loss"] == "fused"}
    hf = {r["depth"]: r for r in rows if r["loss"] == "hf"}
    lines = ["| blocks | saved: plain | saved: converted | less | peak: plain | peak: converted | less "
             "| saved with HF's `labels=` loss: plain / converted |",
             "|---|---|---|---|---|---|---|---|"]
    for depth in sorted(fused):
        r = fused[depth]
        peak = (f"{r['plain_peak_mib']:.1f} MiB | {r['converted_peak_mib']:.1f} MiB | {r['peak_ratio']:.1f}x"
                if "plain_peak_mib" in r else "- | - | -")
        h = hf.get(depth)
        other = f"{h['plain_saved_mib']:.1f} / {h['converted_saved_mib']:.1f} MiB ({h['saved_ratio']:.1f}x)" \
            if h else "-"
        lines.append(f"| {depth} | {r['plain_saved_mib']:.1f} MiB | {r['converted_saved_mib']:.1f} MiB | "
                     f"{r['saved_ratio']:.0f}x | {peak} | {other} |")
    env = result["environment"]
    lines.append("")
    lines.append(f"Measured by `{result['command']}` on {env.get('cpu', '?')} ({env.get('date', '?')}, "
                 f"commit {env.get('git_commit', '?')}); the numbers in docs/benchmarks/convert_memory.json.")
    return "\n".join(lines)


def write_doc(doc: Path, result: dict) -> None:
    methods = result.get("kind") == "methods"
    mark = METHODS_MARK if methods else MARK
    text = doc.read_text()
    head, found, rest = text.partition(mark[0])
    if not found:
        raise SystemExit(f"{doc} has no {mark[0]} marker")
    _, _, tail = rest.partition(mark[1])
    doc.write_text(f"{head}{mark[0]}\n{methods_table(result) if methods else table(result)}\n{mark[1]}{tail}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 12, 24, 48])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--peak", type=int, nargs="*", default=[24],
                        help="depths whose step peak is measured too")
    parser.add_argument("--gamma", type=float, default=0.9)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--doc", type=Path, help="write the table into this page (docs/CONVERT.md)")
    parser.add_argument("--table-from", type=Path, help="a finished measurement's JSON: write its table only")
    parser.add_argument("--methods", action="store_true",
                        help="saved bytes of each method, float and exact (its own table)")
    args = parser.parse_args(argv)
    if args.table_from:
        write_doc(args.doc or Path("docs/CONVERT.md"), json.loads(args.table_from.read_text()))
        return 0
    torch.set_grad_enabled(True)
    if args.methods:
        rows = measure_methods(args.depths, args.batch, args.context, args.gamma)
    else:
        rows = measure(args.depths, args.batch, args.context, args.peak, args.gamma)
    result = {"environment": environment(), "command": " ".join(["python", *sys.argv]), "gamma": args.gamma,
              "kind": "methods" if args.methods else "step", "rows": rows}
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.doc:
        write_doc(args.doc, result)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
