"""The benchmarks on tiny configurations: result shapes, the memory trends, the CLI."""

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import rel_err

import revnet
from revnet import ReversibleSequence, cli
from revnet.bench import budget, capacity, contenders, environment, memory, speed
from revnet.bench.data import loader_throughput
from revnet.bench.report import render_report
from revnet.memory import sizes
from revnet.training.datasets import load_dataset
from revnet.training.loader import Loader

TINY = {"image_size": 32, "batch": 4}  # 32px keeps the main tensors above the 64 KiB mmap threshold


def test_parse_bytes():
    assert sizes.parse_bytes("2GiB") == 2 * 2**30
    assert sizes.parse_bytes("512MiB") == 512 * 2**20
    assert sizes.parse_bytes(" 1.5 GB ") == 1_500_000_000
    assert sizes.parse_bytes("4096") == 4096
    for bad in ["", "lots", "2 parsecs", "-1GiB", "0", "GiB"]:
        with pytest.raises(ValueError, match="size"):
            sizes.parse_bytes(bad)


def test_depth_matches_the_paper_names():
    assert contenders.depth_of("resnet", 5) == 32 and contenders.depth_of("revnet", 3) == 38
    assert contenders.depth_of("resnet", 18) == contenders.depth_of("revnet", 9) == 110
    depth = contenders.depth_of
    assert depth("resnet", 18, "bottleneck") == depth("revnet", 9, "bottleneck") == 164
    with pytest.raises(ValueError, match="not a RevNet"):
        contenders.build("revnet", model="resnet32")
    with pytest.raises(ValueError, match="unknown kind"):
        contenders.build("densenet", 3)


def test_the_three_revnet_modes_give_the_same_gradients_on_the_same_weights():
    net = contenders.build("revnet", 2, dtype=torch.float64)
    x, y = contenders.make_batch(net, 4, 8)
    grads = {}
    for kind in ("revnet-plain", "revnet", "revnet-checkpoint"):
        net.zero_grad(set_to_none=True)
        with contenders.run_mode(net, kind):
            contenders.train_step(net, x, y)
        grads[kind] = [p.grad.clone() for p in net.parameters()]
    # run_mode puts everything back as it was.
    assert sum(isinstance(m, ReversibleSequence) for m in net.modules()) == 3
    assert all(m.reversible for m in net.modules() if isinstance(m, ReversibleSequence))
    for kind in ("revnet", "revnet-checkpoint"):
        for a, b in zip(grads[kind], grads["revnet-plain"], strict=True):
            assert rel_err(a, b) < 1e-8


def test_saved_bytes_resnet_grows_revnet_flat():
    def saved(kind, units):
        return memory.memory_point(kind, units, batch=2, image_size=8)["saved_bytes"]

    assert saved("resnet", 8) > 3 * saved("resnet", 2)
    assert saved("revnet", 4) == saved("revnet", 2)  # only the sequences' outputs and the openings
    assert saved("revnet-plain", 4) > 1.5 * saved("revnet-plain", 2)
    assert saved("revnet", 4) < saved("revnet-checkpoint", 4) < saved("revnet-plain", 4)
    kept = memory.memory_point("resnet", 2, batch=2, image_size=8, grads="kept")
    assert kept["grads"] == "kept" and kept["grad_bytes"] == 4 * kept["params"]
    with pytest.raises(ValueError, match="grads must be"):
        memory.memory_point("resnet", 2, batch=2, image_size=8, grads="some")


def test_memory_point_measures_the_step_in_the_runs_precision():
    # Under bf16 autocast the convolutions save bf16 inputs: plain autograd keeps fewer bytes
    # (0.65x at this size; at a tiny batch the weights' bf16 copies, also saved, would dominate).
    f32 = memory.memory_point("revnet-plain", 2, batch=8, image_size=32)
    bf16 = memory.memory_point("revnet-plain", 2, batch=8, image_size=32, amp="bf16")
    assert bf16["amp"] == "bf16" and f32["amp"] == "none"
    assert bf16["saved_bytes"] < 0.75 * f32["saved_bytes"]
    with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16"):
        memory.memory_point("revnet", 2, batch=2, image_size=8, amp="float16")


@pytest.fixture(scope="module")
def cli_sweep(tmp_path_factory):
    """`revnet bench memory` on four points, each in a fresh process (about two seconds each)."""
    out = tmp_path_factory.mktemp("bench")
    argv = ["bench", "memory", "--units", "1", "4", "--kinds", "resnet", "revnet", "--models",
            "--batch", str(TINY["batch"]), "--image-size", str(TINY["image_size"]), "--out", str(out)]
    assert cli.main(argv) == 0
    return out


@pytest.fixture(scope="module")
def sweep(cli_sweep):
    return json.loads((cli_sweep / "memory.json").read_text())


