"""``revnet bench memory --breakdown``: where a step's bytes go per process, at 2 gloo processes, on
the zoo's CPU-sized transformers; the table, and the CLI's refusals."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from revnet import cli
from revnet.bench.breakdown import MODES, static_mib
from revnet.bench.tables import breakdown_table

SRC = Path(__file__).resolve().parents[2] / "src"


@pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()), reason="needs gloo")
def test_breakdown_at_two_processes_shards_frees_and_rebuilds(tmp_path):
    # Outside torchrun the command launches itself under it (2 processes, one thread each).
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = str(SRC)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "revnet", "bench", "memory", "--breakdown", "--models",
                           "revgpt_mini", "revvit_mini", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    assert "launching:" in proc.stdout and "--nproc-per-node=2" in proc.stdout
    result = json.loads((out / "breakdown.json").read_text())
    assert result["config"]["world_size"] == 2 and len(result["per_rank"]) == 2
    assert "environment" in result and result["command"].endswith("--nproc 2")
    assert (out / "breakdown.png").read_bytes()[:4] == b"\x89PNG"
    assert "| revgpt_mini | fsdp reversible |" in (out / "breakdown.md").read_text()
    for model in ("revgpt_mini", "revvit_mini"):
        row = {r["mode"]: r for r in result["rows"] if r["model"] == model}
        assert list(row) == list(MODES)
        plain, rev, fsdp = row["ddp plain"], row["ddp reversible"], row["fsdp reversible"]
        freed = row["fsdp reversible + optimizer in backward"]
        # Sharding each block (and the root) halves parameters, gradients and AdamW state at 2 ranks.
        for r in (fsdp, freed):
            assert static_mib(r) <= 0.55 * static_mib(plain) and r["ratio"] <= 0.55, (model, r)
        assert fsdp["grads_mib"] <= 0.55 * plain["grads_mib"]
        # Stepped in backward, a few groups' sharded gradients are alive at most, never all of them.
        assert 0 < freed["grads_mib"] < 0.5 * fsdp["grads_mib"] < plain["grads_mib"], (model, freed)
        assert freed["params_mib"] == fsdp["params_mib"] and freed["optimizer_mib"] == fsdp["optimizer_mib"]
        assert 0 < fsdp["grads_in_flight_mib"] < plain["grads_mib"] and plain["grads_in_flight_mib"] is None
        # DDP keeps its buckets whatever steps when: its gradients are all there either way.
        ddp_freed = row["ddp reversible + optimizer in backward"]
        assert ddp_freed["grads_mib"] == rev["grads_mib"] == plain["grads_mib"]
        assert rev["activations_mib"] < plain["activations_mib"]
        assert rev["params_mib"] == plain["params_mib"] and rev["optimizer_mib"] == plain["optimizer_mib"]
        assert plain["optimizer_mib"] == pytest.approx(2 * plain["params_mib"])  # AdamW's two moments
    assert "revvit_mini  fsdp reversible + optimizer in backward" in proc.stdout  # rank 0's table


def test_breakdown_table_rows_and_ratio():
    rows = [{"model": "m", "mode": mode, "params_mib": p, "grads_mib": p, "optimizer_mib": 2 * p,
             "activations_mib": a, "ratio": p / 10.0} for mode, p, a in
            (("ddp plain", 10.0, 50.0), ("ddp reversible", 10.0, 1.0), ("fsdp reversible", 5.0, 1.0))]
    header, table = breakdown_table({"rows": rows})
    assert header[-1] == "params+grads+optimizer MiB (vs ddp plain)"
    assert table[0] == ["m", "ddp plain", "10.0", "10.0", "20.0", "50.0", "90.0", "40.0 (1.00x)"]
    assert table[2] == ["m", "fsdp reversible", "5.0", "5.0", "10.0", "1.0", "21.0", "20.0 (0.50x)"]


@pytest.mark.parametrize("argv, message", [
    (["--models", "revvit_base", "nonesuch"], r"unknown model nonesuch\. The breakdown takes: .*revgpt2_small"
                                              r".*revvit_base.*revvit_large"),
    (["--models", "resnet32"], r"resnet32 is not a reversible vision or language transformer\. The "),
    (["--models"], r"no models given\."),
    (["--nproc", "1"], r"--nproc must be >= 2, got 1: the FSDP/DDP comparison needs >= 2 processes"),
    (["--units", "4"], r"--units is for the sweep.*Fix: drop --units"),
    (["--device", "cuda"], r"it runs on CPU processes \(gloo\); got --device cuda"),
])
def test_breakdown_refuses_bad_input_before_launching(argv, message, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("launched"))
    with pytest.raises(SystemExit, match=r"revnet bench memory --breakdown: " + message):
        cli.main(["bench", "memory", "--breakdown", *argv])


def test_nproc_without_breakdown_is_refused():
    with pytest.raises(SystemExit, match="--nproc is the process count of --breakdown"):
        cli.main(["bench", "memory", "--nproc", "2"])
