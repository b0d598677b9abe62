"""The memory-budget planner: an exact solver, plans that fit their budget, clear errors."""

import copy
import itertools
import os
import random
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import rel_err
from torch import nn

import revnet
from revnet.memory.planner import _Item, _predicted_peak, _solve


def test_solver_is_exact_against_brute_force():
    """Over random chains: the dynamic program finds the best set whose predicted peak (each
    moment's all-rebuild peak plus the bytes stored before it, and what a stored unit after a
    rebuilt one keeps besides) fits, as trying every set does."""
    rng = random.Random(0)
    for _ in range(60):
        items = [_Item(f"u{i}", b := rng.randint(1, 50), rng.randint(0, b), rng.randint(0, 60),
                       rng.randint(0, 60), rng.random(), rng.choice([0, rng.randint(1, 20)]))
                 for i in range(rng.randint(1, 8))]
        limit = rng.randint(0, 200)
        subsets = [set(s) for r in range(len(items) + 1)
                   for s in itertools.combinations([it.name for it in items], r)]
        value = {it.name: it.seconds for it in items}
        fits = [s for s in subsets if _predicted_peak(items, s) <= limit]
        chosen = _solve(items, limit)
        if not fits:  # not even the all-rebuild step fits: nothing to store
            assert chosen == set()
            continue
        best = max(sum(map(value.get, s)) for s in fits)
        assert _predicted_peak(items, chosen) <= limit or chosen == set()
        # Bytes are rounded up to buckets, so the optimum may give up a sliver; here buckets are 1 byte.
        assert sum(map(value.get, chosen)) == pytest.approx(best)


def test_units_stored_where_the_step_is_below_its_peak_cost_no_memory():
    """The last stage's units are stored after the peak has passed (the first stage's backward):
    a chain-aware prediction stores them at no cost, where counting every stored byte on top of
    the peak would store nothing."""
    items = [_Item("first", 40, 20, 50, 100, 1.0), _Item("last", 30, 10, 60, 70, 1.0)]
    assert _predicted_peak(items, {"last"}) == 100 and _solve(items, 100) == {"last"}
    # "first" stored: its own backward holds its graph (100 + 20 over the rebuild's transient), and
    # "last"'s forward runs with it kept (60 + 40).
    assert _predicted_peak(items, {"first"}) == 120 and _solve(items, 119) == {"last"}
    assert _predicted_peak(items, {"first", "last"}) == 130 and _solve(items, 130) == {"first", "last"}