def test_memory_sweep_shape_and_trends(sweep):
    assert sweep["config"]["units"] == [1, 4] and sweep["config"]["models"] == []
    pts = {(p["kind"], p["units"]): p for p in sweep["points"]}
    assert set(pts) == {("resnet", 2), ("revnet", 1), ("resnet", 8), ("revnet", 4)}
    for p in sweep["points"]:
        assert p["method"] == "VmHWM-VmRSS" and p["malloc_mmap_threshold"] == "65536"
        assert p["activation_bytes"] > 0 and p["total_bytes"] > p["peak_bytes"] >= p["activation_bytes"]
        # The peak holds at least what autograd saved (cross-check), within page rounding.
        assert p["peak_bytes"] > 0.8 * p["saved_bytes"]
    assert pts["resnet", 2]["depth"] == pts["revnet", 1]["depth"] == 14
    res = pts["resnet", 8]["activation_bytes"] - pts["resnet", 2]["activation_bytes"]
    rev = pts["revnet", 4]["activation_bytes"] - pts["revnet", 1]["activation_bytes"]
    assert res > 2 * pts["resnet", 2]["activation_bytes"]  # ResNet: linear in depth
    assert rev < 0.25 * res  # RevNet: (nearly) flat
    json.dumps(sweep)  # plain data


def test_speed_dict_has_times_and_ratios():
    r = speed.speed("revnet38", batch=2, image_size=8, repeats=2, warmup=1, inference_repeats=2)
    assert set(r["train"]) == {"revnet", "revnet-plain", "revnet-checkpoint", "resnet32", "floor"}
    for s in [*r["train"].values(), *r["inference"].values()]:
        assert len(s["times_s"]) == 2 and 0 < s["min_s"] <= s["median_s"] and s["images_per_s"] > 0
    assert set(r["ratios"]) == {"revnet/revnet-plain", "revnet/revnet-checkpoint", "revnet/resnet32",
                                "inference revnet/revnet-plain", "revnet/floor", "floor/revnet-plain"}
    # the rebuild floor: plain autograd's step plus the rebuilt units' forward, timed in the same rounds
    per = [rv / (p + u) for rv, p, u in zip(*(r["train"][k]["times_s"] for k in ("revnet", "revnet-plain",
                                                                                  "floor")), strict=True)]
    assert r["ratios"]["revnet/floor"] == pytest.approx(sorted(per)[0] / 2 + sorted(per)[1] / 2)
    assert r["ratios"]["floor/revnet-plain"] > 1 and r["config"]["floor"] == ["revnet", "revnet-plain"]
    assert all(v > 0 for v in r["ratios"].values())
    assert r["config"]["batch"] == 2 and r["config"]["threads"] >= 1
    json.dumps(r)


def test_speed_and_memory_of_compiled_copies():
    """revnet.compile'd rows beside the eager ones; compile time apart (aot_eager: no codegen)."""
    r = speed.speed("revnet38", kinds=("revnet", "revnet-plain"), reference=None, batch=2, image_size=8,
                    repeats=2, warmup=0, inference_repeats=0, compile="aot_eager")
    assert set(r["train"]) == {"revnet", "revnet-plain", "revnet+compile", "revnet-plain+compile", "floor",
                               "floor+compile"}
    assert set(r["compile_s"]) == {"revnet+compile", "revnet-plain+compile"}
    assert all(s > 0 for s in r["compile_s"].values())  # the first step traced the graphs
    assert "revnet+compile/revnet-plain" in r["ratios"]  # compiled reversible vs eager plain backprop
    assert {"floor", "floor+compile"} <= r["train"].keys() and "revnet+compile/floor+compile" in r["ratios"]
    point = memory.memory_point("revnet", 2, batch=4, image_size=32, compile="aot_eager")
    eager = memory.memory_point("revnet", 2, batch=4, image_size=32)
    assert point["compile"] == "aot_eager" and point["saved_bytes"] == eager["saved_bytes"]
    with pytest.raises(ValueError, match="compile is for"):
        memory.memory_point("revnet-checkpoint", 1, batch=2, image_size=8, compile="aot_eager")


def test_units_forward_seconds_times_the_rebuilt_units_eager_and_compiled():
    """The floor's second term: the forward of every coupling's F and G and every recomputed unit,
    without a graph, timed around each call (compiled or not); the modules are left as they were."""
    net = revnet.create_model("revnet38")
    x = torch.randn(2, 3, 8, 8)
    stats = [b.clone() for b in net.buffers()]
    spent = speed.units_forward_seconds(net, x)
    assert all(torch.equal(a, b) for a, b in zip(stats, net.buffers(), strict=True))  # BatchNorm untouched
    t = time.perf_counter()
    with torch.no_grad():
        net(x)
    assert 0 < spent < 10 * (time.perf_counter() - t)
    assert all(m._compiled_call_impl is None for m in net.modules())
    revnet.compile(net, backend="eager")
    compiled = {n for n, m in net.named_modules() if m._compiled_call_impl is not None}
    assert speed.units_forward_seconds(net, x) > 0
    assert {n for n, m in net.named_modules() if m._compiled_call_impl is not None} == compiled


