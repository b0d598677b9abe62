"""The studies in studies/ write the documents they claim to (their runs are too long for tests).

Each study's writer is fed small synthetic results, and what it writes is read back.
"""

import argparse
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

STUDIES = Path(__file__).resolve().parents[1] / "studies"
NAMES = ("convert_memory", "convert_study", "fidelity_study", "fsdp_probe", "memcnn_compare", "min_plan",
         "nproc_study", "optimizer_in_backward", "page_faults", "parity_study", "planner_savings",
         "rebuild_floor", "window_savings")


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"studies_{name}", STUDIES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_every_study_imports_and_answers_help():
    # One process for all nine (each alone would import torch again): run as `python studies/X.py
    # --help` runs them, each to its argparse exit, before any work.
    code = (
        "import contextlib, io, json, runpy, sys\n"
        "out = {}\n"
        f"for name in {list(NAMES)!r}:\n"
        f"    sys.argv = [f'{STUDIES}/{{name}}.py', '--help']\n"
        "    buf = io.StringIO()\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(buf):\n"
        "            runpy.run_path(sys.argv[0], run_name='__main__')\n"
        "        out[name] = ['no exit', buf.getvalue()]\n"
        "    except SystemExit as e:\n"
        "        out[name] = [e.code, buf.getvalue()]\n"
        "print(json.dumps(out))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout.splitlines()[-1])
    assert sorted(got) == sorted(NAMES)
    for name, (exit_code, text) in got.items():
        assert exit_code in (0, None), (name, exit_code)
        assert text.startswith("usage:") and f"{name}.py" in text, (name, text[:200])


def test_forward_seconds_times_each_unit_the_studies_read():
    # rebuild_floor.py and window_savings.py read the planner's per-unit forward times.
    from torch import nn

    from revnet import AdditiveCoupling, ReversibleSequence
    from revnet.engine.modes import units
    from revnet.memory.planner import forward_seconds

    def branch() -> nn.Module:
        return nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))

    model = nn.Sequential(ReversibleSequence([AdditiveCoupling(branch(), branch()) for _ in range(3)]))
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    listed = units(model)
    assert [name for name, _, _ in listed] == ["0.couplings.0", "0.couplings.1", "0.couplings.2"]
    seconds = forward_seconds(model, torch.randn(8, 8), listed[:2], repeats=2)
    assert list(seconds) == ["0.couplings.0", "0.couplings.1"]  # only the units asked for
    assert all(s > 0 for s in seconds.values())
    assert all(torch.equal(v, buffers[k]) for k, v in model.state_dict().items())  # BatchNorm untouched


# parity_study ---------------------------------------------------------------------------------------


def row(acc: list[float], lr: float) -> dict:
    cfg = {"recipe": "fashion-mnist-vit", "amp": "bf16", "epochs": 3, "batch_size": 128, "lr": lr,
           "optimizer": "adamw", "weight_decay": 0.05, "schedule": "onecycle", "label_smoothing": 0.1,
           "crop_pad": 0, "flip": True}
    return {"test_accuracy": acc, "mean": sum(acc) / len(acc), "std": 0.001, "wall_seconds": 600.0,
            "images_per_s": 300.0, "activation_bytes": 2 ** 20, "params": 878922, "config": cfg}


