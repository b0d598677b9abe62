"""``revnet bench drift``: rebuild error against depth and precision, and exact mode's cost."""

import json

import pytest
import torch

import revnet
from revnet.bench.drift import DRIFT_PRECISIONS, drift, exact_cost
from revnet.bench.memory import memory_point


def test_bench_drift_grows_with_depth_and_is_zero_in_exact_mode():
    model = revnet.create_model("revnet38", in_chans=1)
    trained = {k: v.clone() for k, v in model.state_dict().items()}
    result = drift("revnet38", state_dict=trained, images=torch.randn(2, 1, 8, 8), depths=(1, 8),
                         precisions=DRIFT_PRECISIONS, exact_precisions=("float32",))
    by = {(s["weights"], s["precision"], s["exact"], s["depth"]): s for s in result["summary"]}
    assert len(by) == 2 * 5 * 2 and {p["sequence"] for p in result["points"]} == {
        "stages.0.0", "stages.1.1", "stages.2.1"}
    for w in ("fresh", "trained"):
        f64, f32, b16, b16_model = (by[(w, p, False, 8)]["rel_error"] for p in DRIFT_PRECISIONS)
        assert 0 < f64 < 1e-12 < f32 < 1e-4 < b16_model  # float64 << float32 << a bf16 stream
        assert b16 < 1e-2 < b16_model  # under autocast the engine keeps the stream in float32
        assert by[(w, "float32", False, 8)]["rel_error"] > by[(w, "float32", False, 1)]["rel_error"]
        assert by[(w, "float32", True, 8)]["rel_error"] == 0.0  # exact mode
    # Depths past a sequence's own length repeat its blocks.
    assert any(p["depth"] > p["blocks_in_sequence"] for p in result["points"])


def test_bench_drift_command_writes_table_json_and_png(tmp_path, capsys):
    from revnet.cli import main

    ckpt = tmp_path / "best.pt"
    torch.save({"model": revnet.create_model("revnet38", in_chans=3).state_dict(),
                "config": {"model": "revnet38", "dataset": "synthetic",
                           "synthetic": {"num_samples": 16, "image_size": 8, "channels": 3}}}, ckpt)
    assert main(["bench", "drift", "--quick", "--checkpoint", str(ckpt), "--out", str(tmp_path),
                 "--precisions", "float32", "bf16", "--exact-precisions", "float32", "--no-cost"]) == 0
    out = capsys.readouterr().out
    assert "N=4" in out and "exact" in out
    saved = json.loads((tmp_path / "drift.json").read_text())
    assert saved["config"]["trained"] and saved["config"]["dataset"] == "synthetic"
    assert (tmp_path / "drift.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="not a revnet train checkpoint"):
        torch.save({"weights": 1}, tmp_path / "bad.pt")
        main(["bench", "drift", "--quick", "--checkpoint", str(tmp_path / "bad.pt"), "--out", str(tmp_path)])


def test_exact_cost_times_both_modes_and_memory_point_takes_exact():
    cost = exact_cost("revnet38", batch=4, image_size=8, in_chans=1, amps=("none",), repeats=1,
                            warmup=0, memory=False)
    run = cost["speed"]["none"]
    assert run["ratio"] > 0 and len(run["exact"]["times_s"]) == len(run["float"]["times_s"]) == 1
    point = memory_point("revnet", model="revnet38", batch=2, image_size=8, in_chans=1, exact=True)
    assert point["exact"] is True and point["saved_bytes"] > 0
    with pytest.raises(ValueError, match="exact mode needs a RevNet"):
        memory_point("resnet", model="resnet32", batch=2, image_size=8, exact=True)