def test_speed_against_a_git_revision():
    try:
        engine = speed.load_engine("HEAD")
    except RuntimeError:
        pytest.skip("not a git checkout")
    assert engine.ReversibleSequence is not revnet.ReversibleSequence  # its own copy, beside ours
    # The engine before the redesign (planner inside engine/, one Function taking the whole input):
    old = speed.load_engine("835c3a3")
    net = revnet.create_model("revnet38")
    with speed._engine(old, net):
        assert type(net.stages[0][0]) is old.ReversibleSequence
    assert type(net.stages[0][0]) is revnet.ReversibleSequence  # lent for the step only
    r = speed.speed("revnet38", kinds=("revnet",), reference=None, against="835c3a3", batch=2, image_size=8,
                    repeats=1, warmup=0, inference_repeats=0)
    assert set(r["train"]) == {"revnet", "revnet@835c3a3"} and "revnet/revnet@835c3a3" in r["ratios"]
    with pytest.raises(RuntimeError, match="git revision"):
        speed.load_engine("no-such-revision-xyz")


def test_largest_under_brackets_an_affine_memory():
    calls = []

    def probe(v):
        calls.append(v)
        return 1000 + 37 * v

    r = capacity._largest_under(5000, probe, 8, 32, verify_max=10_000)
    assert r["largest"] == r["predicted"] == (5000 - 1000) // 37 and r["verified"]
    assert 1000 + 37 * r["smallest_over"] > 5000
    capped = capacity._largest_under(5000, probe, 8, 32, verify_max=50)
    assert capped["largest"] == 50 and capped["predicted"] == 108 and not capped["verified"]
    assert capacity._largest_under(500, probe, 8, 32, verify_max=100)["largest"] is None


def test_capacity_finds_a_batch_under_a_tiny_budget():
    budget = sizes.parse_bytes("12MiB")
    r = capacity.capacity(budget, models=("revnet38",), kinds=(), image_size=16, verify_max_batch=256)
    got = r["batch"]["revnet38"]
    assert got["largest"] and 8 <= got["largest"] < 256
    fits = [p for p in got["probes"] if p["value"] == got["largest"]]
    assert fits[0]["total_bytes"] <= budget and got["kind"] == "revnet"  # as the model is
    assert r["config"]["budget_bytes"] == budget and r["depth"] == {}


def test_measure_reports_worker_failure():
    with pytest.raises(RuntimeError, match="memory worker"):
        memory.measure(kind="resnet", model="no-such-model", batch=2, image_size=8)


def test_cli_memory_writes_json_and_png(cli_sweep, sweep):
    assert sweep["environment"]["torch"] == torch.__version__
    assert (cli_sweep / "memory.png").stat().st_size > 1000


