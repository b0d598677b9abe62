"""The study scripts in scripts/ write the documents they claim to (their runs are too long for tests)."""

import argparse
import importlib.util
import sys
from pathlib import Path

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


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
    assert "--tune-lr 0.001 0.002 0.004" in text  # the command that made it
    assert f"| {rev} | 89.00 | **90.00** | 88.00 |" in text  # the sweep, best rate in bold
    assert f"| {res} | 88.00 | 89.00 | **89.50** |" in text
    assert f"| {res} | 0.879M | 0.004 | 89.45 +- 0.10 |" in text  # each row says its rate
    assert "AdamW peak lr per row" in text
    assert "minus ViT-mini (residual): +0.50 points" in text
    # Without a sweep the table has no rate column (the earlier studies' layout).
    study.write_doc(rows, argparse.Namespace(**{**vars(args), "tune_lr": None}), [], doc, "abc1234", {})
    text = doc.read_text()
    assert "peak lr |" not in text and "AdamW lr 0.002" in text