@pytest.fixture(scope="module")
def planned():
    """RevNet-38 at batch 64: the all-rebuild minimum, and plans at three budgets."""
    torch.manual_seed(0)
    model = revnet.create_model("revnet38")
    x = torch.randn(64, 3, 16, 16)
    low = revnet.plan(model, x, budget=10 * 2**30)  # everything fits: all stored
    mid = revnet.plan(model, x, budget=(low.minimum + low.all_stored) // 2)
    # At the minimum itself: each call measures it again, from the allocator's events, to the byte
    # (below it: an error, tested below).
    floor = revnet.plan(model, x, budget=low.minimum)
    return model, x, low, mid, floor


def test_at_the_minimum_the_units_stored_after_the_peak_come_free(planned):
    """The all-rebuild step peaks in the first stage's backward; the last stage's couplings,
    stored, are gone by then: the plan at the minimum stores them, and its step fits it."""
    model, x, low, _, floor = planned
    assert floor.budget == low.minimum and floor.measured_peak <= low.minimum
    assert floor.stored and all(n.startswith("stages.2.") for n in floor.stored)
    assert floor.predicted_step_s < floor.rebuild_step_s
    by_name = revnet.plan(model, x, budget="min")  # the same, without knowing the minimum first
    assert by_name.budget == by_name.minimum and by_name.measured_peak <= by_name.minimum
    assert by_name.stored == floor.stored


def test_plans_fit_their_budgets_and_span_the_range(planned):
    model, _, everything, mid, floor = planned
    assert len(everything.units) == 9 - 2 + 2  # 7 couplings and 2 stage openers
    assert all(u.stored for u in everything.units) and everything.measured_peak <= everything.budget
    assert mid.measured_peak <= mid.budget and 0 < len(mid.stored) < len(mid.units)
    assert floor.measured_peak <= floor.budget
    assert all(u.bytes > 0 and u.seconds > 0 for u in everything.units)
    assert mid.predicted_step_s < mid.rebuild_step_s  # storing saves the stored units' forwards
    # The model is left as it was: everything reversible, nothing stored.
    assert revnet.RevNet.reversible.fget(model) and not any(
        c.stored for c in model.modules() if isinstance(c, revnet.Coupling))
    text = str(mid)
    assert "memory plan: budget" in text and "stages.1.0" in text


def test_a_budget_just_above_the_measured_all_stored_peak_stores_every_unit(planned):
    """The prediction (minimum + each unit's bytes) runs above the measured all-stored peak, so the
    first solve at such a budget leaves a unit out; the plan then grows into the room its checked
    step left, and stores everything, within the budget."""
    model, x, everything, _, _ = planned
    budget = int(everything.measured_peak * 1.05)
    assert budget < everything.all_stored  # the prediction alone would not store everything
    p = revnet.plan(model, x, budget=budget)
    assert len(p.stored) == len(p.units) and p.measured_peak <= budget


def test_applied_plan_sets_the_switches_and_trains_as_plain_autograd(planned):
    model, x, _, mid, _ = planned
    net = mid.apply(copy.deepcopy(model)).double()
    stored = {n for n, m in net.named_modules()
              if (isinstance(m, revnet.Coupling) and m.stored) or (isinstance(m, revnet.Recomputed)
                                                                   and not m.reversible)}
    assert stored == set(mid.stored)
    ref = copy.deepcopy(net)
    revnet.set_reversible(ref, False)
    y = torch.randint(0, 10, (8,))
    for m in (net, ref):
        F.cross_entropy(m(x[:8].double()), y).backward()
    for p, q in zip(net.parameters(), ref.parameters(), strict=True):
        assert rel_err(p.grad, q.grad) < 1e-10


def test_budget_below_the_minimum_names_it_and_a_batch_that_fits(planned):
    model, x, low, _, _ = planned
    with pytest.raises(ValueError, match=r"below the smallest peak .* at batch 64\. Fix: a budget of at least"
                                         r".*batch of at most about \d+"):
        revnet.plan(model, x, budget=low.minimum // 4)
    with pytest.raises(ValueError, match="cannot read"):
        revnet.plan(model, x, budget="lots")


def test_nothing_to_plan_without_reversible_parts():
    with pytest.raises(ValueError, match="nothing to plan"):
        revnet.plan(nn.Sequential(nn.Linear(4, 4)), torch.randn(2, 4), budget="1GiB")


def test_planning_again_and_again_holds_no_memory():
    """Regression: the attribution pass once kept each profiled graph alive (a saved-tensor
    reference cycle), about one all-stored step per call, until RevNet-164 ran out of memory."""
    from revnet.engine.modes import units as plan_units
    from revnet.memory.measure import freed_memory_returned, proc_status
    from revnet.memory.planner import _bytes_per_unit

    with freed_memory_returned():
        model = revnet.create_model("revnet38")
        x = torch.randn(64, 3, 16, 16)
        units = plan_units(model)
        per_call = sum(b for b, *_ in _bytes_per_unit(model, x, units).values())
        before = proc_status("VmRSS")
        for _ in range(3):
            _bytes_per_unit(model, x, units)
        assert proc_status("VmRSS") - before < per_call


def test_planning_leaves_glibcs_thresholds_alone(monkeypatch):
    """Regression: measuring on CPU set glibc's mmap threshold to 64 KiB for good, so after
    planning every large tensor was mapped and faulted in anew (a RevNet-110 step 1.5x slower).
    The planner reads the allocator's events now and leaves malloc's settings as they are."""
    import revnet.memory.measure as peak

    calls = []

    class Libc:
        def mallopt(self, *args):
            calls.append(("mallopt", args))

        def malloc_trim(self, *args):
            calls.append(("malloc_trim", args))

    monkeypatch.setattr(peak, "_libc", Libc)
    p = revnet.plan(revnet.create_model("revnet38"), torch.randn(8, 3, 8, 8), budget="1GiB")
    assert p.measured_peak > 0 and calls == []


def test_a_coupling_stored_after_a_rebuilt_one_keeps_the_chains_output_too():
    """Regression: the chain before a stored coupling keeps its output (the stored block's input)
    for the rebuild to restart from; its graph holds one half of that, the prediction missed the
    other, and a plan at the minimum measured 2 MiB over (RevNet-110)."""
    items = [_Item("a", 10, 0, 50, 50, 0.5), _Item("b", 10, 0, 50, 50, 1.0, entry=4),
             _Item("c", 10, 0, 50, 50, 1.0, entry=4)]
    assert _predicted_peak(items, {"b"}) == 64 and _predicted_peak(items, {"a", "b"}) == 70
    assert _predicted_peak(items, {"b", "c"}) == 74 and _predicted_peak(items, {"a", "c"}) == 74
    assert _solve(items, 63) == {"a"} and _solve(items, 64) in ({"b"}, {"c"})
    assert _solve(items, 70) == {"a", "b"} and _solve(items, 74) == {"b", "c"}

    model = revnet.create_model("revnet38")
    p = revnet.plan(model, torch.randn(16, 3, 16, 16), budget="1GiB")
    from revnet.engine.modes import units as plan_units
    from revnet.memory.planner import _bytes_per_unit

    got = _bytes_per_unit(model, torch.randn(16, 3, 16, 16), plan_units(model))
    # A first-stage coupling's F takes half of 32 channels at 16x16 (float32); openers take none.
    assert got["stages.0.0.couplings.1"][2] == 16 * 16 * 16 * 16 * 4 and got["stages.1.0"][2] == 0
    assert p.measured_peak <= p.budget


def test_the_all_rebuild_step_is_split_at_each_units_forward_and_backward():
    from revnet.engine.modes import units as plan_units
    from revnet.memory.planner import _windows

    torch.manual_seed(0)
    model = revnet.create_model("revnet38")
    x = torch.randn(16, 3, 16, 16)
    units = plan_units(model)
    peak, w = _windows(units, lambda: model(x).square().mean().backward(), torch.device("cpu"))
    assert list(w) == [n for n, _, _ in units] and max(max(v) for v in w.values()) == peak
    # The first stage's backward is where the step peaks; the last stage's is lower.
    first, last = units[0][0], units[-1][0]
    assert w[first][1] == peak > w[last][1]
    # Work that does not run the units as a chain: every window is given the whole peak.
    peak, w = _windows(units, lambda: torch.ones(1 << 20), torch.device("cpu"))
    assert peak >= 4 << 20 and all(v == (peak, peak) for v in w.values())


def test_attributing_bytes_holds_one_branch_not_the_whole_graph():
    """Regression: the pass that attributes stored bytes to units kept every unit's graph, as
    large as plain autograd's, which a model planned for a smaller budget cannot afford."""
    from revnet.engine.modes import units as plan_units
    from revnet.memory.measure import allocated_peak_of
    from revnet.memory.planner import _bytes_per_unit

    model = revnet.create_model("revnet38")
    x = torch.randn(64, 3, 16, 16)
    units = plan_units(model)
    got = {}
    peak = allocated_peak_of(lambda: got.update(_bytes_per_unit(model, x, units)))
    total, largest = sum(b for b, *_ in got.values()), max(b for b, *_ in got.values())
    assert all(b >= branch > 0 for b, branch, _ in got.values())
    assert peak < 2 * largest < total


@pytest.mark.skipif(not sys.platform.startswith("linux") or "MALLOC_MMAP_THRESHOLD_" in os.environ,
                    reason="glibc's malloc thresholds, changed at run time")
def test_a_fragmented_heap_does_not_hide_the_peak():
    """Regression: in a process whose heap held many freed blocks, the measured peaks came out
    as 0 (steps reused retained memory without growing the resident set), so every unit seemed
    free to store. Now the planner reads the allocator's events, not the resident set: the
    all-rebuild peak is at least what its graph provably keeps, the bytes saved for backward."""
    from revnet.bench.contenders import SavedBytes

    gen = torch.Generator().manual_seed(0)
    kept = [torch.ones(int(n)) for n in torch.randint(1, 2_000_000, (400,), generator=gen)][::20]
    torch.manual_seed(0)
    model = revnet.create_model("revnet38")
    x = torch.randn(32, 3, 16, 16)
    p = revnet.plan(model, x, budget="1GiB")
    with SavedBytes(model) as saved:
        out = model(x)
    assert kept and p.minimum >= saved.total > 0
    del out