def test_cli_speed_prints_ratios_and_writes_files(tmp_path, capsys):
    assert cli.main(["bench", "speed", "--batch", "2", "--image-size", "8", "--repeats", "1", "--warmup", "0",
                     "--inference-repeats", "1", "--reference", "none", "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "revnet/revnet-plain" in printed and "images/s" in printed
    saved = json.loads((tmp_path / "speed.json").read_text())
    assert (tmp_path / "speed.png").exists() and "ratios" in saved
    assert saved["config"]["channels_last"]  # the default layout, as revnet train's


def test_cli_budget_errors(capsys):
    with pytest.raises(SystemExit):
        cli.main(["bench", "capacity", "--budget", "lots"])
    assert "cannot read 'lots' as a size" in capsys.readouterr().err


def test_report_renders_every_section(sweep, tmp_path):
    sp = speed.speed("revnet38", batch=2, image_size=8, repeats=1, warmup=0, inference_repeats=1)
    cap = {"config": {"budget_bytes": 2**20, "depth_batch": 2, "verify_max_batch": 8, "verify_max_units": 1},
           "batch": {"revnet38": {"largest": 4, "smallest_over": 5, "predicted": 4, "verified": True}},
           "depth": {"revnet": {"largest_depth": 14, "smallest_over_depth": None, "predicted_depth": 900,
                                "verified": False}}}
    meta = {"command": "revnet bench report --quick", "environment": environment.environment(),
            "loadavg_end": (0.0, 0.0, 0.0), "minutes": 0.5}
    text = render_report(meta, sweep, [sp, sp], cap, "benchmarks")
    for part in ("## Targets", "## Activation memory across depth", "## Speed", "## Capacity",
                 "revnet bench report --quick", "![activation memory against depth](benchmarks/memory.png)",
                 "| 50 |", "no (extrapolated)", torch.__version__):
        assert part in text, part


def test_report_renders_compiled_rows(sweep):
    """Compiled speed runs and compiled memory points become target rows and a table."""
    sp = speed.speed("revnet38", batch=2, image_size=8, repeats=1, warmup=0, inference_repeats=0,
                     reference=None, compile="eager")
    assert {"revnet+compile/revnet-plain", "revnet+compile/revnet-plain+compile"} <= sp["ratios"].keys()
    point = {"kind": "revnet", "model": "revnet38", "units": None, "depth": 38, "params": 465_000,
             "batch": 128, "activation_bytes": 100 * 2**20, "saved_bytes": 90 * 2**20,
             "total_bytes": 120 * 2**20}
    compiled = {"config": {"compile": "inductor"},
                "points": [point, {**point, "compile": "inductor", "activation_bytes": 104 * 2**20}]}
    meta = {"command": "revnet bench report", "environment": environment.environment(),
            "loadavg_end": (0.0, 0.0, 0.0), "minutes": 1.0}
    cap = {"config": {"budget_bytes": 2**20, "depth_batch": 2, "verify_max_batch": 8, "verify_max_units": 1},
           "batch": {}, "depth": {}}
    text = render_report(meta, sweep, [sp, sp], cap, "benchmarks", compiled=compiled)
    assert "compiled reversible / eager plain autograd (channels_last)" not in text  # sp is NCHW
    assert "| revnet38 step over the rebuild floor (compiled, contiguous, batch 2) | <= 1.05 |" in text
    assert "| revnet38 step over the rebuild floor (eager, contiguous, batch 2) | <= 1.05 |" in text
    assert "reversible / plain autograd (contiguous) | <= 1.25" not in text  # below the floor on CPUs
    row = "| revnet38 activation memory, compiled / eager reversible, batch 128 | within 10% | +4.0% | met |"
    assert row in text
    assert "revnet+compile" in text and "`+compile` rows" in text


@pytest.mark.slow
def test_cli_report_quick(tmp_path):
    """The whole report on its quick configuration (about a minute)."""
    out, doc = tmp_path / "benchmarks", tmp_path / "BENCHMARKS.md"
    subprocess.run([sys.executable, "-m", "revnet", "bench", "report", "--quick", "--out", str(out),
                    "--doc", str(doc)], check=True)
    text = doc.read_text()
    assert "## Targets" in text and "## Data path" in text and "the training step's images/s" in text
    assert {p.name for p in out.iterdir()} >= {"memory.json", "memory.png", "speed.json", "speed.png",
                                                "capacity.json", "capacity.png", "data.json", "report.json"}


def test_loader_throughput_counts_every_image_and_crosses_epochs():
    ds = load_dataset("synthetic", "train", num_samples=40, image_size=8)
    loader = Loader(ds, 16, train=True, pad=2)  # 2 batches per epoch
    result = loader_throughput(loader, batches=5, warmup=1)
    assert result["images"] == 5 * 16 and result["images_per_s"] > 0
    with pytest.raises(ValueError, match="batches >= 1"):
        loader_throughput(loader, batches=0)


def test_train_step_rate_runs_whole_steps():
    result = speed.train_step_rate("revnet38", batch=4, image_size=8, in_chans=1, amp="bf16",
                                   repeats=2, warmup=1)
    assert result["images_per_s"] > 0 and len(result["times_s"]) == 2
    with pytest.raises(ValueError, match="amp"):
        speed.train_step_rate(amp="fp8")


def test_cli_data_prints_the_ratio(tmp_path, capsys):
    assert cli.main(["bench", "data", "--quick", "--dataset", "synthetic", "--batch", "8",
                     "--out", str(tmp_path)]) == 0
    printed = capsys.readouterr().out
    assert "loader / training step =" in printed
    saved = json.loads((tmp_path / "data.json").read_text())
    rates = saved["loader"]["images_per_s"], saved["train_step"]["images_per_s"]
    assert saved["ratio"] == pytest.approx(rates[0] / rates[1])
    assert saved["config"]["crop_pad"] > 0 and saved["config"]["flip"]  # all augmentation is timed
    assert "gather + random crop (pad 2) + random flip + normalise" in printed


# --- the transformer family ---------------------------------------------------------------

def test_vit_memory_sweep_reversible_stays_flat_and_is_reported(sweep, tmp_path):
    """`revnet bench memory --family vit`: RevViT's saved bytes do not grow with blocks, ViT's do;
    the report renders the transformer section and its targets."""
    argv = ["bench", "memory", "--family", "vit", "--units", "1", "8", "--kinds", "vit", "revvit",
            "--models", "--batch", "8", "--image-size", "64", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "memory.json").read_text())
    assert result["config"]["family"] == "vit" and (tmp_path / "memory.png").exists()
    pts = {(p["kind"], p["depth"]): p for p in result["points"]}
    assert set(pts) == {("vit", 1), ("vit", 8), ("revvit", 1), ("revvit", 8)}
    assert pts[("revvit", 8)]["saved_bytes"] == pts[("revvit", 1)]["saved_bytes"]
    assert pts[("vit", 8)]["saved_bytes"] > 4 * pts[("vit", 1)]["saved_bytes"]
    assert pts[("revvit", 8)]["activation_bytes"] < pts[("vit", 8)]["activation_bytes"] / 2
    sp = speed.speed("revvit_small", reference="vit_small", batch=2, image_size=32, repeats=1, warmup=0,
                     inference_repeats=1)
    assert set(sp["train"]) == {"revvit", "revvit-plain", "revvit-checkpoint", "vit_small", "floor"}
    assert {"revvit/revvit-plain", "revvit/revvit-checkpoint", "inference revvit/revvit-plain",
            "revvit/floor"} <= sp["ratios"].keys()
    meta = {"command": "revnet bench report", "environment": environment.environment(),
            "loadavg_end": (0.0, 0.0, 0.0), "minutes": 1.0}
    cap = {"config": {"budget_bytes": 2**20, "depth_batch": 2, "verify_max_batch": 8, "verify_max_units": 1},
           "batch": {}, "depth": {}}
    cnn = speed.speed("revnet38", batch=2, image_size=8, repeats=1, warmup=0, inference_repeats=0)
    text = render_report(meta, sweep, [cnn, cnn], cap, "benchmarks", vit={"memory": result, "speed": sp})
    assert "## Reversible transformers: ViT against RevViT" in text and "memory_vit.png" in text
    assert "| RevViT activation memory, 1 -> 8 blocks, batch 8 | grows <= 5% |" in text
    assert "| revvit_small step over the rebuild floor (eager, contiguous, batch 2) | <= 1.05 |" in text


def test_vit_kinds_do_not_mix_with_cnn_kinds():
    with pytest.raises(ValueError, match="kinds .* mix families"):
        memory.memory_sweep(units=[1], kinds=["revnet", "revvit"])


def test_cli_budget_frontier_quick(tmp_path, monkeypatch):
    """`revnet bench budget --quick`: plans at the two ends, measured in fresh processes; the
    timing process keeps freed memory (memory.measure.keep_freed_memory), as training does."""
    import revnet.cli.bench as bench_cli

    kept = []
    monkeypatch.setattr(bench_cli, "keep_freed_memory", lambda: kept.append(1) or True)
    assert cli.main(["bench", "budget", "--quick", "--out", str(tmp_path)]) == 0
    assert kept
    (run,) = json.loads((tmp_path / "budget.json").read_text())["runs"]
    pts = run["points"]
    assert set(pts) == {"plan@0", "plan@1", "revnet", "revnet-plain", "revnet-checkpoint"}
    # At the all-stored end nearly everything is stored (the minimum, measured again for each plan,
    # moves by a few percent, so the last unit may not fit); at the other end nearly nothing.
    assert len(pts["plan@1"]["stored"]) >= run["units"] - 2 > len(pts["plan@0"]["stored"])
    peak0 = pts["plan@0"]["measured_peak_in_plan"]  # None: the minimum measured again was above it
    assert peak0 is None or peak0 <= pts["plan@0"]["budget"]
    assert pts["revnet"]["activation_bytes"] < pts["revnet-plain"]["activation_bytes"]
    assert (tmp_path / "budget.png").exists()


def _frontier(points: dict[str, tuple[float, float, float | None]], plan_s: float = 3.0) -> dict:
    """A budget_frontier result from (activation MiB, step s, budget MiB) per configuration."""
    pts = {n: {"stored": [], "activation_bytes": a * 2**20, "median_s": t,
               "vs_rebuild": t / points["revnet"][1],
               **({"budget": b * 2**20, "predicted_peak": b * 2**20} if b is not None else {})}
           for n, (a, t, b) in points.items()}
    return {"config": {"model": "revnet110", "batch": 128, "fractions": [0.0, 0.5, 0.75, 1.0]},
            "points": pts, "plan_s": plan_s, "units": 57}


def test_frontier_checks_reads_the_targets_off_the_points():
    r = _frontier({"plan@0": (100, 1.01, 100), "plan@0.5": (300, 0.90, 290), "plan@0.75": (400, 0.80, 400),
                   "plan@1": (500, 0.61, 500), "revnet": (100, 1.0, None), "revnet-plain": (500, 0.6, None),
                   "revnet-checkpoint": (350, 0.95, None)})
    k = budget.frontier_checks(r)
    assert k["stored_vs_plain"] == pytest.approx(0.61 / 0.6)
    assert k["minimum_vs_rebuild"] == pytest.approx(1.01)
    assert k["over_budget"] == {"plan@0.5": 10 * 2**20}  # the ends are not "between"
    # The line from (100, 1.0) to (500, 0.6) is at 0.8 at 300 MiB and 0.7 at 400 MiB: both plans lie above.
    assert k["above_line"] == pytest.approx({"plan@0.5": 0.9 / 0.8 - 1, "plan@0.75": 0.8 / 0.7 - 1})
    assert k["vs_checkpoint"] == pytest.approx(0.85 / 0.95)  # halfway between 0.90 and 0.80
    assert k["plan_steps"] == pytest.approx(3.0)
    # With the rounds' times, the same-computation ratios are paired round by round: a slow round
    # (the machine's drift) slows both and cancels.
    r["points"]["plan@1"].update(times_s=[0.61, 0.90, 0.62], median_s=0.62)
    r["points"]["revnet-plain"].update(times_s=[0.60, 0.88, 0.64], median_s=0.64)
    assert budget.frontier_checks(r)["stored_vs_plain"] == pytest.approx(0.61 / 0.60)  # medians: 0.97
    # The line too, each round against its own ends: plan@0.5 in a round where everything ran 1.5x
    # slower is on that round's line, not 1.35 / 0.8 above the medians' line.
    for name, times in (("revnet", [1.0, 1.5, 1.0]), ("revnet-plain", [0.6, 0.9, 0.6]),
                        ("plan@0.5", [0.76, 1.2, 0.84])):
        r["points"][name].update(times_s=times, median_s=sorted(times)[1])
    excess = budget.frontier_checks(r)["line_excess"]["plan@0.5"]
    assert excess == pytest.approx((0.0, (0.76 / 0.8 - 1) / 2, (0.84 / 0.8 - 1) / 2))  # median, quartiles
    assert "plan@0.5" not in budget.frontier_checks(r)["above_line"]
    meta = {"command": "revnet bench report", "environment": environment.environment(),
            "loadavg_end": (0.0, 0.0, 0.0), "minutes": 1.0}
    cap = {"config": {"budget_bytes": 2**20, "depth_batch": 2, "verify_max_batch": 8, "verify_max_units": 1},
           "batch": {}, "depth": {}}
    sweep = memory.memory_sweep(units=[1], kinds=["revnet"], batch=2, image_size=8)
    cnn = speed.speed("revnet38", batch=2, image_size=8, repeats=1, warmup=0, inference_repeats=0)
    text = render_report(meta, sweep, [cnn, cnn], cap, "benchmarks",
                         budget={"runs": [r], "command": "revnet bench budget --out x"})
    assert "## Memory-budget planner" in text and "benchmarks/budget/budget.png" in text
    assert "| revnet110: plans between the ends, measured activation memory | <= budget | 1 of 2 within " \
           "(over: plan@0.5 by 10.0 MiB) | **not met** |" in text
    assert "| revnet110: planning (profile + solve + checked steps), in all-rebuild steps | < 10 | 3.0 " \
           "| met |" in text


# --- what a model is, asked of the model; one run's step ---------------------------------------

def test_model_kind_is_asked_of_the_model_not_read_from_its_name():
    from revnet.models import RevNet, registry

    def anonymous(**kw):  # a RevNet whose name says nothing
        return RevNet(units=(1, 1, 1), channels=(16, 16, 32, 64), **kw)

    registry.register_model(anonymous)
    try:
        kinds = {n: contenders.model_kind(n) for n in ("resnet32", "revnet38", "vit_mini", "revvit_mini",
                                                      "anonymous")}
        assert kinds == {"resnet32": "resnet", "revnet38": "revnet", "vit_mini": "vit",
                         "revvit_mini": "revvit", "anonymous": "revnet"}
        plan = memory.sweep_plan([1], contenders.KINDS, models=["resnet32", "anonymous"], compile="aot_eager")
        named = [(p["kind"], p.get("model"), p.get("compile")) for p in plan if p.get("model")]
        assert named == [("resnet", "resnet32", None), ("revnet", "anonymous", None),
                         ("revnet-plain", "anonymous", None), ("revnet-checkpoint", "anonymous", None),
                         ("revnet", "anonymous", "aot_eager"), ("revnet-plain", "anonymous", "aot_eager")]
        assert len(plan) == 4 + 4 + 2 + 2  # the sweep's four kinds at one depth, compiled twice too
    finally:
        registry._MODELS.pop("anonymous")
    with pytest.raises(ValueError, match="unknown model"):
        contenders.model_kind("no-such-model")


def test_capacity_plot_colours_by_kind(tmp_path):
    from revnet.bench.plots import plot_capacity

    result = {"config": {"budget_bytes": 2**20, "device": "cpu"},
              "batch": {"resnet32": {"largest": 8, "kind": "resnet"}, "revnet38": {"largest": 32}}}  # older
    assert plot_capacity(result, tmp_path / "c.png").stat().st_size > 1000


def test_cli_memory_of_a_run_in_fresh_processes(tmp_path, capsys):
    """`revnet bench memory --run RUN_DIR`: the run's step (model, micro-batch, images, precision,
    the units its plan stored) reversible vs plain, each in a fresh process, in revnet train's line."""
    from revnet.engine.modes import units
    from revnet.training import TrainConfig, fit

    run = tmp_path / "run"
    fit(TrainConfig(model="revnet38", dataset="synthetic", synthetic={"num_samples": 32, "image_size": 16},
                    steps=1, batch_size=8, accum_steps=2, amp="none", out=str(run)))
    first = units(revnet.create_model("revnet38"))[0][0]
    summary = json.loads((run / "summary.json").read_text())
    (run / "summary.json").write_text(json.dumps({**summary, "stored": [first]}))  # as a plan would
    assert cli.main(["bench", "memory", "--run", str(run), "--out", str(tmp_path / "b")]) == 0
    line = capsys.readouterr().out.splitlines()[0]
    assert line.startswith("activation memory of one revnet38 training step at batch 4 (VmHWM-VmRSS): "
                           "reversible (1 units stored by the plan) ") and "x less" in line
    saved = json.loads((tmp_path / "b" / "memory_run.json").read_text())
    rev, plain = saved["reversible"], saved["plain"]
    assert (rev["kind"], rev["stored"]) == ("revnet", [first]) and plain["kind"] == "revnet-plain"
    assert rev["batch"] == plain["batch"] == 4 and rev["image_size"] == 16 and rev["amp"] == "none"
    assert rev["method"] == "VmHWM-VmRSS" and 0 < rev["activation_bytes"] < plain["activation_bytes"]
    with pytest.raises(SystemExit, match="the --out of a finished `revnet train` run"):
        cli.main(["bench", "memory", "--run", str(tmp_path / "nothing")])
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "model": "resnet32"}))
    with pytest.raises(SystemExit, match="resnet32 has no reversible units"):
        cli.main(["bench", "memory", "--run", str(run)])