def test_parity_study_doc_reports_the_lr_sweep_and_each_rows_rate(tmp_path):
    study = load("parity_study")
    study.CONFIGS = study.FAMILIES["vit"]
    rev, plain, res = study.CONFIGS
    rows = {rev: row([0.90, 0.899], 0.002), plain: row([0.897, 0.896], 0.002),
            res: row([0.895, 0.894], 0.004)}
    sweep = {rev: {0.001: 0.89, 0.002: 0.90, 0.004: 0.88}, res: {0.001: 0.88, 0.002: 0.89, 0.004: 0.895}}
    args = argparse.Namespace(family="vit", seeds=[0, 1], jobs=2, threads=1, out=Path("runs/p"), doc=tmp_path,
                              tune_lr=[0.001, 0.002, 0.004])
    doc = tmp_path / "PARITY.md"
    doc.write_text("# kept\n\nprose before\n")
    study.write_doc(rows, args, [], doc, "abc1234", sweep)
    text = doc.read_text()
    assert text.startswith("# kept\n\nprose before\n")  # only the family's section is written
    assert "`python studies/parity_study.py --family vit" in text  # the command that made it
    assert "--tune-lr 0.001 0.002 0.004" in text
    assert f"| {rev} | 89.00 | **90.00** | 88.00 |" in text  # the sweep, best rate in bold
    assert f"| {res} | 88.00 | 89.00 | **89.50** |" in text
    assert f"| {res} | 0.879M | 0.004 | 89.45 +- 0.10 |" in text  # each row says its rate
    assert "AdamW peak lr per row" in text
    assert "minus ViT-mini (residual): +0.50 points" in text
    # Without a sweep the table has no rate column (the earlier studies' layout).
    study.write_doc(rows, argparse.Namespace(**{**vars(args), "tune_lr": None}), [], doc, "abc1234", {})
    text = doc.read_text()
    assert "peak lr |" not in text and "AdamW lr 0.002" in text


def test_parity_study_of_language_models_reports_bits_per_byte_lower_is_better(tmp_path):
    study = load("parity_study")
    study.CONFIGS, study.METRIC = study.FAMILIES["gpt"], study.METRICS["gpt"]
    rev, plain, res = study.CONFIGS

    def lm(bpb: list[float]) -> dict:
        cfg = {**row([0.5], 0.003)["config"], "recipe": "text-lm", "dataset": "text", "steps": 1500,
               "epochs": None, "label_smoothing": 0.0, "flip": False}
        return {"test_bits_per_byte": bpb, "mean": sum(bpb) / len(bpb), "std": 0.01, "wall_seconds": 300.0,
                "tokens_per_s": 20000.0, "activation_bytes": 2 ** 20, "params": 842496, "config": cfg}

    rows = {rev: lm([2.10, 2.12]), plain: lm([2.11, 2.11]), res: lm([2.00, 2.02])}
    sweep = {rev: {0.002: 2.2, 0.003: 2.1}, res: {0.002: 2.0, 0.003: 2.05}}
    args = argparse.Namespace(family="gpt", seeds=[0, 1], jobs=2, threads=1, out=Path("runs/p"), doc=tmp_path,
                              tune_lr=[0.002, 0.003])
    study.write_doc(rows, args, [], tmp_path / "PARITY.md", "abc1234", sweep)
    text = (tmp_path / "PARITY.md").read_text()
    assert "<!-- parity-study-gpt: begin" in text and "the standard library's source" in text
    assert f"| {rev} | 2.2000 | **2.1000** |" in text and f"| {res} | **2.0000** | 2.0500 |" in text  # lowest
    assert "bits per byte (mean +- std)" in text and "| 2.1100 +- 0.0100 |" in text
    assert "minus GPT-mini (residual): +0.1000 bits per byte (+4.98%)" in text
    study.CONFIGS, study.METRIC = study.FAMILIES["cnn"], study.METRICS["cnn"]


def test_parity_study_rewrites_a_section_written_when_it_lived_in_scripts(tmp_path):
    study = load("parity_study")
    study.CONFIGS = study.FAMILIES["vit"]
    rev, plain, res = study.CONFIGS
    rows = {rev: row([0.90], 0.002), plain: row([0.90], 0.002), res: row([0.89], 0.002)}
    args = argparse.Namespace(family="vit", seeds=[0], jobs=1, threads=1, out=Path("runs/p"), doc=tmp_path,
                              tune_lr=None)
    doc = tmp_path / "PARITY.md"
    doc.write_text("# page\n\n<!-- parity-study: begin (written by scripts/parity_study.py) -->\ncnn table\n"
                   "<!-- parity-study: end -->\n\nbetween\n\n"
                   "<!-- parity-study-vit: begin (written by scripts/parity_study.py) -->\nold vit table\n"
                   "<!-- parity-study-vit: end -->\n\nafter\n")
    study.write_doc(rows, args, ["--amp", "bf16"], doc, "abc1234", {})
    text = doc.read_text()
    assert "old vit table" not in text  # replaced, not appended
    assert text.count("parity-study-vit: begin") == 1
    assert "<!-- parity-study-vit: begin (written by studies/parity_study.py) -->" in text
    assert "cnn table" in text and "between" in text and text.endswith("\n\nafter\n")  # the rest kept
    assert f"| {rev} | 0.879M | 90.00 +- 0.10 | 0.9000 |" in text
    assert "plus `--amp bf16`" in text


