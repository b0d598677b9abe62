"""Fine-tune a Hugging Face causal language model made reversible by ``revnet.convert``.

    python examples/finetune_hf.py [--data /usr/include] [--model DIR] [--steps 200] [--gamma auto]
                                   [--out runs/finetune_hf]

A plain PyTorch loop over byte windows of a folder of text files (default: the C headers at the
top of /usr/include, or the Python standard library's source where there are none). The model is
``--model`` (a folder ``save_pretrained`` wrote, e.g. a GPT-2 you trained) or, without it, a small
GPT-2 built from a config over bytes (random weights; nothing is downloaded). ``revnet.convert``
makes its blocks reversible; the loss is computed on the last hidden states by
``revnet.models.lm_loss.linear_cross_entropy``, so the (B, T, vocab) logits are never held either.
It prints the activation memory of a step before and after conversion, the loss as it trains, a
sample from ``model.generate()``, and checks that the checkpoint ``save_pretrained`` writes loads
back with ``from_pretrained`` (then converted again) to the same outputs.
"""

from __future__ import annotations

import argparse
import math
import sysconfig
import warnings
from pathlib import Path

import torch
import transformers

import revnet
from revnet.memory.measure import saved_bytes
from revnet.models.lm_loss import linear_cross_entropy


def read_bytes(folder: Path) -> torch.Tensor:
    """Every file at the top of ``folder``, as one stream of bytes."""
    files = sorted(p for p in folder.iterdir() if p.is_file())
    data = b"\n".join(p.read_bytes() for p in files)
    if len(data) < 2048:
        raise SystemExit(f"{folder}: needs at least 2 KiB of text in its top-level files, found "
                         f"{len(data)} bytes.")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def windows(stream: torch.Tensor, batch: int, context: int, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    start = torch.randint(0, len(stream) - context - 1, (batch,), generator=g)
    chunk = torch.stack([stream[s: s + context + 1] for s in start.tolist()])
    return chunk[:, :-1], chunk[:, 1:]


def loss_of(model: transformers.PreTrainedModel, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Next-byte cross-entropy from the last hidden states, without the logits ever held at once."""
    hidden = model.base_model(input_ids=x, use_cache=False).last_hidden_state
    return linear_cross_entropy(hidden, model.get_output_embeddings().weight, y)


class Step(torch.nn.Module):
    """A training step's forward, for measuring what autograd keeps."""

    def __init__(self, model: torch.nn.Module, y: torch.Tensor) -> None:
        super().__init__()
        self.model, self.y = model, y

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return loss_of(self.model, x, self.y)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("/usr/include"))
    parser.add_argument("--model", type=Path,
                        help="a save_pretrained folder (default: a small GPT-2 from a config)")
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--gamma", type=lambda v: v if v == "auto" else float(v), default="auto",
                        help="revnet.convert's gamma: auto (from the depth) or a number in (0, 1)")
    parser.add_argument("--out", type=Path, default=Path("runs/finetune_hf"))
    args = parser.parse_args()
    torch.manual_seed(0)
    transformers.logging.set_verbosity_error()

    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model)
    else:
        config = transformers.GPT2Config(vocab_size=256, n_positions=args.context, n_embd=args.width,
                                         n_layer=args.layers, n_head=max(1, args.width // 32),
                                         bos_token_id=0, eos_token_id=0)
        model = transformers.GPT2LMHeadModel(config)
    if not args.data.is_dir():  # a machine without C headers: the Python standard library's source
        print(f"{args.data} not found; fine-tuning on {sysconfig.get_paths()['stdlib']} instead")
        args.data = Path(sysconfig.get_paths()["stdlib"])
    stream = read_bytes(args.data)
    g = torch.Generator().manual_seed(0)
    x, y = windows(stream, args.batch, args.context, g)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = saved_bytes(Step(model, y), x, lambda loss: loss)
        revnet.convert(model, gamma=args.gamma, example={"input_ids": x[:2]})
        after = saved_bytes(Step(model, y), x, lambda loss: loss)
    print(model.revnet_conversion)
    print(f"activation memory of a step: {before / 2**20:.1f} MiB before conversion, "
          f"{after / 2**20:.1f} MiB after ({before / after:.1f}x less)")

    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / args.steps)))
    model.train()
    for step in range(args.steps):
        x, y = windows(stream, args.batch, args.context, g)
        loss = loss_of(model, x, y)
        loss.backward()  # reversible: each block's input is rebuilt from its output
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.4f}  ({loss.item() / math.log(2):.3f} bits per byte)")

    model.eval()
    prompt = torch.tensor([list(b"#include <")])
    room = model.config.max_position_embeddings - prompt.shape[1]
    sample = model.generate(prompt, max_new_tokens=min(40, room), do_sample=False, pad_token_id=0)
    print("sample:", bytes(sample[0].tolist()).decode("utf-8", "replace").replace("\n", "\\n"))

    model.save_pretrained(args.out)  # the original checkpoint layout, with config.revnet_conversion
    loaded = transformers.AutoModelForCausalLM.from_pretrained(args.out)
    revnet.convert(loaded)  # with the gamma the config recorded
    loaded.eval()
    with torch.no_grad():
        same = torch.allclose(loaded(input_ids=x).logits, model(input_ids=x).logits, atol=1e-5)
    print(f"saved to {args.out}; reloaded and converted again: same outputs: {same}")
    if not same:
        raise SystemExit("the reloaded model differs from the fine-tuned one")


if __name__ == "__main__":
    main()