def test_cli_memory_of_a_language_model_run(tmp_path, capsys):
    """--run on a text run: its tokens per window, its loss without the logits."""
    from revnet.training import TrainConfig, fit

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(f"line {i}\n" * 100)
    run = tmp_path / "run"
    fit(TrainConfig(model="revgpt_mini", dataset="text", data_dir=str(corpus), context_length=32, steps=1,
                    batch_size=4, amp="none", channels_last=False, out=str(run)))
    assert cli.main(["bench", "memory", "--run", str(run), "--out", str(tmp_path / "b")]) == 0
    assert capsys.readouterr().out.startswith("activation memory of one revgpt_mini training step at batch 4")
    rev = json.loads((tmp_path / "b" / "memory_run.json").read_text())["reversible"]
    assert (rev["kind"], rev["context"], rev["lm_loss"]) == ("revgpt", 32, "fused")


# --- the language models: GPT against RevGPT -----------------------------------------------

# Tiny GPTs whose main tensors (2 x 32 tokens x 256 wide, float32) reach the 64 KiB mmap threshold.
TINY_GPT = {"embed_dim": 256, "num_heads": 4, "vocab_size": 512, "context": 32, "batch": 2}
TINY_GPT_FLAGS = ["--embed-dim", "256", "--num-heads", "4", "--vocab-size", "512", "--context", "32",
                  "--batch", "2"]


