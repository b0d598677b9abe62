"""The README's example runs as written, and its commands exist."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def run_example(heading: str) -> dict:
    """Runs the first python block under ``heading``; returns its variables."""
    section = README.read_text().split(heading, 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    return scope


def test_wrap_your_own_modules_example_runs():
    scope = run_example("## Wrap your own modules")
    x, seq = scope["x"], scope["seq"]
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.no_grad():
        assert (scope["x_again"] - x).abs().max() < 1e-4
    assert not seq.reversible


def test_reversible_transformer_example_runs():
    scope = run_example("## Reversible transformers")
    tokens, out, blocks, memory = scope["tokens"], scope["out"], scope["blocks"], scope["memory"]
    assert out.shape == (4, 128, 512) and tokens.grad is not None and torch.isfinite(tokens.grad).all()
    assert memory.grad is not None and torch.isfinite(memory.grad).all() and memory.grad.abs().sum() > 0
    assert not blocks.reversible


def test_readme_commands_are_make_targets():
    makefile = (README.parent / "Makefile").read_text()
    for target in ("train", "test"):
        assert f"make {target}" in README.read_text()
        assert re.search(rf"^{target}:", makefile, re.M)
