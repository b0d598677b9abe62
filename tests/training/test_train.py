"""fit(), checkpoints, resume, signals and the train/eval/plot commands, on tiny data."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import revnet.training.loop as loop_mod
import revnet.training.precision as precision_mod
from revnet.cli import main
from revnet.training import RECIPES, TrainConfig, TrainingDivergedError, evaluate_checkpoint, fit, lr_at

TINY = {"num_samples": 96, "image_size": 12, "channels": 3}


def tiny(tmp_path, name="run", **kw) -> TrainConfig:
    fields = dict(model="revnet38", dataset="synthetic", synthetic=TINY, steps=8, batch_size=16,
                  lr=0.1, amp="none", log_every=2, ckpt_every=3, out=str(tmp_path / name))
    fields.update(kw)
    return TrainConfig(**fields)


def test_fit_writes_a_complete_run(tmp_path):
    summary = fit(tiny(tmp_path))
    run = tmp_path / "run"
    for name in ("config.json", "metrics.jsonl", "last.pt", "best.pt", "summary.json", "curves.png"):
        assert (run / name).is_file(), name
    assert 0.0 <= summary["test_accuracy"] <= 1.0
    assert summary["step"] == 8 and not summary["interrupted"]
    assert summary["wall_seconds"] > 0 and summary["peak_memory_bytes"] > 0
    assert summary["reversible"] is True and summary["model"] == "revnet38"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == [2, 4, 6, 8]
    for key in ("loss", "accuracy", "lr", "images_per_s", "peak_memory_bytes"):
        assert all(key in r for r in train_rows), key
    assert any("test_accuracy" in r for r in rows)
    state = torch.load(run / "last.pt", weights_only=False)
    assert {"model", "optimizer", "step", "rng", "config"} <= set(state)
    assert state["step"] == 8
    assert json.loads((run / "summary.json").read_text())["test_accuracy"] == summary["test_accuracy"]


def test_training_learns_synthetic_data(tmp_path):
    summary = fit(tiny(tmp_path, steps=30, lr=0.05))
    assert summary["test_accuracy"] > 0.5  # chance is 0.1


def test_revvit_learns_with_adamw(tmp_path):
    """The transformer recipe's pieces: a RevViT sized to the images, AdamW without decay on
    norms, biases and position embeddings."""
    summary = fit(tiny(tmp_path, model="revvit_mini", optimizer="adamw", lr=3e-3, weight_decay=0.05,
                       label_smoothing=0.1, steps=30))
    assert summary["test_accuracy"] > 0.5 and summary["reversible"] is True
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    decay, no_decay = state["optimizer"]["param_groups"]
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = [n for n, _ in state["model"].items() if not n.endswith(("running_mean", "running_var",
                                                                     "num_batches_tracked"))]
    assert len(decay["params"]) + len(no_decay["params"]) == len(names)
    assert RECIPES["fashion-mnist-vit"]["model"] == "revvit_mini"
    with pytest.raises(ValueError, match="optimizer must be one of"):
        tiny(tmp_path, optimizer="lamb")


def test_memory_budget_plans_before_training_and_records_the_plan(tmp_path):
    summary = fit(tiny(tmp_path, memory_budget="1GiB"))  # more than the tiny step needs: all stored
    assert summary["step"] == 8
    text = (tmp_path / "run" / "plan.txt").read_text()
    assert text.startswith("memory plan: budget 1024.0 MiB") and "stages.0.0.couplings.0" in text
    assert " no " not in text  # every unit stored
    for bad, match in (({"memory_budget": "lots"}, "memory_budget must be a size"),
                       ({"memory_budget": "1GiB", "model": "resnet32"}, "plans a reversible model"),
                       ({"memory_budget": "1GiB", "reversible": False}, "with reversible=False")):
        with pytest.raises(ValueError, match=match):
            tiny(tmp_path, **bad)
    with pytest.raises(ValueError, match="auto sizes the budget from the GPU"):
        fit(tiny(tmp_path, name="auto", memory_budget="auto"))


def test_memory_budget_min_stores_only_what_fits_under_the_all_rebuild_peak(tmp_path):
    from revnet.training.footprint import memory_line, saved_bytes_of_run

    summary = fit(tiny(tmp_path, memory_budget="min"))
    text = (tmp_path / "run" / "plan.txt").read_text()
    plan_line = text.splitlines()[0]
    assert summary["stored"] and len(summary["stored"]) < 9 and "units stored" in plan_line
    # Plain autograd has nothing to rebuild: "min" plans nothing there (explicit sizes are refused).
    plain = fit(tiny(tmp_path, name="plain", memory_budget="min", reversible=False, steps=2))
    assert plain["stored"] == [] and not (tmp_path / "plain" / "plan.txt").exists()
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["memory_budget"] is None
    # The line at the end of `revnet train` counts the step the run trained: the plan's units stored.
    config = summary["config"]
    report = saved_bytes_of_run(config, summary)
    line = memory_line(report)
    assert f"reversible ({len(summary['stored'])} units stored by the plan)" in line and "x less" in line
    assert "(saved_tensors_hooks): " in line and report["batch"] == 16
    rebuilt = saved_bytes_of_run(config, {**summary, "stored": []})  # every unit rebuilt
    assert rebuilt["reversible_bytes"] < report["reversible_bytes"] < report["plain_bytes"]
    assert rebuilt["plain_bytes"] == report["plain_bytes"]
    bf16 = saved_bytes_of_run({**config, "amp": "bf16"}, summary)  # in the run's precision
    assert "(saved_tensors_hooks, bf16 autocast): reversible " in memory_line(bf16)
    assert bf16["plain_bytes"] < 0.75 * report["plain_bytes"]
    auto = saved_bytes_of_run({**config, "amp": "auto"}, summary)  # not resolved: float32
    assert auto["amp"] == "none" and auto["plain_bytes"] == report["plain_bytes"]
    assert saved_bytes_of_run({**config, "model": "resnet32"}, summary) is None  # nothing to rebuild


def test_revnet_train_ends_with_its_own_memory_count_in_its_own_process(tmp_path, capsys, monkeypatch):
    """The closing line: the run's step (one micro-batch) reversible vs plain, counted in this
    process (no worker process, nothing of revnet.bench); none for a model with nothing to rebuild."""
    def no_process(*a, **k):
        raise AssertionError("revnet train started a process for its memory report")

    monkeypatch.setattr(subprocess, "run", no_process)
    monkeypatch.setattr(subprocess, "Popen", no_process)
    argv = ["train", "--dataset", "synthetic", "--steps", "2", "--batch-size", "16", "--accum-steps", "2",
            "--amp", "none", "--log-every", "1"]
    assert main([*argv, "--out", str(tmp_path / "rev")]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("activation memory"))
    assert line.startswith("activation memory of one revnet38 training step at batch 8 "
                           "(saved_tensors_hooks): reversible ") and "x less" in line
    rev, plain = (float(x.split(" MiB")[0].split()[-1]) for x in line.split(" vs "))
    assert 0 < 3 * rev < plain
    assert main([*argv, "--model", "resnet32", "--steps", "1", "--out", str(tmp_path / "res")]) == 0
    assert "activation memory" not in capsys.readouterr().out
    assert main([*argv, "--steps", "1", "--out", str(tmp_path / "quiet"), "--no-memory-report"]) == 0
    assert "activation memory" not in capsys.readouterr().out


def test_what_a_model_is_is_asked_of_the_model_not_read_from_its_name(tmp_path, capsys):
    """A reversible transformer registered under a name that says neither "rev" nor "vit": exact
    mode and a memory budget accept it, its position embeddings are sized to the images, and the
    run ends with its memory line; a baseline whose name starts with "rev" is refused both."""
    from revnet.models import RevViT, VisionTransformer, model_accepts, registry

    small = {"img_size": 28, "tokenizer": "conv", "embed_dim": 32, "depth": 2, "num_heads": 2}

    def anonymous_reversible(**kw):
        return RevViT(**{**small, **kw})

    def revealing_baseline(**kw):
        return VisionTransformer(**{**small, **kw})

    for fn in (anonymous_reversible, revealing_baseline):
        registry.register_model(fn)
    try:
        assert model_accepts("anonymous_reversible", "img_size") and not model_accepts("revnet38", "img_size")
        assert tiny(tmp_path, model="anonymous_reversible", exact=True, memory_budget="1GiB").exact
        for bad, match in (({"exact": True}, "exact mode needs a reversible model"),
                           ({"memory_budget": "1GiB"}, "plans a reversible model")):
            with pytest.raises(ValueError, match=match):
                tiny(tmp_path, model="revealing_baseline", **bad)
        assert main(["train", "--model", "anonymous_reversible", "--dataset", "synthetic", "--steps", "1",
                     "--batch-size", "8", "--amp", "none", "--out", str(tmp_path / "anon")]) == 0  # 32px
        out = capsys.readouterr().out
        assert "(reversible)" in out and "activation memory of one anonymous_reversible training step" in out
    finally:
        for name in ("anonymous_reversible", "revealing_baseline"):
            registry._MODELS.pop(name)


def test_one_mapping_from_precision_names_to_dtypes():
    dtypes = precision_mod.AMP_DTYPES
    assert dtypes == {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    assert precision_mod.AMP_MODES == ("auto", "none", "bf16", "fp16")
    assert precision_mod.amp_dtype("bf16") is torch.bfloat16 and precision_mod.amp_dtype("none") is None
    with pytest.raises(ValueError, match="resolve it first"):
        precision_mod.amp_dtype("auto")
    with pytest.raises(ValueError, match="amp must be one of none, bf16, fp16"):
        precision_mod.autocast(torch.device("cpu"), "fp8")


def _interrupt_at(monkeypatch, at_step: int) -> None:
    """Sends SIGTERM to this process right after optimiser step ``at_step``."""
    real = loop_mod._train_step
    count = {"n": 0}

    def wrapped(run, x, y):
        out = real(run, x, y)
        count["n"] += 1
        if count["n"] == at_step:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop_mod, "_train_step", wrapped)


def test_resume_after_sigterm_equals_uninterrupted_run(tmp_path, monkeypatch):
    full = fit(tiny(tmp_path, "full", steps=10))
    _interrupt_at(monkeypatch, 4)
    part = fit(tiny(tmp_path, "part", steps=10))
    assert part["interrupted"] and part["step"] == 4
    monkeypatch.undo()
    resumed = fit(tiny(tmp_path, "part", steps=10), resume=True)
    assert resumed["step"] == 10 and not resumed["interrupted"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert resumed["test_accuracy"] == full["test_accuracy"]


def test_fp16_with_grad_scaler_trains_and_resumes_exactly(tmp_path, monkeypatch):
    full = fit(tiny(tmp_path, "full", steps=6, amp="fp16"))
    state = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    assert state["scaler"] is not None and state["scaler"]["scale"] > 0  # the GradScaler's state is kept
    _interrupt_at(monkeypatch, 3)
    assert fit(tiny(tmp_path, "part", steps=6, amp="fp16"))["interrupted"]
    monkeypatch.undo()
    resumed = fit(tiny(tmp_path, "part", steps=6, amp="fp16"), resume=True)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert a["scaler"] == b["scaler"] and resumed["test_accuracy"] == full["test_accuracy"]


def test_amp_auto_takes_bf16_only_where_it_is_faster(monkeypatch):
    cpu = torch.device("cpu")

    def probe_of(ms):  # a fake probe: fixed step times per precision
        return lambda precision: ms[precision] / 1e3

    monkeypatch.setattr(precision_mod, "cpu_bf16_flags", lambda: ())
    choice = precision_mod.resolve_amp("auto", cpu, probe_of({"none": 500, "bf16": 100}))
    assert choice.amp == "none" and "no native bf16" in choice.reason  # emulated: not even probed
    monkeypatch.setattr(precision_mod, "cpu_bf16_flags", lambda: ("avx512_bf16",))
    slow = precision_mod.resolve_amp("auto", cpu, probe_of({"none": 500, "bf16": 700}))
    assert slow.amp == "none" and "bf16 700 ms vs float32 500 ms" in slow.reason
    assert precision_mod.resolve_amp("auto", cpu, probe_of({"none": 500, "bf16": 480})).amp == "none"  # noise
    fast = precision_mod.resolve_amp("auto", cpu, probe_of({"none": 500, "bf16": 300}))
    assert fast.amp == "bf16" and "avx512_bf16" in fast.reason
    assert precision_mod.resolve_amp("auto", cpu).amp == "none"  # no probe: float32
    assert precision_mod.resolve_amp("fp16", cpu) == precision_mod.AmpChoice("fp16", "asked for")


def test_amp_auto_probes_the_run_records_why_and_a_resume_keeps_it(tmp_path, monkeypatch):
    assert TrainConfig().amp == "auto"
    monkeypatch.setattr(precision_mod, "cpu_bf16_flags", lambda: ("amx_bf16",))
    monkeypatch.setattr(precision_mod, "PROBE_MARGIN", 1e9)  # the (real) probe then always says bf16
    _interrupt_at(monkeypatch, 2)
    assert fit(tiny(tmp_path, "run", steps=4, amp="auto"))["interrupted"]
    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["amp"] == "bf16" and "probe of one training step" in saved["amp_reason"]  # what ran, and why
    with pytest.raises(ValueError, match="amp: saved 'bf16' vs now 'none'"):
        fit(tiny(tmp_path, "run", steps=4, amp="none"), resume=True)
    monkeypatch.setattr(precision_mod, "PROBE_MARGIN", 0.0)  # a new probe would now say float32...
    assert fit(tiny(tmp_path, "run", steps=4, amp="auto"), resume=True)["step"] == 4  # ...the run keeps bf16
    assert json.loads((tmp_path / "run" / "config.json").read_text())["amp"] == "bf16"


def test_cpu_bf16_detection_reads_the_cpu_flags(monkeypatch, tmp_path):
    flags = {"x86 AMX": ("flags\t\t: fpu avx512_bf16 amx_bf16 amx_tile\n", ("amx_bf16", "avx512_bf16")),
             "x86 AVX2 only": ("flags\t\t: fpu sse avx2 fma\n", ()),
             "Arm with BF16": ("Features\t: fp asimd sve bf16 i8mm\n", ("bf16",))}
    real_read = precision_mod.Path.read_text
    for name, (text, expected) in flags.items():
        monkeypatch.setattr(precision_mod.Path, "read_text",
                            lambda self, *a, text=text, **k: text if str(self) == "/proc/cpuinfo"
                            else real_read(self, *a, **k))
        precision_mod.cpu_bf16_flags.cache_clear()
        assert precision_mod.cpu_bf16_flags() == expected, name
    precision_mod.cpu_bf16_flags.cache_clear()


def test_signal_during_the_last_step_completes_the_run(tmp_path, monkeypatch):
    _interrupt_at(monkeypatch, 4)
    summary = fit(tiny(tmp_path, "run", steps=4))
    assert not summary["interrupted"] and summary["step"] == 4
    assert summary["test_accuracy"] is not None  # the final evaluation ran


def test_resuming_a_finished_run_has_nothing_to_do_and_keeps_its_summary(tmp_path, capsys):
    """A scheduler that requeues a finished job sees success; a changed configuration is still an error."""
    first = fit(tiny(tmp_path, "run", steps=3))
    before = (tmp_path / "run" / "summary.json").read_text()
    again = fit(tiny(tmp_path, "run", steps=3), resume=True)
    assert again["nothing_to_do"] and again["test_accuracy"] == first["test_accuracy"]
    assert (tmp_path / "run" / "summary.json").read_text() == before
    assert main(["train", "--resume", "--out", str(tmp_path / "run")]) == 0
    assert "nothing to do" in capsys.readouterr().out
    (tmp_path / "run" / "summary.json").unlink()  # stopped after its last checkpoint, before the summary
    assert fit(tiny(tmp_path, "run", steps=3), resume=True)["step"] == 3
    assert (tmp_path / "run" / "summary.json").is_file()
    with pytest.raises(ValueError, match="resume"):
        fit(tiny(tmp_path, "run", steps=3, lr=0.3), resume=True)


def test_sigterm_in_a_real_process_saves_and_exits_cleanly(tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "revnet", "train", "--dataset", "synthetic", "--steps", "100000",
           "--batch-size", "8", "--log-every", "1", "--out", str(out), "--no-memory-report"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        metrics = out / "metrics.jsonl"
        if metrics.exists() and metrics.read_text().count("\n") >= 2:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode == 130, output
    assert "Traceback" not in output
    assert "--resume --out" in output
    state = torch.load(out / "last.pt", weights_only=False)
    assert 2 <= state["step"] < 100000
    assert not (out / "last.pt.tmp").exists()


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    real = loop_mod._train_step
    count = {"n": 0}

    def poisoned(run, x, y):
        loss, correct = real(run, x, y)
        count["n"] += 1
        return (loss * float("nan") if count["n"] >= 5 else loss), correct

    monkeypatch.setattr(loop_mod, "_train_step", poisoned)
    with pytest.raises(TrainingDivergedError, match=r"loss became nan.*last\.pt.*--lr"):
        fit(tiny(tmp_path, steps=8, log_every=1, ckpt_every=2))
    state = torch.load(tmp_path / "run" / "last.pt", weights_only=False)
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_lr_schedules():
    step_cfg = TrainConfig(schedule="step", milestones=(10, 20), lr=0.1)
    assert [lr_at(s, 30, step_cfg) for s in (0, 9, 10, 19, 20, 29)] == pytest.approx(
        [0.1, 0.1, 0.01, 0.01, 0.001, 0.001])
    one = TrainConfig(schedule="onecycle", warmup=0.1, lr=0.2)
    assert lr_at(0, 100, one) == pytest.approx(0.02)
    assert lr_at(9, 100, one) == pytest.approx(0.2)
    assert lr_at(99, 100, one) < 1e-3


def test_paper_cifar_recipe_is_the_papers():
    r = RECIPES["paper-cifar"]
    assert (r["batch_size"], r["lr"], r["momentum"], r["weight_decay"]) == (100, 0.1, 0.9, 2e-4)
    assert r["milestones"] == (40_000, 60_000) and r["steps"] == 80_000
    assert r["crop_pad"] == 4 and r["flip"]


# --- bad input ------------------------------------------------------------------------

def test_config_errors():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'"):
        TrainConfig(dataset="mnist")
    with pytest.raises(ValueError, match="amp must be"):
        TrainConfig(amp="fp8")
    with pytest.raises(ValueError, match="unknown model"):
        TrainConfig(model="resnet18")


def test_existing_run_and_missing_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        fit(tiny(tmp_path, steps=2), resume=True)
    fit(tiny(tmp_path, steps=2))
    with pytest.raises(FileExistsError, match="--resume"):
        fit(tiny(tmp_path, steps=2))
    with pytest.raises(ValueError, match=r"different configuration \(lr: saved 0.1 vs now 0.05"):
        fit(tiny(tmp_path, steps=2, lr=0.05), resume=True)


def test_eval_rejects_foreign_files(tmp_path):
    bad = tmp_path / "x.pt"
    torch.save({"weights": 1}, bad)
    with pytest.raises(ValueError, match="not a revnet training checkpoint"):
        evaluate_checkpoint(bad)
    with pytest.raises(FileNotFoundError):
        evaluate_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match="not a readable torch checkpoint"):
        evaluate_checkpoint(tmp_path / "notes.txt")


def test_cli_train_eval_plot(tmp_path, capsys):
    out = tmp_path / "cli"
    args = ["train", "--dataset", "synthetic", "--steps", "3", "--batch-size", "16",
            "--no-reversible", "--out", str(out), "--no-memory-report"]
    assert main(args) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["reversible"] is False
    assert main(["eval", str(out / "best.pt")]) == 0
    assert "test accuracy" in capsys.readouterr().out
    (out / "curves.png").unlink()
    assert main(["plot", str(out)]) == 0
    assert (out / "curves.png").is_file()
    assert main(["plot", str(tmp_path)]) == 1
    with (out / "metrics.jsonl").open("a") as f:  # a process killed mid-write leaves half a line
        f.write('{"step": 4, "lo')
    assert main(["plot", str(out)]) == 0
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "metrics.jsonl").write_text("garbage\n")
    assert main(["plot", str(tmp_path / "junk")]) == 1
    assert "no JSON object per line" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="--resume needs --out"):
        main(["train", "--resume"])
    with pytest.raises(SystemExit, match="paper-imagenet documents .* Pass --dataset"):
        main(["train", "--recipe", "paper-imagenet"])


def test_cli_first_line_says_when_a_model_has_nothing_to_rebuild():
    from revnet.cli.train import _mode

    assert _mode(TrainConfig(model="revnet38")) == "reversible"
    assert _mode(TrainConfig(model="revvit_mini", reversible=False)) == "plain backprop"
    assert _mode(TrainConfig(model="vit_mini")) == "no reversible blocks: plain backprop"  # not "reversible"
    assert _mode(TrainConfig(model="resnet32")) == "no reversible blocks: plain backprop"


def test_bf16_autocast_training_and_fractional_epochs(tmp_path):
    config = tiny(tmp_path, steps=None, epochs=0.5, amp="bf16")  # 96 samples / 16 = 6 steps per epoch
    summary = fit(config)
    assert summary["step"] == 3 and summary["total_steps"] == 3
    assert summary["test_accuracy"] is not None


def test_compiled_training_matches_eager_and_resumes_either_way(tmp_path, monkeypatch):
    """--compile runs revnet.compile (aot_eager here: the same graphs, no code generation)."""
    eager = fit(tiny(tmp_path, "eager", steps=4))
    compiled = fit(tiny(tmp_path, "compiled", steps=4, compile="aot_eager"))
    assert compiled["config"]["compile"] == "aot_eager" and compiled["first_step_seconds"] > 0
    a = torch.load(tmp_path / "eager" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "compiled" / "last.pt", weights_only=False)["model"]
    assert set(a) == set(b)  # the same keys: checkpoints are interchangeable
    assert all(torch.allclose(a[k].float(), b[k].float(), rtol=1e-3, atol=1e-4) for k in a)
    assert abs(eager["test_accuracy"] - compiled["test_accuracy"]) <= 0.05
    _interrupt_at(monkeypatch, 2)
    assert fit(tiny(tmp_path, "switch", steps=4, compile="aot_eager"))["interrupted"]
    monkeypatch.undo()
    assert fit(tiny(tmp_path, "switch", steps=4), resume=True)["step"] == 4  # resumed eagerly


def test_compile_without_a_compiler_trains_eagerly_and_says_so(tmp_path, monkeypatch, caplog):
    import revnet.training.setup as run_mod

    monkeypatch.setattr(run_mod.shutil, "which", lambda name: None)
    with caplog.at_level("WARNING"):
        summary = fit(tiny(tmp_path, steps=2, compile="inductor"))
    assert summary["config"]["compile"] is None  # config.json says what ran
    assert "found no compiler" in caplog.text and "--no-compile" in caplog.text


def test_compile_flags(tmp_path):
    from revnet.cli import build_parser
    from revnet.cli.train import _train_config

    def parsed(*flags):
        return _train_config(build_parser().parse_args(["train", *flags, "--out", str(tmp_path / "x")]))

    assert parsed().compile is None
    assert parsed("--compile").compile == "inductor"
    assert parsed("--compile", "aot_eager").compile == "aot_eager"
    assert parsed("--recipe", "fashion-mnist-long", "--compile").compile == "inductor"
    assert parsed("--compile", "--no-compile").compile is None
    with pytest.raises(ValueError, match="compile must be"):
        TrainConfig(compile="")


def test_memory_budget_flags(tmp_path):
    """``none`` overrides a recipe's budget (regression: an absent flag read as "none")."""
    from revnet.cli import build_parser
    from revnet.cli.train import _train_config

    def parsed(*flags):
        return _train_config(build_parser().parse_args(["train", *flags, "--out", str(tmp_path / "x")]))

    assert parsed().memory_budget is None
    assert parsed("--memory-budget", "min").memory_budget == "min"
    assert parsed("--memory-budget", "None").memory_budget is None
    assert parsed("--memory-budget", "2GiB").memory_budget == "2GiB"
    assert parsed("--no-reversible", "--memory-budget", "min").memory_budget == "min"  # plans nothing
    RECIPES["budgeted"] = dict(memory_budget="min")
    try:
        assert parsed("--recipe", "budgeted").memory_budget == "min"
        assert parsed("--recipe", "budgeted", "--memory-budget", "none").memory_budget is None
    finally:
        del RECIPES["budgeted"]