def test_gpt_kinds_run_and_revgpt_saves_nothing_per_block():
    """Every GPT kind measures a step on token ids; RevGPT's saved bytes do not grow with blocks,
    GPT's and plain RevGPT's do, and checkpointing keeps one input per block."""
    pts = {(k, n): memory.memory_point(k, n, **TINY_GPT) for k in contenders.GPT_KINDS for n in (2, 4)}
    for (kind, n), p in pts.items():
        assert p["kind"] == kind and p["depth"] == n and p["context"] == 32 and p["vocab_size"] == 512
        assert p["image_size"] is None and p["activation_bytes"] > 0 and p["saved_bytes"] > 0
    saved = {key: p["saved_bytes"] for key, p in pts.items()}
    assert saved["revgpt", 4] == saved["revgpt", 2]
    assert saved["gpt", 4] > 1.5 * saved["gpt", 2]
    assert saved["revgpt-plain", 4] > 1.5 * saved["revgpt-plain", 2]
    assert saved["revgpt", 4] < saved["gpt-checkpoint", 4] < saved["gpt", 4] <= saved["revgpt-plain", 4]
    # The same weights count: RevGPT (mean readout, tied head) has exactly GPT's parameters.
    assert pts["revgpt", 4]["params"] == pts["gpt", 4]["params"] == pts["gpt-checkpoint", 4]["params"]
    named = memory.memory_point("revgpt", model="revgpt_mini", batch=2, context=16)
    assert named["depth"] == 4 and named["context"] == 16  # the blocks counted, not the digits of the name