# fidelity_study -------------------------------------------------------------------------------------


def fake_run(path: Path, seed: int, acc: float, rows: list[dict], exact: bool = False) -> Path:
    path.mkdir(parents=True)
    (path / "summary.json").write_text(json.dumps({
        "config": {"seed": seed, "amp": "bf16", "exact": exact}, "test_accuracy": acc,
        "best_test_accuracy": acc, "wall_seconds": 10.0, "images_per_s": 100.0, "model": "revnet38",
        "dataset": "fashion-mnist", "interrupted": False}))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_fidelity_study_writes_angle_drift_and_accuracy(tmp_path):
    study = load("fidelity_study")
    stages = ("stem", "stages.0")
    angle_rows = [{"step": 0, "loss": 2.3}]
    for step, deg in ((0, 0.6), (50, 0.2), (100, 0.1)):
        angle_rows.append({"step": step, "grad_angle_deg": deg,
                           "grad_angle_by_stage": dict.fromkeys(stages, deg)})
        angle_rows.append({"step": step, "drift": {"stages.0.0": deg / 100},
                           "drift_input_max": {"stages.0.0": 10 * deg}})
    angle = fake_run(tmp_path / "grad-angle", 0, 0.91, angle_rows)
    exact = [fake_run(tmp_path / f"exact-seed{s}", s, acc, [{"step": 0, "drift": {"stages.0.0": 0.0},
                                                            "drift_input_max": {"stages.0.0": 3.0 + s}}],
                      exact=True) for s, acc in ((0, 0.90), (1, 0.92))]
    parity = tmp_path / "results.json"
    parity.write_text(json.dumps({"RevNet-38 (reversible)": {"seeds": [0, 1], "mean": 0.905,
                                                             "test_accuracy": [0.9, 0.91], "std": 0.007}}))
    result = study.summarize(angle, exact, parity)
    brief = study.write_results(result, tmp_path / "doc")
    written = json.loads((tmp_path / "doc" / "training.json").read_text())
    g = written["grad_angle"]
    assert g["angle_deg"] == {"first": 0.6, "last": 0.1, "median": 0.2, "min": 0.1, "max": 0.6}
    assert g["angle_deg_by_stage_median"] == {"stem": 0.2, "stages.0": 0.2}
    assert [r["step"] for r in g["angles"]] == [0, 50, 100] and len(g["drift"]) == 3
    assert g["drift_rel_error_max"] == pytest.approx(0.006) and g["stream_input_max"] == pytest.approx(6.0)
    assert [r["seed"] for r in written["exact"]["runs"]] == [0, 1]
    assert written["exact"]["mean"] == pytest.approx(0.91)
    assert written["exact"]["std"] == pytest.approx(0.01414, 1e-3)
    assert written["exact"]["runs"][1]["stream_input_max"] == 4.0
    assert written["float_reference"]["mean"] == 0.905
    assert (tmp_path / "doc" / "grad_angle.png").read_bytes()[:4] == b"\x89PNG"
    assert "angles" not in brief["grad_angle"] and brief["grad_angle"]["test_accuracy"] == 0.91
    # Without the grad-angle run (--no-angle): no plot.
    study.write_results(study.summarize(None, exact, tmp_path / "missing.json"), tmp_path / "exact-only")
    assert sorted(p.name for p in (tmp_path / "exact-only").iterdir()) == ["training.json"]
    only = json.loads((tmp_path / "exact-only" / "training.json").read_text())
    assert "grad_angle" not in only and "float_reference" not in only and len(only["exact"]["runs"]) == 2


