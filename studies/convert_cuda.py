"""CUDA peak memory and step time of a GPT-2-shaped model before and after ``revnet.convert``.

A Hugging Face ``GPT2LMHeadModel`` from a config (768 wide, 12 heads, 50257 tokens, context
1024) where ``transformers`` is installed, else the zoo's ``gpt_*`` at the same shapes; float32
weights, bf16 autocast, loss on the last hidden states without the logits
(``linear_cross_entropy``). Per depth: ``torch.cuda.max_memory_allocated`` over one training step
above what was allocated before it (weights and, from a first step, their gradients), and the
median step time over a few steps, plain and converted (gamma 0.9).

    python studies/convert_cuda.py [--depths 4 24 48] [--batch 8] [--out result.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import warnings

import torch
from torch import nn

import revnet
from revnet.models.lm_loss import linear_cross_entropy


def build(depth: int, context: int) -> tuple[nn.Module, str]:
    try:
        import transformers
    except ImportError:
        model = revnet.create_model("gpt_mini", vocab_size=50257, context_length=context, embed_dim=768,
                                    depth=depth, num_heads=12)
        return model, "revnet gpt (zoo)"
    config = transformers.GPT2Config(n_embd=768, n_head=12, n_layer=depth, vocab_size=50257,
                                     n_positions=context, attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.GPT2LMHeadModel(config)
    return model, f"transformers {transformers.__version__} GPT2LMHeadModel"


def loss_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    if hasattr(model, "transformer") and hasattr(model, "lm_head"):  # Hugging Face
        hidden = model.transformer(input_ids=ids, use_cache=False).last_hidden_state
        weight = model.lm_head.weight
    else:
        return model(ids[:, :-1], targets=ids[:, 1:])
    return linear_cross_entropy(hidden[:, :-1], weight, ids[:, 1:])


def step(model: nn.Module, ids: torch.Tensor) -> None:
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = loss_of(model, ids)
    loss.backward()


def measure(model: nn.Module, ids: torch.Tensor, repeats: int) -> dict:
    step(model, ids)  # the gradients exist from here on
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step(model, ids)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        t = time.perf_counter()
        step(model, ids)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
    return {"peak_mib": round(peak / 2**20, 1), "step_s": statistics.median(times)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 24, 48])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--context", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out")
    args = parser.parse_args()
    rows, kind = [], ""
    ids = torch.randint(0, 50257, (args.batch, args.context), device="cuda")
    for depth in args.depths:
        torch.manual_seed(0)
        plain, kind = build(depth, args.context)
        plain.cuda().train()
        converted = revnet.convert(copy.deepcopy(plain), gamma=0.9)
        row = {"depth": depth, "batch": args.batch, "context": args.context}
        for name, model in (("plain", plain), ("converted", converted)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                m = measure(model, ids, args.repeats)
            row.update({f"{name}_{k}": v for k, v in m.items()})
            model.zero_grad(set_to_none=True)
        row["peak_ratio"] = round(row["plain_peak_mib"] / row["converted_peak_mib"], 2)
        row["time_ratio"] = round(row["converted_step_s"] / row["plain_step_s"], 3)
        print(json.dumps(row), flush=True)
        rows.append(row)
        del plain, converted
        torch.cuda.empty_cache()
    result = {"model": kind, "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "command": " ".join(sys.argv),
              "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