def test_gpt_step_is_measured_on_the_fused_loss_unless_asked_for_the_logits():
    """As revnet train steps a language model: no logits kept (revnet.models.lm_loss)."""
    fused = memory.memory_point("revgpt", 2, **TINY_GPT)
    logits = memory.memory_point("revgpt", 2, **TINY_GPT, lm_loss="logits")
    assert fused["lm_loss"] == "fused" and logits["lm_loss"] == "logits"
    log_softmax = 2 * 32 * 512 * 4  # what the cross-entropy of the logits keeps for backward
    assert logits["saved_bytes"] - fused["saved_bytes"] >= 0.99 * log_softmax
    with pytest.raises(ValueError, match="lm_loss must be one of"):
        memory.memory_point("revgpt", 2, **TINY_GPT, lm_loss="chunked")


def test_gpt_batch_is_tokens_and_next_tokens():
    net = contenders.build("gpt", 1, context=8, embed_dim=32, num_heads=2, vocab_size=50)
    x, y = contenders.make_tokens(net, 3, 8)
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    assert int(x.min()) >= 0 and int(x.max()) < 50
    assert torch.equal(x[:, 1:], y[:, :-1])  # the targets are the next tokens
    contenders.train_step(net, x, y)  # cross-entropy over (B * T, V)
    assert net.tok_embed.weight.grad is not None