# fsdp_probe -----------------------------------------------------------------------------------------


def test_fsdp_probe_rows_and_json(tmp_path):
    study = load("fsdp_probe")
    expected = {"a": torch.tensor([1.0, -2.0]), "b": torch.tensor([4.0]), "c": torch.tensor([1.0])}
    grads = {"a": torch.tensor([1.0, -2.2]), "b": torch.tensor([4.0]), "c": None}
    got = study.compare(grads, expected)
    assert got["runs"] and got["params_without_grad"] == 1 and got["of_params"] == 3
    assert got["max_rel_grad_diff"] == pytest.approx(0.1)  # |-2.2 - -2| / 2
    failed = study.failure(RuntimeError("FSDP needs a non-CPU accelerator device\nsecond line"))
    assert failed == {"runs": False, "error": "RuntimeError: FSDP needs a non-CPU accelerator device"}
    results = {"torch": "x", "world_size": 2, "fsdp2-stage/reversible": got, "fsdp1/plain": failed}
    out = tmp_path / "sub" / "probe.json"
    text = study.write_results(results, out)
    assert json.loads(out.read_text()) == json.loads(text) == results
    assert json.loads(study.write_results(results, None)) == results  # printed only


# memcnn_compare -------------------------------------------------------------------------------------


def test_memcnn_compare_ratios_and_json(tmp_path, capsys):
    study = load("memcnn_compare")
    times = {"memcnn": [1.0, 2.0, 1.0], "revnet": [0.8, 1.0, 0.9], "revnet+compile": [0.5, 1.2, 0.6]}
    summary = study.summarize(times, {"memcnn": 3.0, "revnet": 2.0, "revnet+compile": 60.6}, batch=100)
    assert summary["train"]["memcnn"]["median_s"] == 1.0
    assert summary["train"]["revnet"]["images_per_s"] == pytest.approx(100 / 0.9)
    assert summary["ratios"] == pytest.approx({"revnet/memcnn": 0.9, "revnet+compile/memcnn": 0.6})
    # per repeat: revnet 0.8, 0.5, 0.9; compiled 0.5, 0.6, 0.6
    assert summary["median_of_per_repeat_ratios"] == pytest.approx({"revnet/memcnn": 0.8,
                                                                    "revnet+compile/memcnn": 0.6})
    assert summary["compile_s"] == {"revnet+compile": pytest.approx(60.0)}
    result = {"config": {"batch": 100}, "params": dict.fromkeys(times, 465_000), **summary}
    path = study.write_results(result, tmp_path / "memcnn")
    assert path == tmp_path / "memcnn" / "memcnn.json" and json.loads(path.read_text()) == json.loads(
        json.dumps(result))
    printed = capsys.readouterr().out
    assert "revnet/memcnn = 0.900" in printed and "compile took 60 s" in printed


# min_plan -------------------------------------------------------------------------------------------


def test_min_plan_ratio_and_json(tmp_path, capsys):
    study = load("min_plan")
    times = {"all rebuilt": [1.0, 1.0, 2.0], "plan at min": [0.9, 0.95, 1.6]}
    summary = study.summarize({"all rebuilt": 60 * 2**20, "plan at min": 60 * 2**20}, times)
    assert summary["ratio_plan_to_rebuild"] == pytest.approx(0.9)  # median of 0.9, 0.95, 0.8
    assert summary["median_step_s"] == {"all rebuilt": 1.0, "plan at min": 0.95}
    result = {"model": "revnet38", "stored": ["stages.2.0"], "units": 9, "plan_s": 3.0, **summary}
    study.write_results(result, tmp_path / "b" / "min_plan.json")
    assert json.loads((tmp_path / "b" / "min_plan.json").read_text()) == result
    printed = capsys.readouterr().out
    assert "peak    60.0 MiB" in printed and "0.900 (1 of 9 units stored" in printed