def test_training_keeps_freed_host_memory_for_the_next_step(tmp_path, monkeypatch):
    """A run keeps freed memory in the process (memory.measure.keep_freed_memory): without it, each
    large step had its memory faulted in again (RevNet-164 b128 plain: 5.6 -> 2.9 s with it)."""
    import revnet.training.setup as run_mod

    calls = []
    monkeypatch.setattr(run_mod, "keep_freed_memory", lambda: calls.append(1) or True)
    fit(tiny(tmp_path, steps=1))
    assert calls


def test_the_optimizer_in_backward_trains_as_the_usual_optimizer(tmp_path):
    """--optimizer-in-backward: the same weights as the usual step (AdamW with its no-decay group, the
    schedule), checkpoints that resume it; what it cannot take is refused."""
    kw = dict(model="revvit_mini", optimizer="adamw", lr=3e-3, weight_decay=0.05, steps=6, ckpt_every=2)
    fit(tiny(tmp_path, "usual", **kw))
    summary = fit(tiny(tmp_path, "in_backward", optimizer_in_backward=True, **kw))
    assert summary["config"]["optimizer_in_backward"] is True
    usual = torch.load(tmp_path / "usual" / "last.pt", weights_only=False)["model"]
    inb = torch.load(tmp_path / "in_backward" / "last.pt", weights_only=False)
    assert max(((inb["model"][k] - v).abs().max() / v.abs().max().clamp_min(1e-12)).item()
               for k, v in usual.items() if v.is_floating_point()) <= 1e-6
    assert len(inb["optimizer"]["optimizers"]) == sum(1 for k in usual if "running" not in k
                                                        and "num_batches" not in k)
    with pytest.raises(ValueError, match="cannot accumulate over micro-batches"):
        tiny(tmp_path, "x", optimizer_in_backward=True, accum_steps=2)
    with pytest.raises(ValueError, match="fp16's loss scaling"):
        tiny(tmp_path, "x", optimizer_in_backward=True, amp="fp16")


