"""Byte-level text: the data (stdlib source, a folder), training a language model on it
(bits per byte, resume, the closing memory count) and sampling from its checkpoint."""

import json
import math
import os
import signal

import pytest
import torch

import revnet.training.loop as loop_mod
from revnet.cli import main
from revnet.training import TrainConfig, evaluate_checkpoint, fit
from revnet.training.footprint import saved_bytes_of_run
from revnet.training.generate import generate_text
from revnet.training.text import (
    HELD_OUT,
    TextLoader,
    default_text_dir,
    eval_windows,
    load_text,
    train_windows,
)


def _folder(tmp_path, n=12):
    for i in range(n):
        (tmp_path / f"f{i:02d}.txt").write_text(f"file {i} " * 50)
    return tmp_path


def test_load_split_and_windows(tmp_path):
    train, test = load_text(_folder(tmp_path))
    assert len(train) + len(test) == 12 and len(test) == 1
    x, y = train_windows(train, 4, 16, seed=0, epoch=0, step=3)
    assert x.shape == y.shape == (4, 16) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = train_windows(train, 4, 16, seed=0, epoch=0, step=3)
    assert torch.equal(x, x2)
    total = sum(w[1].numel() for w in eval_windows(test, 16))
    assert total == sum(len(s) - 1 for s in test)


def test_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text(tmp_path / "missing")
    with pytest.raises(ValueError, match="no readable"):
        load_text(tmp_path)


def test_held_out_present_in_stdlib():
    assert all((default_text_dir() / n).is_file() for n in HELD_OUT)


def test_default_corpus_is_stdlib():
    train, test = load_text()
    assert len(test) == len(HELD_OUT) and sum(len(s) for s in train) > 1_000_000


# --------------------------------------------------------------------------------------
# The loader, training on text, generation
# --------------------------------------------------------------------------------------

def _code_folder(tmp_path, n=10):
    """Ten small Python-like files: enough bytes for windows, one held out."""
    folder = tmp_path / "corpus"
    folder.mkdir(exist_ok=True)
    for i in range(n):
        body = "".join(f"def f{i}_{j}(x):\n    return x * {j} + {i}\n\n" for j in range(40))
        (folder / f"m{i:02d}.py").write_text(body)
    return folder


def test_text_loader_ranks_share_each_global_batch_and_evaluation_covers_every_byte(tmp_path):
    train, test = load_text(_code_folder(tmp_path))
    whole = TextLoader(train, 8, 16, train=True, seed=3)
    halves = [TextLoader(train, 4, 16, train=True, seed=3, rank=r, world_size=2) for r in range(2)]
    assert len(whole) == len(halves[0]) == sum(len(s) for s in train) // (8 * 16)
    for (x, y), (x0, y0), (x1, y1) in zip(whole.epoch(1, 2), halves[0].epoch(1, 2), halves[1].epoch(1, 2),
                                          strict=True):
        assert torch.equal(x, torch.cat([x0, x1])) and torch.equal(y, torch.cat([y0, y1]))
    later = next(iter(whole.epoch(1, 3)))  # resuming at batch 3 gives batch 3
    assert torch.equal(later[0], list(whole.epoch(1))[3][0])
    shards = [TextLoader(test, 2, 16, train=False, rank=r, world_size=2) for r in range(2)]
    predicted = sum(y.numel() for shard in shards for _, y in shard.epoch(0))
    assert predicted == sum(len(s) - 1 for s in test)
    assert whole.shape_info() == {"vocab_size": 256, "context_length": 16}


def _lm(tmp_path, name="run", **kw):
    fields = dict(model="revgpt_mini", dataset="text", data_dir=str(_code_folder(tmp_path)), steps=6,
                  batch_size=4, context_length=32, optimizer="adamw", lr=3e-3, amp="none", log_every=2,
                  eval_every=3, ckpt_every=3, channels_last=False, out=str(tmp_path / name))
    fields.update(kw)
    return TrainConfig(**fields)