# page_faults ----------------------------------------------------------------------------------------


def test_page_faults_medians_and_json(tmp_path):
    study = load("page_faults")
    kinds = study.medians({"revnet": [(3.0, 10, 0.1), (4.0, 0, 0.3), (3.5, 5, 0.2)],
                           "revnet-plain": [(5.0, 900_000, 1.0)]})
    assert kinds == {"revnet": {"step_s": 3.5, "minor_faults": 5, "system_s": 0.2},
                     "revnet-plain": {"step_s": 5.0, "minor_faults": 900_000, "system_s": 1.0}}
    results = [{"kept_memory": False, "kinds": kinds}, {"kept_memory": True, "kinds": kinds}]
    out = tmp_path / "page_faults.json"
    study.write_results(results, "revnet164", 128, 32, 3, out, "python studies/page_faults.py --rounds 3")
    written = json.loads(out.read_text())
    assert written["command"] == "python studies/page_faults.py --rounds 3"
    config = (written["model"], written["batch"], written["image_size"], written["rounds"])
    assert config == ("revnet164", 128, 32, 3)
    assert written["results"] == results


# planner_savings ------------------------------------------------------------------------------------


def test_planner_savings_rows_and_json(tmp_path, capsys):
    study = load("planner_savings")
    seconds, nbytes = {"u0": 0.1, "u1": 0.2, "u2": 0.3}, {"u0": 2**20, "u1": 2 * 2**20, "u2": 3 * 2**20}
    sets = {"all rebuilt": [], "first two": ["u0", "u1"], "all stored": ["u0", "u1", "u2"]}
    times = {"all rebuilt": [4.0, 4.0, 5.0], "first two": [3.8, 3.6, 4.5], "all stored": [3.2, 3.0, 4.5]}
    rows = study.summarize(sets, times, seconds, nbytes)
    assert [r["set"] for r in rows] == list(sets)
    first = rows[1]
    assert (first["units"], first["bytes"], first["predicted_saving_s"]) == (2, 3 * 2**20, pytest.approx(0.3))
    assert first["median_step_s"] == 3.8 and first["ratio_to_all_rebuilt"] == pytest.approx(0.9)
    assert rows[0]["ratio_to_all_rebuilt"] == 1.0 and rows[2]["ratio_to_all_rebuilt"] == pytest.approx(0.8)
    study.write_results(rows, tmp_path / "savings.json")
    assert json.loads((tmp_path / "savings.json").read_text()) == {"rows": rows}
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("first two"))
    assert line.split() == ["first", "two", "2", "3", "300", "3800", "0.900"]


# rebuild_floor --------------------------------------------------------------------------------------


def test_rebuild_floor_ratios_and_json(tmp_path):
    study = load("rebuild_floor")
    times = {"plain": [1.0, 2.0, 1.0], "reversible": [1.5, 2.6, 1.2], "units_forward": [0.3, 0.4, 0.2]}
    r = study.ratios(times)
    # per round: floor 1.3, 1.2, 1.2; measured 1.5, 1.3, 1.2; engine 1.5/1.3, 2.6/2.4, 1.2/1.2
    assert r == pytest.approx({"floor": 1.2, "measured": 1.3, "engine": 2.6 / 2.4, "plain_s": 1.0})
    result = {"kind": "revnet", "model": "revnet38", "batch": 16, "image_size": 16, "channels_last": True,
              "amp": "none", "units": 9, "times_s": times, **r}
    assert study.row(result).split() == ["revnet38", "16", "16", "channels_last", "none", "1.000", "1.200",
                                         "1.300", "1.083"]
    out = tmp_path / "rf" / "rebuild_floor.json"
    study.write_results([result], 7, out, "python studies/rebuild_floor.py --rounds 7")
    written = json.loads(out.read_text())
    assert written["command"] == "python studies/rebuild_floor.py --rounds 7" and written["rounds"] == 7
    assert written["results"] == [result] and "torch" in written["environment"]


