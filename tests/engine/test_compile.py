"""torch.compile and revnet.compile: the same gradients as eager, no recompilation once warm.

The default run traces with dynamo and AOTAutograd (backend ``aot_eager``: the graphs,
guards and graph breaks inductor gets, without its minutes of code generation) on small
networks built with the zoo's own builders, the code paths of every zoo model (stem,
stage openers, sequences, head). Inductor itself, on every zoo model: ``-m slow``.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn
from torch._dynamo.utils import counters

import revnet
from revnet.engine.compiler import compiled_modules
from revnet.models import ResNet, RevNet, model_accepts

IMAGE_MODELS = [n for n in revnet.list_models() if not model_accepts(n, "vocab_size")]  # not the LMs


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test starts with nothing compiled and zero counts (the inductor cache on disk stays)."""
    torch._dynamo.reset()
    counters.clear()


BACKEND = "aot_eager"


def small(kind: str, block: str = "basic") -> nn.Module:
    cls = RevNet if kind == "revnet" else ResNet
    return cls((1, 2, 2), (8, 8, 16, 16), block=block, in_chans=1).double()


def grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def batch(n: int, size: int = 8):
    return torch.randn(n, 1, size, size, dtype=torch.float64), torch.randint(0, 10, (n,))


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def check_against_eager(compiled: nn.Module, eager: nn.Module, sizes=(8, 8, 4)) -> None:
    """Training steps at several batch sizes, then eval: the same numbers as the eager twin."""
    for n in sizes:
        x, y = batch(n)
        assert rel_err(grads(compiled, x, y), grads(eager, x, y)) < 1e-10
    for a, b in zip(compiled.buffers(), eager.buffers(), strict=True):  # BatchNorm statistics
        assert torch.allclose(a, b, rtol=0, atol=1e-12)
    compiled.eval(), eager.eval()
    with torch.no_grad():
        x, _ = batch(4)
        assert torch.allclose(compiled(x), eager(x), rtol=0, atol=1e-12)
    compiled.train(), eager.train()


@pytest.mark.parametrize("reversible", [True, False], ids=["reversible", "plain"])
@pytest.mark.parametrize("kind", ["revnet", "resnet"])
def test_torch_compile_of_a_whole_model_gives_eager_numbers(kind, reversible):
    eager = small(kind)
    revnet.set_reversible(eager, reversible)
    compiled = torch.compile(copy.deepcopy(eager), backend=BACKEND)
    check_against_eager(compiled, eager)
    if not reversible:  # plain mode traces as one graph: no graph break (at F or G, say), so no
        assert not counters["graph_break"]  # frame shared by stages goes dynamic (which inductor failed)
    elif kind == "revnet":  # reversible: the engine is one opaque call per sequence and per opener
        breaks = "".join(counters["graph_break"])
        assert "_run_reversible" in breaks and "apply_recomputed" in breaks
        assert all("torch.compiler.disable" in reason for reason in counters["graph_break"])


def test_revnet_compile_compiles_inside_the_engine_and_keeps_the_rules():
    eager = small("revnet")
    model = revnet.compile(copy.deepcopy(eager), backend=BACKEND)
    names = compiled_modules(model)
    assert "stem" in names and "head" in names  # parts without engine units: whole
    assert "stages.1.0" in names  # a stage opener (Recomputed)
    assert {"stages.1.1.couplings.0.f", "stages.1.1.couplings.0.g"} <= set(names)  # F and G
    assert not any(n.startswith("stages.1.1") and n.count(".") < 4 for n in names)  # not the engine
    assert list(model.state_dict()) == list(eager.state_dict())  # checkpoints load either way

    check_against_eager(model, eager)  # reversible: forward without grad, recomputation in backward
    before = graphs()
    for _ in range(2):  # once warm, no step compiles anything
        x, y = batch(8)
        assert rel_err(grads(model, x, y), grads(eager, x, y)) < 1e-10
    assert graphs() == before

    for m in (model, eager):
        revnet.set_reversible(m, False)
    check_against_eager(model, eager, sizes=(8,))  # plain autograd through the same compiled F and G
    for m in (model, eager):
        revnet.set_reversible(m, True)
        revnet.set_exact(m, True)
    x, y = batch(8)
    assert torch.equal(grads(model, x, y), grads(eager, x, y))  # exact mode: bit for bit

    # Weights saved from the compiled model load into an eager one, and the other way round.
    fresh = small("revnet")
    fresh.load_state_dict(model.state_dict())
    model.load_state_dict(eager.state_dict())


def test_revnet_compile_under_autocast_and_channels_last():
    model = revnet.compile(small("revnet").float().to(memory_format=torch.channels_last), backend=BACKEND)
    x = torch.randn(8, 1, 8, 8).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (8,))
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(x).float(), y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    before = graphs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        F.cross_entropy(model(x).float(), y).backward()
    assert graphs() == before


def test_revnet_compile_replays_dropout_in_the_recomputation():
    """The recomputation draws the forward's dropout masks: reversible == plain, compiled."""

    def branch():
        return nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.Tanh(), nn.Dropout(0.5))

    seq = revnet.ReversibleSequence([revnet.AdditiveCoupling(branch(), branch()) for _ in range(3)]).double()
    revnet.compile(seq, backend=BACKEND)
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64, requires_grad=True)
    out = {}
    for reversible in (True, False):
        seq.reversible = reversible
        torch.manual_seed(3)
        (g,) = torch.autograd.grad((seq(x) * torch.linspace(-1, 1, x.numel()).view_as(x)).sum(), x)
        out[reversible] = g
    assert rel_err(out[True], out[False]) < 1e-10


@pytest.mark.slow
@pytest.mark.parametrize("name", IMAGE_MODELS)
def test_inductor_compiles_every_zoo_model(name):
    """Default torch.compile (inductor) of the whole model in both modes, and revnet.compile."""
    size = 32 if name in ("revnet104", "resnet101") else 16
    eager = revnet.create_model(name, in_chans=1, dtype=torch.float64)
    for reversible in (True, False):
        revnet.set_reversible(eager, reversible)
        for compiled in (torch.compile(copy.deepcopy(eager)), revnet.compile(copy.deepcopy(eager))):
            torch._dynamo.reset()
            for n in (4, 2):
                x = torch.randn(n, 1, size, size, dtype=torch.float64)
                y = torch.randint(0, 10, (n,))
                assert rel_err(grads(compiled, x, y), grads(eager, x, y)) < 1e-10
            compiled.eval(), eager.eval()
            with torch.no_grad():
                assert torch.allclose(compiled(x), eager(x), rtol=0, atol=1e-10)
            compiled.train(), eager.train()