def test_fit_on_text_reports_bits_per_byte_and_keeps_the_lowest(tmp_path):
    summary = fit(_lm(tmp_path))
    assert summary["test_bits_per_byte"] == pytest.approx(summary["test_loss"] / math.log(2))
    assert summary["best_test_bits_per_byte"] <= summary["test_bits_per_byte"]
    assert summary["best_test_bits_per_byte"] < 8.0  # 8 bits: no better than a uniform guess over bytes
    assert summary["vocab_size"] == 256 and summary["context_length"] == 32 and summary["tokens_per_s"] > 0
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    tests = [r for r in rows if "test_bits_per_byte" in r]
    assert [r["step"] for r in tests] == [3, 6]
    best = torch.load(tmp_path / "run" / "best.pt", weights_only=False)
    assert best["best"] == min(r["test_bits_per_byte"] for r in tests)
    again = evaluate_checkpoint(tmp_path / "run" / "last.pt")
    assert again["test_bits_per_byte"] == pytest.approx(summary["test_bits_per_byte"], rel=1e-6)
    report = saved_bytes_of_run(summary["config"], summary)  # the closing memory line of a text run
    assert report is not None and report["reversible_bytes"] < report["plain_bytes"]


def test_text_run_resumed_mid_way_ends_with_the_uninterrupted_weights(tmp_path, monkeypatch):
    fit(_lm(tmp_path, "full"))
    real, count = loop_mod._train_step, {"n": 0}

    def stop_after_two(run, x, y):  # SIGTERM to this process after the second step
        out = real(run, x, y)
        count["n"] += 1
        if count["n"] == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(loop_mod, "_train_step", stop_after_two)
    assert fit(_lm(tmp_path, "part"))["interrupted"]
    monkeypatch.undo()
    resumed = fit(_lm(tmp_path, "part"), resume=True)
    assert resumed["step"] == 6 and not resumed["interrupted"]
    a = torch.load(tmp_path / "full" / "last.pt", weights_only=False)["model"]
    b = torch.load(tmp_path / "part" / "last.pt", weights_only=False)["model"]
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_language_models_and_image_data_do_not_mix():
    with pytest.raises(ValueError, match="language model: train it on --dataset text"):
        TrainConfig(model="revgpt_mini", dataset="fashion-mnist")
    with pytest.raises(ValueError, match="dataset 'text' needs a language model"):
        TrainConfig(model="revnet38", dataset="text")
    with pytest.raises(ValueError, match="context_length must be >= 1"):
        TrainConfig(model="revgpt_mini", dataset="text", context_length=0)


def test_generate_samples_bytes_and_refuses_what_it_cannot_do(tmp_path, capsys):
    fit(_lm(tmp_path, steps=2, eval_every=2))
    best = tmp_path / "run" / "best.pt"
    one = generate_text(best, "def ", max_bytes=20, seed=1)
    assert one == generate_text(best, "def ", max_bytes=20, seed=1)  # seeded
    assert len(one["text"].encode("utf-8", errors="surrogatepass")) <= 20 * 3 and one["step"] == 2
    greedy = generate_text(best, "def ", max_bytes=10, temperature=0)
    assert greedy == generate_text(best, "def ", max_bytes=10, temperature=0, seed=7)
    assert main(["generate", str(best), "--prompt", "return ", "--max-bytes", "12"]) == 0
    assert capsys.readouterr().out.startswith("return ")
    assert main(["generate", str(best), "--prompt", "x" * 33]) == 1
    assert "shorten --prompt to at most 32 bytes" in capsys.readouterr().err
    assert main(["generate", str(best), "--temperature", "-1"]) == 1
    assert "temperature must be >= 0" in capsys.readouterr().err
    image = TrainConfig(model="revnet38", dataset="synthetic", steps=1, batch_size=8, amp="none",
                        synthetic={"num_samples": 16, "image_size": 8, "channels": 1},
                        out=str(tmp_path / "img"))
    fit(image)
    assert main(["generate", str(tmp_path / "img" / "best.pt")]) == 1
    assert "an image classifier" in capsys.readouterr().err


def test_text_data_errors_name_the_fix(tmp_path):
    short = tmp_path / "short"
    short.mkdir()
    for i in range(3):
        (short / f"{i}.txt").write_text("tiny")
    with pytest.raises(ValueError, match="--context-length"):
        fit(_lm(tmp_path, data_dir=str(short)))
    one = tmp_path / "one"
    one.mkdir()
    (one / "a.txt").write_text("x" * 500)
    with pytest.raises(ValueError, match="no held-out file"):
        fit(_lm(tmp_path, "r2", data_dir=str(one)))
