"""Gradient-angle telemetry and the drift guard inside ``fit``: logged, plotted, resumable."""

import json
import os
import signal

import pytest
import torch

import revnet.training.loop as loop_mod
from revnet.cli import build_parser
from revnet.cli.train import _train_config
from revnet.training import TrainConfig, evaluate_checkpoint, fit, read_metrics

TINY = {"num_samples": 64, "image_size": 8, "channels": 1}


def tiny_config(tmp_path, name: str, **kw):
    fields = dict(model="revnet38", dataset="synthetic", synthetic=TINY, steps=6, batch_size=16, lr=0.1,
                  amp="none", log_every=3, ckpt_every=100, out=str(tmp_path / name))
    return TrainConfig(**{**fields, **kw})


def test_telemetry_in_fit_is_logged_plotted_and_changes_nothing(tmp_path):
    fit(tiny_config(tmp_path, "plain"))
    fit(tiny_config(tmp_path, "watched", grad_angle_every=2, drift_guard_every=3, drift_guard_action="warn",
                    drift_guard_threshold=1e-12))
    rows = read_metrics(tmp_path / "watched")
    angles = [r for r in rows if "grad_angle_deg" in r]
    assert [r["step"] for r in angles] == [0, 2, 4]
    assert all(0 <= r["grad_angle_deg"] < 1 and "stages.0" in r["grad_angle_by_stage"] for r in angles)
    checks = [r for r in rows if "drift" in r]
    assert [r["step"] for r in checks] == [0, 3] and all(len(r["drift"]) == 3 for r in checks)
    assert any(r.get("event") == "drift" and r["action"] == "warn" for r in rows)
    assert (tmp_path / "watched" / "curves.png").is_file()
    # Same weights as the run without telemetry: every check left the training state alone.
    a = torch.load(tmp_path / "plain" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "watched" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_drift_guard_in_fit_switches_to_exact_mode(tmp_path):
    fit(tiny_config(tmp_path, "guarded", drift_guard_every=2, drift_guard_threshold=1e-12,
                    drift_guard_action="exact"))
    rows = read_metrics(tmp_path / "guarded")
    events = [r for r in rows if r.get("event") == "drift"]
    assert {e["step"] for e in events} == {0} and all(e["action"] == "exact" for e in events)
    later = [r for r in rows if "drift" in r and r["step"] > 0]
    assert later and all(v == 0.0 for r in later for v in r["drift"].values())  # bit-exact from then on


def test_revvit_under_the_drift_guard_and_gradient_angle(tmp_path):
    """The transformer's sequence is watched like a RevNet's: angle logged, guard switches it to exact."""
    fit(tiny_config(tmp_path, "vit", model="revvit_mini", optimizer="adamw", lr=1e-3, grad_angle_every=2,
                    drift_guard_every=2, drift_guard_threshold=1e-12, drift_guard_action="exact"))
    rows = read_metrics(tmp_path / "vit")
    angles = [r["grad_angle_deg"] for r in rows if "grad_angle_deg" in r]
    assert len(angles) == 3 and all(0 <= a < 1 for a in angles)
    assert any(r.get("event") == "drift" and r["action"] == "exact" for r in rows)
    later = [r for r in rows if "drift" in r and r["step"] > 0]
    assert later and all(v == 0.0 for r in later for v in r["drift"].values())


def test_exact_training_runs_under_bf16_and_bad_configs_are_refused(tmp_path):
    summary = fit(tiny_config(tmp_path, "exact", exact=True, amp="bf16", grad_angle_every=3))
    assert summary["step"] == 6 and 0 <= summary["test_accuracy"] <= 1
    angles = [json.loads(line) for line in (tmp_path / "exact" / "metrics.jsonl").read_text().splitlines()]
    assert [r["grad_angle_deg"] for r in angles if "grad_angle_deg" in r] == [0.0, 0.0]  # exact rebuilds
    with pytest.raises(ValueError, match="exact mode needs a reversible model"):
        tiny_config(tmp_path, "x", model="resnet32", exact=True)
    with pytest.raises(ValueError, match="drift_guard_action must be one of"):
        tiny_config(tmp_path, "x", drift_guard_action="panic")
    with pytest.raises(ValueError, match="must be > 0"):
        tiny_config(tmp_path, "x", grad_angle_every=0)
    args = build_parser().parse_args(["train", "--exact", "--grad-angle-every", "50", "--drift-guard-every",
                                      "10", "--drift-guard-action", "store", "--out", str(tmp_path / "c")])
    config = _train_config(args)
    assert (config.exact, config.grad_angle_every, config.drift_guard_every, config.drift_guard_action) == (
        True, 50, 10, "store")


def test_resume_keeps_what_the_drift_guard_switched(tmp_path, monkeypatch):
    """The guard's switches live outside the state dict; last.pt carries them, so a run
    stopped after a switch and resumed ends with the weights of an uninterrupted one."""
    guard = dict(drift_guard_every=4, drift_guard_threshold=1e-12, drift_guard_action="exact")
    fit(tiny_config(tmp_path, "full", **guard))
    real, count = loop_mod._train_step, {"n": 0}

    def interrupted(run, x, y):
        out = real(run, x, y)
        count["n"] += 1
        if count["n"] == 2:  # after the switch at step 0, before the next check at step 4
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop_mod, "_train_step", interrupted)
    assert fit(tiny_config(tmp_path, "part", **guard))["interrupted"]
    monkeypatch.undo()
    state = torch.load(tmp_path / "part" / "last.pt", weights_only=False)
    assert state["engine_modes"]["exact"] and all(state["engine_modes"]["exact"].values())
    fit(tiny_config(tmp_path, "part", **guard), resume=True)
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    full = evaluate_checkpoint(tmp_path / "full" / "last.pt")
    assert evaluate_checkpoint(tmp_path / "part" / "last.pt")["test_accuracy"] == full["test_accuracy"]