def test_fine_tuning_a_converted_model_from_a_checkpoint(tmp_path):
    """--init loads a residual model's weights (a head of another shape starts fresh), --convert makes
    it reversible; the run resumes and evaluates as the converted model, and its checkpoint loads
    into the unconverted one (the same keys)."""
    base = dict(model="vit_mini", optimizer="adamw", lr=3e-3, weight_decay=0.05, steps=6)
    fit(tiny(tmp_path, "pre", **base))
    pre = tmp_path / "pre" / "last.pt"
    kw = dict(base, init=str(pre), convert="momentum", convert_gamma=0.8, steps=8,
              synthetic={**TINY, "num_classes": 4}, drift_guard_every=4)
    summary = fit(tiny(tmp_path, "fine", **kw))
    assert summary["reversible"] is True and summary["step"] == 8
    rows = [json.loads(line) for line in (tmp_path / "fine" / "metrics.jsonl").read_text().splitlines()]
    drift = [r["drift"]["transformer.blocks.sequence"] for r in rows if "drift" in r]
    assert len(drift) == 2 and max(drift) < 1e-4  # the guard watches the converted stack's rebuild
    fine = torch.load(tmp_path / "fine" / "last.pt", weights_only=False)
    start = torch.load(pre, weights_only=False)["model"]
    assert set(fine["model"]) == set(start)  # the unconverted model's keys
    assert fine["model"]["head.weight"].shape[0] == 4 and start["head.weight"].shape[0] == 10
    assert evaluate_checkpoint(tmp_path / "fine" / "last.pt")["test_accuracy"] == summary["test_accuracy"]
    pre.rename(tmp_path / "moved.pt")  # a resumed run needs its own checkpoint only
    assert fit(tiny(tmp_path, "fine", **kw), resume=True)["step"] == 8
    with pytest.raises(ValueError, match="reversible already"):
        tiny(tmp_path, "x", model="revvit_mini", convert="momentum")
    vit = dict(model="vit_mini", convert="momentum")
    assert tiny(tmp_path, "x", **vit, convert_gamma="auto").convert_gamma == "auto"
    with pytest.raises(ValueError, match="convert_gamma must be in .* to train reversibly, or 'auto'"):
        tiny(tmp_path, "x", **vit, convert_gamma="fast")
    # two-stream at a small gamma in exact mode: the guard sees a rebuild without error, and the
    # checkpoint carries the switch (a resumed run keeps exact mode)
    exact = dict(kw, init=str(tmp_path / "moved.pt"), convert="two-stream", convert_gamma=0.25, exact=True)
    fit(tiny(tmp_path, "exact", **exact))
    rows = [json.loads(line) for line in (tmp_path / "exact" / "metrics.jsonl").read_text().splitlines()]
    assert [r["drift"]["transformer.blocks.sequence"] for r in rows if "drift" in r] == [0.0, 0.0]
    modes = torch.load(tmp_path / "exact" / "last.pt", weights_only=False)["engine_modes"]["exact"]
    assert modes and all(modes.values())
    with pytest.raises(FileNotFoundError, match="--init: no file"):
        fit(tiny(tmp_path, "y", **{**kw, "init": str(tmp_path / "gone.pt")}))
