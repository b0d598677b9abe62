"""DDP on CPU: 2 processes with gloo under torchrun, tiny models, against one process.

The 2-process runs happen in one torchrun launch (tests/training/_ddp_worker.py): it runs all the
fits and direct DDP checks in one process group and writes their results, then kills a rank
in the middle of a `revnet train` run. Everything else runs in this process.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch import nn

import revnet.cli.train as cli_train
from revnet import create_model
from revnet.cli import build_parser, main
from revnet.training import RECIPES, TrainConfig, evaluate_checkpoint, fit, lr_at
from revnet.training.distributed import DistributedError, init_from_env, launch_command
from revnet.training.setup import auto_nproc, build_model, load_init, per_process_batch
from revnet.training.shards import load_checkpoint

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

WORKER = Path(__file__).with_name("_ddp_worker.py")
TINY = {"num_samples": 64, "image_size": 8, "channels": 3}  # as in the worker


def _config(out: Path, name: str, **kw) -> TrainConfig:
    fields = dict(model="revnet38", dataset="synthetic", synthetic=TINY, steps=4, batch_size=16, lr=0.1,
                  amp="none", log_every=2, ckpt_every=2, norm="group", out=str(out / name))
    fields.update(kw)
    return TrainConfig(**fields)


def _torchrun(out: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(WORKER), str(out)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir / "last.pt")["model"]  # full or sharded (read whole here)


def _max_rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """Largest |a - b| / max|b| over the floating-point tensors of two state dicts."""
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max() / b[k].abs().max().clamp_min(1e-12)).item()
               for k in a if a[k].is_floating_point())


@pytest.fixture(scope="module")
def ddp(tmp_path_factory) -> tuple[Path, dict, dict, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp")
    proc = _torchrun(out)
    files = [out / f"results_rank{r}.json" for r in (0, 1)]
    assert all(f.is_file() for f in files), proc.stdout[-3000:] + proc.stderr[-6000:]
    ranks = [json.loads(f.read_text()) for f in files]
    return out, ranks[0], ranks[1], proc


# --- equivalence ---------------------------------------------------------------------------

def test_two_ranks_at_b_equal_one_process_at_2b_groupnorm(ddp, tmp_path):
    out, r0, _, _ = ddp
    fit(_config(tmp_path, "one"))  # batch_size is global: 16 in one process = 2 x 8 under DDP
    assert r0["rev"]["world_size"] == 2 and r0["rev"]["step"] == 4
    assert _max_rel_diff(_weights(out / "rev"), _weights(tmp_path / "one")) < 1e-4


def test_ddp_reversible_equals_ddp_plain_autograd(ddp):
    out, _, _, _ = ddp
    assert _max_rel_diff(_weights(out / "rev"), _weights(out / "plain")) < 1e-4
    # BatchNorm in training mode (per-process statistics), in exact mode: the rebuilds are bit-exact,
    # so reversible == plain to the last bit. (In float32 the rebuild's rounding, which BatchNorm
    # over 8 samples of 2x2 maps amplifies, left a gap of 6e-3 on one CPU and 4e-2 on another: a
    # tolerance that passes on one machine and fails on the next.) The running statistics were
    # updated once per forward, not again in the recomputation.
    rev, plain = _weights(out / "bn_rev"), _weights(out / "bn_plain")
    assert _max_rel_diff(rev, plain) <= 1e-6
    counts = {k: int(v) for k, v in rev.items() if k.endswith("num_batches_tracked")}
    assert counts and set(counts.values()) == {4}
    assert all(int(plain[k]) == 4 for k in counts)


def test_ddp_trains_a_revvit_as_one_process_and_as_plain_autograd(ddp, tmp_path):
    out, r0, _, _ = ddp
    # SGD: AdamW divides by sqrt(v), so rounding in near-zero gradients becomes whole steps.
    fit(_config(tmp_path, "vit_one", model="revvit_mini", lr=0.05))
    assert r0["vit_rev"]["world_size"] == 2 and r0["vit_rev"]["model"] == "revvit_mini"
    assert _max_rel_diff(_weights(out / "vit_rev"), _weights(tmp_path / "vit_one")) < 1e-4
    assert _max_rel_diff(_weights(out / "vit_rev"), _weights(out / "vit_plain")) < 1e-4


def test_ddp_trains_a_language_model_on_text_as_one_process(ddp, tmp_path):
    from _ddp_worker import LM, write_corpus

    out, r0, _, _ = ddp
    corpus = write_corpus(tmp_path / "corpus")
    fit(_config(tmp_path, "lm_one", **LM, data_dir=str(corpus)))
    assert r0["lm_rev"]["world_size"] == 2 and r0["lm_rev"]["test_bits_per_byte"] < 8
    assert _max_rel_diff(_weights(out / "lm_rev"), _weights(tmp_path / "lm_one")) < 1e-4


def test_the_optimizer_in_backward_under_ddp_steps_after_the_all_reduce(ddp, tmp_path):
    """--optimizer-in-backward under DDP: each parameter steps from DDP's communication hook, on the
    averaged gradient, so the run ends where the usual optimizer's does (and where one process at
    the global batch does)."""
    out, r0, _, _ = ddp
    assert r0["in_backward"]["config"]["optimizer_in_backward"] is True
    assert _max_rel_diff(_weights(out / "in_backward"), _weights(out / "rev")) <= 1e-6
    fit(_config(tmp_path, "one_in_backward", optimizer_in_backward=True))
    assert _max_rel_diff(_weights(out / "in_backward"), _weights(tmp_path / "one_in_backward")) < 1e-4


def test_fsdp_per_block_trains_as_ddp_and_resumes_exactly(ddp, tmp_path):
    """--fsdp: every coupling and the root sharded with FSDP2; the run ends on DDP's weights (the same
    gradients, reduce-scattered instead of all-reduced); its checkpoints are sharded (each rank wrote
    its part with torch.distributed.checkpoint), or with --checkpoint full gathered into one file; one
    process evaluates either and starts from it (--init); a run stopped and resumed ends where the
    uninterrupted one does."""
    out, r0, _, _ = ddp
    assert r0["fsdp"]["config"]["fsdp"] is True and r0["fsdp"]["world_size"] == 2
    assert _max_rel_diff(_weights(out / "fsdp"), _weights(out / "rev")) <= 1e-6
    assert _max_rel_diff(_weights(out / "fsdp_vit"), _weights(out / "vit_rev")) <= 1e-6
    assert r0["fsdp_resumed"]["step"] == 4
    assert _max_rel_diff(_weights(out / "fsdp_stop"), _weights(out / "fsdp")) <= 1e-6
    assert evaluate_checkpoint(out / "fsdp" / "last.pt")["test_accuracy"] == r0["fsdp"]["test_accuracy"]
    # sharded: the files name a folder each, one per rank inside; superseded folders are gone
    meta = torch.load(out / "fsdp" / "last.pt", weights_only=False)
    assert meta["model"] is None and meta["shards"] == "last-step0000004.dcp"
    assert sorted(p.name for p in (out / "fsdp").glob("*.dcp")) == ["best-step0000004.dcp",
                                                                     "last-step0000004.dcp"]
    assert len(list((out / "fsdp" / meta["shards"]).glob("*.distcp"))) == 2
    model = build_model(_config(tmp_path, "init"), in_chans=3, num_classes=10, image_size=8)
    assert load_init(model, out / "fsdp" / "best.pt") == []
    assert _max_rel_diff(model.state_dict(), _weights(out / "fsdp")) == 0  # best.pt: the last step's
    # with the optimizer in backward: each shard steps after its reduce-scatter, checkpoints resume it
    assert _max_rel_diff(_weights(out / "fsdp_in_backward"), _weights(out / "fsdp")) <= 1e-6
    for checkpoint in ("sharded", "full"):
        name = f"fsdp_in_backward_stop_{checkpoint}"
        assert r0[f"{name}_resumed"]["step"] == 4
        assert _max_rel_diff(_weights(out / name), _weights(out / "fsdp_in_backward")) <= 1e-6
    assert torch.load(out / "fsdp_in_backward_stop_full" / "last.pt", weights_only=False)["model"]
    # a memory budget: planned on the whole model by rank 0, then sharded; the same stored units as DDP's
    assert r0["fsdp_planned"]["stored"] == r0["planned"]["stored"]
    assert _max_rel_diff(_weights(out / "fsdp_planned"), _weights(out / "planned")) <= 1e-6
    with pytest.raises(ValueError, match="fsdp shards each block's parameters"):
        _config(tmp_path, "x", fsdp=True, drift_guard_every=2)
    with pytest.raises(ValueError, match="checkpoint 'sharded' writes each rank's shards"):
        _config(tmp_path, "x", checkpoint="sharded")


def test_accumulation_with_no_sync_equals_the_full_batch_under_ddp(ddp):
    out, _, _, _ = ddp
    assert _max_rel_diff(_weights(out / "accum"), _weights(out / "rev")) < 1e-4


def test_single_process_accumulation_equals_the_full_batch(tmp_path):
    fit(_config(tmp_path, "full", steps=3))
    fit(_config(tmp_path, "accum", steps=3, accum_steps=4))
    assert _max_rel_diff(_weights(tmp_path / "accum"), _weights(tmp_path / "full")) < 1e-4


def test_ddp_trains_a_compiled_model_as_it_trains_the_eager_one(ddp):
    out, r0, _, _ = ddp
    assert r0["compiled"]["config"]["compile"] == "aot_eager"
    assert _max_rel_diff(_weights(out / "compiled"), _weights(out / "rev")) < 1e-4


@pytest.mark.parametrize("engine", ["rev", "plain", "rev_compiled", "rev_mixed"])
def test_direct_ddp_bn_eval_buckets_and_no_sync(ddp, engine):
    _, r0, r1, _ = ddp
    for r in (r0, r1):
        d = r[f"direct_{engine}"]
        assert d["max_rel_diff_vs_one_process"] < 1e-5  # 2 ranks at B == 1 process at 2B
        assert d["ranks_identical"]
        assert d["no_sync_local_grads_differ"] and d["synced_grads_identical"]
        for order in d["bucket_orders"][1:]:  # after DDP rebuilt its buckets at step 1
            buckets = [e for e in order if e != "stem"]
            assert len(buckets) > 1 and len(set(buckets)) == len(buckets)  # each bucket once
            # All-reduce overlaps backward: buckets go out before the last gradient exists.
            assert order.index("stem") > 0, order


def test_lr_scaling_rule(ddp, tmp_path):
    out, _, _, _ = ddp
    rows = [json.loads(line) for line in (out / "linear" / "metrics.jsonl").read_text().splitlines()]
    cfg = _config(tmp_path, "linear", lr_scaling="linear", steps=2)
    # linear: the schedule's peak is lr x world size; none (the default) keeps lr as given.
    assert [r["lr"] for r in rows if "loss" in r] == pytest.approx([2 * lr_at(s, 2, cfg) for s in (0, 1)])
    rev = [json.loads(line) for line in (out / "rev" / "metrics.jsonl").read_text().splitlines()]
    assert rev[0]["lr"] == pytest.approx(lr_at(1, 4, _config(tmp_path, "rev")))
    with pytest.raises(ValueError, match="lr_scaling must be"):
        TrainConfig(lr_scaling="sqrt")
    help_text = build_parser()._subparsers._group_actions[0].choices["train"].format_help()
    assert "--lr x world size" in " ".join(help_text.split())


# --- rank 0 alone writes; signals; resume ----------------------------------------------------

def test_rank_zero_alone_logs_and_writes(ddp):
    out, r0, r1, _ = ddp
    rows = [json.loads(line) for line in (out / "rev" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [2, 4]  # one writer, no duplicate lines
    # Evaluation is sharded and all-reduced: both ranks report the same figures.
    assert r0["rev"]["test_accuracy"] == r1["rev"]["test_accuracy"]
    assert r0["rev"]["test_loss"] == r1["rev"]["test_loss"]
    assert not list(out.rglob("*.tmp"))


def test_every_rank_applies_rank_zeros_memory_plan(ddp):
    """Rank 1 plans nothing (the worker makes it fail if it tries) and stores what rank 0 chose."""
    out, r0, r1, _ = ddp
    assert r0["planned"]["step"] == r1["planned"]["step"] == 4
    assert r0["planned"]["stored"] == r1["planned"]["stored"]
    assert (out / "planned" / "plan.txt").is_file()


def test_batchnorm_statistics_do_not_diverge_between_ranks(ddp):
    """Each rank updates its running statistics with its own samples; evaluation (sharded over
    ranks) must use rank 0's, those in the checkpoint: the DDP figures equal one process's
    evaluation of last.pt on the whole test set."""
    out, r0, r1, _ = ddp
    alone = evaluate_checkpoint(out / "bn_rev" / "last.pt", device="cpu")
    for r in (r0, r1):
        assert r["bn_rev"]["test_accuracy"] == alone["test_accuracy"]
        assert r["bn_rev"]["test_loss"] == pytest.approx(alone["test_loss"], rel=1e-5)


def test_signal_on_one_rank_stops_all_and_resume_is_exact(ddp):
    out, r0, r1, _ = ddp
    # SIGTERM reached rank 1 alone after step 2: the stop decision is collective.
    assert r0["stop"]["interrupted"] and r1["stop"]["interrupted"]
    assert r0["stop"]["step"] == r1["stop"]["step"] == 2
    assert r0["resumed"]["step"] == 4 and not r0["resumed"]["interrupted"]
    resumed, uninterrupted = _weights(out / "stop"), _weights(out / "rev")
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)


# --- SyncBatchNorm ---------------------------------------------------------------------------

def test_sync_bn_is_refused_on_cpu_with_a_clear_message(ddp):
    _, r0, r1, _ = ddp
    for r in (r0, r1):
        assert "--sync-bn needs CUDA" in r["syncbn_error"] and "--norm group" in r["syncbn_error"]


def test_sync_bn_layers_follow_the_engine_rules_in_one_process():
    """What CPU allows: SyncBatchNorm (falling back to BatchNorm without a process group) inside
    reversible couplings gives plain-autograd gradients and updates its statistics once."""
    torch.manual_seed(0)
    rev = nn.SyncBatchNorm.convert_sync_batchnorm(create_model("revnet38", in_chans=3)).double()
    assert sum(isinstance(m, nn.SyncBatchNorm) for m in rev.modules()) > 10
    plain = copy.deepcopy(rev)
    plain.reversible = False
    x, y = torch.randn(4, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1, 2, 3])
    for m in (rev, plain):
        nn.functional.cross_entropy(m(x), y).backward()
    for (name, a), b in zip(rev.named_parameters(), plain.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(rev.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # running stats and num_batches_tracked == 1


# --- bad input -------------------------------------------------------------------------------

def test_world_size_that_does_not_divide_the_batch(tmp_path, capsys):
    cfg = _config(tmp_path, "x", batch_size=16)
    assert per_process_batch(cfg, 2) == 8
    with pytest.raises(ValueError, match=r"batch size 16 is global .* 3 processes.*--batch-size 15"):
        per_process_batch(cfg, 3)
    with pytest.raises(ValueError, match="not divisible by --accum-steps 4"):
        per_process_batch(_config(tmp_path, "x", batch_size=8, accum_steps=4), 4)
    with pytest.raises(SystemExit, match="does not divide evenly over 3 processes"):
        main(["train", "--nproc", "3", "--batch-size", "16", "--out", str(tmp_path / "y")])
    assert not (tmp_path / "y").exists()


def test_nproc_relaunches_the_same_command_under_torchrun(tmp_path, monkeypatch):
    seen = {}

    class FakePopen:
        def __init__(self, cmd, env=None):
            seen["cmd"], seen["env"] = cmd, env

        def wait(self):
            return 0

    monkeypatch.setattr(cli_train.subprocess, "Popen", FakePopen)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert main(["train", "--nproc", "2", "--dataset", "synthetic", "--batch-size", "16"]) == 0
    cmd = seen["cmd"]
    assert cmd[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in cmd and "--nproc-per-node=2" in cmd
    rest = cmd[cmd.index("revnet") + 1:]
    assert rest[:5] == ["train", "--dataset", "synthetic", "--batch-size", "16"]
    assert "--nproc" not in rest and rest[-4] == "--out"  # one run directory for all ranks
    assert rest[-2:] == ["--nproc-reason", "asked for (--nproc 2)"]  # what config.json records
    assert launch_command(4, ["--lr", "0.1"])[-4:] == ["revnet", "train", "--lr", "0.1"]
    # --nproc auto (the default) on a CPU with 2 cores: 2 one-thread processes for a real run
    monkeypatch.setattr(cli_train, "auto_nproc", lambda config: auto_nproc(config, cores=2))
    assert main(["train", "--out", str(tmp_path / "auto")]) == 0
    assert "--nproc-per-node=2" in seen["cmd"] and seen["env"]["OMP_NUM_THREADS"] == "1"
    assert seen["cmd"][-1].startswith("auto: 2 one-thread processes")


def test_nproc_auto_rule(tmp_path, monkeypatch):
    """One process where N cannot pay or cannot be; on --resume as many as the run trained on."""
    fmnist = TrainConfig(out=str(tmp_path / "f"))
    assert auto_nproc(fmnist, cores=2)[0] == 2 and auto_nproc(fmnist, cores=1) == (1, "auto: one core")
    vit = TrainConfig(recipe="fashion-mnist-vit", **RECIPES["fashion-mnist-vit"])
    assert auto_nproc(vit, cores=2)[0] == 2
    assert "short run" in auto_nproc(_config(tmp_path, "s"), cores=2)[1]  # synthetic data, 4 steps
    assert "short run" in auto_nproc(TrainConfig(steps=50), cores=2)[1]
    assert auto_nproc(fmnist, cores=3) == (1, "auto: the batch of 128 does not divide over 3 processes")
    seen = {}

    def fit(config, **_):
        seen["config"] = config
        raise ValueError("seen")

    monkeypatch.setattr(cli_train, "fit", fit)
    monkeypatch.setattr(cli_train, "auto_nproc", lambda config: (1, "auto: one core"))
    assert main(["train", "--dataset", "synthetic", "--steps", "2", "--out", str(tmp_path / "one")]) == 1
    assert seen.pop("config").nproc_reason == "auto: one core"
    run = tmp_path / "two"
    run.mkdir()
    (run / "config.json").write_text(json.dumps(dataclasses.asdict(_config(tmp_path, "two"))))
    torch.save({"world_size": 2}, run / "last.pt")
    monkeypatch.setattr(cli_train, "_launch", lambda _a, _c, n, reason: seen.update(n=n, reason=reason) or 0)
    assert main(["train", "--resume", "--out", str(run)]) == 0
    assert seen == {"n": 2, "reason": "auto: as the run trained (2 processes)"}


def test_incomplete_rendezvous_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    for name in ("LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    with pytest.raises(DistributedError, match="MASTER_ADDR.*not.*Launch with torchrun"):
        init_from_env("cpu", 5.0)


def test_rendezvous_that_nobody_serves_times_out_clearly(monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {"WORLD_SIZE": "2", "RANK": "1", "LOCAL_RANK": "1", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(port)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(DistributedError, match=r"could not join the process group .* within 0.5 s"):
        init_from_env("cpu", 0.5)
    assert not dist.is_initialized()


def test_a_dead_rank_gives_a_clear_error_and_no_corrupt_checkpoint(ddp):
    out, _, _, proc = ddp  # the launch ends with `revnet train` whose rank 1 dies at step 3
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert "revnet train: rank 0 at step 3: lost contact with the other processes" in output, output[-4000:]
    assert "--resume" in output
    run = out / "die"
    state = torch.load(run / "last.pt", weights_only=False)  # complete and loadable
    assert state["step"] == 2  # the last checkpoint before the failure; nothing written after it
    assert not list(run.glob("*.tmp"))
    assert output.count("training revnet38 on synthetic") == 1  # rank 0 alone prints


def test_shard_folders_left_by_an_interruption_are_removed_and_a_missing_one_is_named(tmp_path):
    """A sharded checkpoint's folders: the one its file names is kept, older or half-written ones of
    the same checkpoint go (another checkpoint's stay); a file whose folder is gone says so."""
    from revnet.training.shards import read_shards, remove_unnamed, shards_dir

    keep, old, other = shards_dir(tmp_path, "last.pt", 8), shards_dir(tmp_path, "last.pt", 4), \
        shards_dir(tmp_path, "best.pt", 4)
    for d in (keep, old, other):
        d.mkdir()
    (tmp_path / "last-notes.dcp").mkdir()  # not a step folder: not ours to remove
    remove_unnamed(tmp_path, "last.pt", keep=keep.name)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best-step0000004.dcp", "last-notes.dcp",
                                                          "last-step0000008.dcp"]
    torch.save({"model": None, "shards": "last-step0000009.dcp", "config": {}}, tmp_path / "last.pt")
    with pytest.raises(FileNotFoundError, match="holds no complete sharded checkpoint"):
        read_shards(tmp_path / "last-step0000009.dcp")
    with pytest.raises(FileNotFoundError, match="holds no complete sharded checkpoint"):
        load_checkpoint(tmp_path / "last.pt")