# window_savings -------------------------------------------------------------------------------------


def test_window_savings_per_stage_and_json(tmp_path, capsys):
    study = load("window_savings")
    names = ["stages.0.0", "stages.0.1.couplings.0", "stages.0.1.couplings.1", "stages.1.0"]
    windows = {"rebuilt": {}, "stored": {}}
    for n in names:  # each unit: rebuilt windows 3 ms + 2 ms (medians), stored 1 ms + 1 ms
        windows["rebuilt"][("f", n)] = [0.003, 0.003, 0.9]
        windows["rebuilt"][("b", n)] = [0.002, 0.001, 0.002]
        windows["stored"][("f", n)] = windows["stored"][("b", n)] = [0.001]
    forward_s = dict.fromkeys(names, 0.002)
    stages = study.per_stage(names, windows, forward_s)
    assert list(stages) == ["0 couplings", "0 opener", "1 opener"]
    assert stages["0 couplings"] == pytest.approx({"units": 2, "window_saving_s": 0.006, "forward_s": 0.004,
                                                   "ratio": 1.5})
    assert stages["1 opener"]["units"] == 1 and stages["1 opener"]["ratio"] == pytest.approx(1.5)
    steps = {"rebuilt": [4.0, 4.2, 4.1], "stored": [3.0, 3.1, 3.2]}
    result = {"rounds": 3, "step_s": steps, "stages": stages}
    study.write_results(result, tmp_path / "windows.json")
    assert json.loads((tmp_path / "windows.json").read_text()) == result
    printed = capsys.readouterr().out
    assert "all rebuilt 4.100 s, all stored 3.100 s (medians of 3)" in printed
    line = next(ln for ln in printed.splitlines() if ln.startswith("0 couplings"))
    assert line.split() == ["0", "couplings", "2", "6", "4", "1.50"]


def test_convert_memory_table_and_doc(tmp_path):
    cm = load("convert_memory")
    rows = [{"depth": d, "batch": 2, "context": 1024, "loss": loss, "plain_saved_mib": 100.0 * d,
             "converted_saved_mib": 10.0, "saved_ratio": 10.0 * d}
            for d in (4, 24) for loss in ("fused", "hf")]
    rows[2].update(plain_peak_mib=2400.0, converted_peak_mib=300.0, peak_ratio=8.0)
    result = {"rows": rows, "command": "python studies/convert_memory.py",
              "environment": {"cpu": "X", "date": "d"}}
    doc = tmp_path / "CONVERT.md"
    doc.write_text("# t\n<!-- convert-memory:start -->\nold\n<!-- convert-memory:end -->\nkept\n")
    cm.write_doc(doc, result)
    text = doc.read_text()
    assert "old" not in text and text.endswith("kept\n")
    assert "| 24 | 2400.0 MiB | 10.0 MiB | 240x | 2400.0 MiB | 300.0 MiB | 8.0x |" in text
    assert "| 4 | 400.0 MiB | 10.0 MiB | 40x | - | - | - | 400.0 / 10.0 MiB (40.0x) |" in text


def test_convert_memory_methods_table(tmp_path):
    cm = load("convert_memory")
    rows = [{"depth": d, "batch": 2, "context": 64, "method": m, "exact": e,
             "couplings": 2 * d if m == "momentum" else d, "saved_mib": 1.0 + e * d}
            for d in (4, 24) for m, e in cm.VARIANTS]
    result = {"kind": "methods", "rows": rows, "command": "python studies/convert_memory.py --methods",
              "environment": {"cpu": "X", "date": "d"}}
    doc = tmp_path / "CONVERT.md"
    doc.write_text("<!-- convert-methods:start -->\nold\n<!-- convert-methods:end -->\n"
                   "<!-- convert-memory:start -->\nkept\n<!-- convert-memory:end -->\n")
    cm.write_doc(doc, result)
    text = doc.read_text()
    assert "old" not in text and "kept" in text
    assert "| 24 | 1.0 MiB (48 couplings) | 25.0 MiB (48 couplings) | 1.0 MiB (24 couplings) |" in text
    cm.build = lambda depth, context: _tiny_gpt2(depth)  # measure_methods on a tiny GPT-2: all convert
    got = cm.measure_methods([2], 1, 8, 0.5)
    assert [(r["method"], r["exact"], r["couplings"]) for r in got] == [
        ("momentum", False, 4), ("momentum", True, 4), ("two-stream", False, 2), ("two-stream", True, 2)]