def test_gpt_kinds_are_asked_of_the_model():
    assert [contenders.model_kind(n) for n in ("gpt_mini", "revgpt_mini", "gpt2_small")] == [
        "gpt", "revgpt", "gpt"]
    plan = memory.sweep_plan([2], contenders.GPT_KINDS, models=["gpt_mini", "revgpt_mini"], model_batch=2)
    named = [(p["kind"], p["model"]) for p in plan if p.get("model")]
    assert named == [("gpt", "gpt_mini"), ("gpt-checkpoint", "gpt_mini"), ("revgpt", "revgpt_mini"),
                     ("revgpt-plain", "revgpt_mini")]
    with pytest.raises(ValueError, match="not a language model"):
        contenders.build("revgpt", model="revnet38")
    with pytest.raises(ValueError, match="not a RevGPT"):
        contenders.build("revgpt", model="gpt_mini")
    with pytest.raises(ValueError, match="exceeds gpt_mini's context_length 128"):
        contenders.build("gpt", model="gpt_mini", context=256)
    with pytest.raises(ValueError, match="context must be >= 1"):
        memory.memory_point("gpt", 2, **{**TINY_GPT, "context": 0})
    with pytest.raises(ValueError, match="are for the language models"):
        memory.memory_point("vit", 1, context=32)
    with pytest.raises(ValueError, match="sweep='context' needs one depth"):
        memory.sweep_plan([2, 4], ["gpt"], sweep="context", contexts=[16])
    with pytest.raises(ValueError, match="take images"):
        memory.sweep_plan([2], ["revvit"], sweep="context", contexts=[16])


def test_cli_gpt_memory_depth_and_context_sweeps(tmp_path):
    """`revnet bench memory --family gpt`: RevGPT below GPT and flat in depth (fresh processes), and
    --sweep context against the tokens per sequence; JSON and PNG."""
    argv = ["bench", "memory", "--family", "gpt", "--units", "2", "4", "--kinds", "gpt", "revgpt", "--models",
            *TINY_GPT_FLAGS, "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "memory.json").read_text())
    c = result["config"]
    assert (c["family"], c["sweep"], c["context"]) == ("gpt", "depth", 32)
    assert (c["embed_dim"], c["num_heads"], c["vocab_size"]) == (256, 4, 512)
    assert (tmp_path / "memory.png").stat().st_size > 1000
    pts = {(p["kind"], p["depth"]): p["activation_bytes"] for p in result["points"]}
    assert set(pts) == {("gpt", 2), ("gpt", 4), ("revgpt", 2), ("revgpt", 4)}
    assert pts["revgpt", 4] < pts["gpt", 4]
    assert pts["revgpt", 4] - pts["revgpt", 2] < 0.25 * (pts["gpt", 4] - pts["gpt", 2])  # flat
    argv = ["bench", "memory", "--family", "gpt", "--sweep", "context", "--contexts", "16", "32", "--units",
            "2", "--kinds", "gpt", "--embed-dim", "256", "--num-heads", "4", "--vocab-size", "512",
            "--batch", "2", "--out", str(tmp_path), "--name", "ctx"]
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "ctx.json").read_text())
    assert result["config"]["sweep"] == "context" and (tmp_path / "ctx.png").stat().st_size > 1000
    assert sorted((p["context"], p["depth"]) for p in result["points"]) == [(16, 2), (32, 2)]


@pytest.mark.parametrize("argv, message", [
    (["--family", "gpt", "--image-size", "64"], "--image-size is for the image families .* Fix: drop "
                                                 "--image-size"),
    (["--family", "gpt", "--block", "bottleneck"], "--block is for the image families"),
    (["--family", "gpt", "--context", "0"], "--context must be >= 1, got 0. Fix: e.g. --context 1024"),
    (["--family", "gpt", "--sweep", "context", "--contexts", "128", "-1"], "--contexts must all be >= 1"),
    (["--family", "gpt", "--sweep", "context", "--units", "4", "8"], "one depth.* Fix: one value"),
    (["--family", "gpt", "--sweep", "context", "--models", "gpt2_small"], "Fix: drop --models"),
    (["--family", "gpt", "--contexts", "128"], "Fix: add --sweep context"),
    (["--family", "gpt", "--kinds", "revvit"], "--kinds revvit are not --family gpt's kinds .* Fix: "
                                                "--family vit"),
    (["--family", "vit", "--context", "128"], "--context is for the language models. Fix: add --family gpt"),
    (["--sweep", "context"], "--sweep context is for the language models"),
])
def test_cli_gpt_memory_refuses_bad_combinations(argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.main(["bench", "memory", *argv, "--out", "/nonexistent/never-written"])


def test_cli_parses_family_gpt():
    import argparse

    parser = argparse.ArgumentParser()
    from revnet.cli import bench as bench_cli

    bench_cli.add_parser(parser.add_subparsers())
    args = parser.parse_args(["bench", "memory", "--family", "gpt", "--sweep", "context", "--contexts", "128",
                              "256", "--kinds", "revgpt", "gpt-checkpoint"])
    assert (args.family, args.sweep, args.contexts, args.kinds) == ("gpt", "context", [128, 256],
                                                                     ["revgpt", "gpt-checkpoint"])