def _tiny_gpt2(depth):
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_embd=32, n_head=4, n_layer=depth, vocab_size=50257, n_positions=16)
    return transformers.GPT2LMHeadModel(config).train()


def test_convert_study_summary_table_and_doc(tmp_path):
    cs = load("convert_study")
    runs = []
    for seed in (0, 1):
        for arm, finals in (("plain", (0.90, 0.92)), ("converted", (0.91, 0.93))):
            gamma = 0.9 if arm == "converted" else None
            runs.append({"task": "vision", "arm": arm, "seed": seed, "gamma": gamma,
                         "curve": [[0, 0.2], [50, finals[seed] - 0.005], [100, finals[seed]]],
                         "final": finals[seed], "start": 0.2,
                         "saved_mib": 100.0 if arm == "plain" else 25.0, "seconds": 1.0})
        for arm, final in (("plain", 2.0), ("converted", 2.1)):
            gamma = 0.9 if arm == "converted" else None
            runs.append({"task": "text", "arm": arm, "seed": seed, "gamma": gamma,
                         "curve": [[0, 3.0], [50, 2.5], [100, final]], "final": final, "start": 3.0,
                         "saved_mib": 50.0 if arm == "plain" else 5.0, "seconds": 1.0})
    # a run of another method and mode: a row of its own
    runs.append({"task": "text", "arm": "converted", "seed": 0, "gamma": 0.25, "method": "two-stream",
                 "exact": True, "curve": [[0, 3.0], [100, 1.9]], "final": 1.9, "start": 3.0, "saved_mib": 6.0,
                 "seconds": 1.0})
    summary = cs.summarize(runs)
    assert [r["label"] for r in summary if r["task"] == "text"] == [
        "plain fine-tuning", "converted, momentum, gamma 0.9", "converted, two-stream exact, gamma 0.25"]
    summary.pop()
    runs.pop()
    rows = {(r["task"], r["arm"]): r for r in summary}
    assert rows[("vision", "converted")]["vs_plain"] == pytest.approx(1.0)  # points
    assert rows[("vision", "converted")]["steps_to_plain_final"] == 75  # 50 and 100: mean over seeds
    assert rows[("text", "converted")]["vs_plain"] == pytest.approx(5.0)  # percent, lower is better
    assert rows[("text", "converted")]["steps_to_plain_final"] is None
    meta = {"command": "python studies/convert_study.py", "cpu": "X", "date": "d"}
    cs.write_doc(tmp_path, runs, meta)
    text = (tmp_path / "CONVERT.md").read_text()
    assert "+1.00 points" in text and "+5.00%" in text and "not reached" in text and "25.0 MiB" in text
    assert (tmp_path / "convert" / "curves.png").exists() and (tmp_path / "convert" / "results.json").exists()


def test_optimizer_in_backward_study_measures_and_tabulates(tmp_path):
    ob = load("optimizer_in_backward")
    nn = torch.nn
    ob.build = lambda name: nn.Sequential(nn.Flatten(), nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 10))
    out = str(tmp_path / "r.json")
    assert ob.main(["--models", "mlp", "--batch", "4", "--rounds", "2", "--out", out]) == 0
    result = json.loads((tmp_path / "r.json").read_text())
    row = result["rows"][0]
    assert row["model"] == "mlp" and row["time_ratio"] > 0
    assert row["peak_in_backward_mib"] <= row["peak_usual_mib"]
    assert "| mlp | 4 |" in result["table"]

