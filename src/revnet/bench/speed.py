"""Step time: the same model and weights trained several ways, alternated in one process.

Times are medians of repeats alternated between the compared runs, after warm-up; the
figures to read are the ratios (these machines are shared and noisy).
"""

from __future__ import annotations

import atexit
import contextlib
import copy
import importlib.util
import io
import re
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import types
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import compile as revnet_compile
from ..engine import set_reversible
from ..engine.modes import units as engine_units
from ..engine.replay import batchnorm_stats_frozen
from ..memory.planner import unit_parts
from ..models import RevViT, create_model
from ..training.precision import AMP_DTYPES, autocast
from .contenders import Progress, build, make_batch, run_mode, sync, time_stats, train_step

__all__ = ["load_engine", "speed", "train_step_rate", "units_forward_seconds"]

def speed(
    model: str = "revnet38", *, kinds: Sequence[str] | None = None,
    reference: str | None = "resnet32", against: str | None = None, batch: int = 128,
    image_size: int = 32, repeats: int = 7, warmup: int = 2, inference_repeats: int = 15,
    channels_last: bool = False, compile: str | None = None, device: str = "cpu", dtype: str = "float32",
    seed: int = 0, floor: bool = True, progress: Progress = None,
) -> dict[str, Any]:
    """Training-step and inference time of one RevNet run in several ways, alternated.

    One training step is forward, cross-entropy and backward (every parameter gets its
    gradient); the optimizer update, the same in every mode, is left out. The kinds run
    on the same model and weights (default: reversible, plain autograd and per-block
    checkpointing of the model's family, ``revnet*`` or, for a RevViT, ``revvit*``);
    ``reference`` (a registered ResNet or ViT) is timed in the same loop for scale, and
    ``against`` (a git revision) adds the reversible run with that revision's engine, to
    measure an engine change side by side. The order is rotated every repeat. Inference
    is ``eval()`` under ``torch.no_grad()``, reversible against plain, where both must
    cost the same.

    Args:
        channels_last: the batch in channels_last; False: an NCHW batch into the model as
            ``create_model`` builds it (the library's default path).
        compile: a torch.compile backend: adds ``revnet+compile`` and ``revnet-plain+compile``,
            copies of the same weights under :func:`revnet.compile`; the time their first
            warm-up step takes beyond a step is reported as ``compile_s``, apart.
        floor: with the reversible and the plain-autograd kinds, also time the rebuild floor, the
            least an engine that rebuilds every unit can spend: ``floor`` is the forward of every
            unit the engine rebuilds, without a graph (:func:`units_forward_seconds`), alternated
            with the steps; a step cannot cost less than plain autograd's plus that. The ratio
            ``"revnet/floor"`` (per repeat: reversible / (plain + floor), median) is what the engine
            adds over what the algorithm must spend; with ``compile`` the same for the compiled
            copies (``"revnet+compile/floor+compile"``).

    Returns:
        ``train`` and ``inference``: per run, median / quartiles / min in seconds and
        images/s; ``ratios``: ratios of medians (``"revnet/revnet-plain"``, ...);
        ``pair_ratios``: the spread of the per-repeat ratios; ``compile_s`` per compiled run.
    """
    if repeats < 1 or warmup < 0:
        raise ValueError("speed: repeats must be >= 1 and warmup >= 0.")
    torch.manual_seed(seed)
    dt = getattr(torch, dtype)
    family = "vit" if isinstance(create_model(model, device="meta"), RevViT) else "cnn"  # meta: no memory
    rev, plain, baseline = (("revvit", "revvit-plain", "vit") if family == "vit"
                            else ("revnet", "revnet-plain", "resnet"))
    kinds = list(kinds or (rev, plain, f"{rev}-checkpoint"))
    size = {"image_size": image_size} if family == "vit" else {}
    net = build(rev, model=model, device=device, dtype=dt, **size)
    Engine = types.ModuleType | None
    runs: list[tuple[str, str, nn.Module, Engine]] = [(k, k, net, None) for k in kinds]
    if against is not None:
        runs.append((f"{rev}@{against}", rev, net, load_engine(against)))
    if compile is not None:
        runs += [(f"{k}+compile", k, revnet_compile(copy.deepcopy(net), backend=compile), None)
                 for k in kinds if k in (rev, plain)]
    floor = floor and {rev, plain} <= set(kinds)
    if floor:  # the units' forward of each network timed: the eager one, and the compiled reversible copy
        runs += [(f"floor{name.removeprefix(rev)}", _FLOOR, m, None) for name, k, m, _ in list(runs)
                 if k == rev and "@" not in name]
    if reference is not None:
        runs.append((reference, baseline, build(baseline, model=reference, device=device, dtype=dt, **size),
                     None))
    if channels_last:
        for _, _, m, _ in runs:
            m.to(memory_format=torch.channels_last)
    x, y = make_batch(net, batch, image_size, channels_last=channels_last)

    def timed(kind: str, m: nn.Module, function: Engine) -> float:
        if kind == _FLOOR:
            with run_mode(m, rev):
                return units_forward_seconds(m, x)
        m.zero_grad(set_to_none=True)
        with run_mode(m, kind), _engine(function, m):
            sync(device)
            t = time.perf_counter()
            train_step(m, x, y)
            sync(device)
            return time.perf_counter() - t

    times: dict[str, list[float]] = {run[0]: [] for run in runs}
    first: dict[str, float] = {}
    for name, *run in runs:
        for _ in range(max(warmup, 2 if "+compile" in name else 0)):
            t = timed(*run)
            first.setdefault(name, t)
    for r in range(repeats):
        for name, *run in runs[r % len(runs):] + runs[:r % len(runs)]:
            times[name].append(timed(*run))
        if progress is not None:
            progress({"repeat": r, "times": {k: v[-1] for k, v in times.items()}})
    train = {name: time_stats(v, batch) for name, v in times.items()}
    compile_s = {name: first[name] - train[name]["median_s"] for name in train
                 if "+compile" in name and not name.startswith("floor")}
    infer = _inference_times(net, x, inference_repeats, device, rev, plain) if inference_repeats else {}
    ratios, pairs = {}, {}
    base = kinds[0]
    compared = [(base, other) for other in times if other != base and not other.startswith("floor")]
    if plain in times:  # compiled reversible against eager plain backprop: the speed target
        compared += [(name, plain) for name in compile_s if name != f"{plain}+compile"]
    if {f"{rev}+compile", f"{plain}+compile"} <= times.keys():  # both compiled
        compared.append((f"{rev}+compile", f"{plain}+compile"))
    for a, b in compared:
        key = f"{a}/{b}"
        ratios[key] = train[a]["median_s"] / train[b]["median_s"]
        per = [s / t for s, t in zip(times[a], times[b], strict=True)]
        pairs[key] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    for suffix in ("", "+compile") if floor else ():
        if f"floor{suffix}" not in times:
            continue
        rounds = list(zip(times[f"{rev}{suffix}"], times[f"{plain}{suffix}"], times[f"floor{suffix}"],
                          strict=True))
        for key, per in ((f"{rev}{suffix}/floor{suffix}", [r / (p + u) for r, p, u in rounds]),
                         (f"floor{suffix}/{plain}{suffix}", [(p + u) / p for _, p, u in rounds])):
            ratios[key] = statistics.median(per)
            pairs[key] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    if infer:
        key = f"inference {rev}/{plain}"
        ratios[key] = infer[rev]["median_s"] / infer[plain]["median_s"]
        per = [a / b for a, b in zip(infer[rev]["times_s"], infer[plain]["times_s"], strict=True)]
        pairs[key] = {"median": statistics.median(per), "min": min(per), "max": max(per)}
    config = {"model": model, "kinds": list(kinds), "reference": reference, "against": against,
              "batch": batch, "image_size": image_size, "repeats": repeats, "warmup": warmup,
              "inference_repeats": inference_repeats, "channels_last": channels_last, "compile": compile,
              "device": device, "dtype": dtype, "threads": torch.get_num_threads(), "seed": seed,
              "floor": [rev, plain] if floor else None}
    return {"config": config, "train": train, "inference": infer, "ratios": ratios,
            "pair_ratios": pairs, "compile_s": compile_s}


_FLOOR = "floor"  # the kind of the runs that time the rebuilt units' forward


def units_forward_seconds(model: nn.Module, x: torch.Tensor) -> float:
    """Seconds one forward of ``model`` on ``x`` without a graph spends in the units a reversible
    backward rebuilds: every coupling's F and G and every recomputed unit (what the engine runs
    once more in backward, the paper's Algorithm 1). BatchNorm's running statistics stay as they
    were. Each call is timed around the module's call, compiled or not (a :func:`revnet.compile`
    'd branch is timed as it runs, hooks would break its graph); on CUDA each is synchronised."""
    parts = [m for m, _, _ in unit_parts(engine_units(model))]
    spent = [0.0]
    kept = [(m, m._compiled_call_impl) for m in parts]

    def timing(inner: Any) -> Any:
        def call(*args: Any, **kwargs: Any) -> Any:
            sync(x.device)
            t = time.perf_counter()
            out = inner(*args, **kwargs)
            sync(x.device)
            spent[0] += time.perf_counter() - t
            return out
        return call

    for m, compiled in kept:
        m._compiled_call_impl = timing(compiled or m._call_impl)
    try:
        with torch.no_grad(), batchnorm_stats_frozen(model):
            model(x)
    finally:
        for m, compiled in kept:
            m._compiled_call_impl = compiled
    return spent[0]


def train_step_rate(
    model: str = "revnet38", *, batch: int = 128, image_size: int = 32, in_chans: int = 3,
    amp: str = "none", channels_last: bool = False, reversible: bool = True, repeats: int = 7,
    warmup: int = 2, device: str = "cpu", seed: int = 0,
) -> dict[str, Any]:
    """Images per second of whole training steps as ``revnet train`` runs them.

    Forward (under bf16/fp16 autocast if ``amp``), cross-entropy, backward and an SGD
    (Nesterov, weight decay) update, on one random batch; median of ``repeats`` after
    ``warmup``. The data path is left out: this is the rate the loader has to keep up with.
    """
    if amp not in AMP_DTYPES:
        raise ValueError(f"train_step_rate: amp must be one of {tuple(AMP_DTYPES)}, got {amp!r}.")
    if repeats < 1 or warmup < 0:
        raise ValueError("train_step_rate: repeats must be >= 1 and warmup >= 0.")
    torch.manual_seed(seed)
    net = create_model(model, num_classes=10, in_chans=in_chans).to(device)
    set_reversible(net, reversible)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    net.to(memory_format=fmt).train()
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, nesterov=True, weight_decay=5e-4)
    x, y = make_batch(net, batch, image_size, in_chans, channels_last=channels_last)
    dev = torch.device(device)

    def step() -> float:
        sync(device)
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with autocast(dev, amp):
            loss = F.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        sync(device)
        return time.perf_counter() - t

    for _ in range(warmup):
        step()
    result = time_stats([step() for _ in range(repeats)], batch)
    config = {"model": model, "batch": batch, "image_size": image_size, "in_chans": in_chans, "amp": amp,
              "channels_last": channels_last, "reversible": reversible, "repeats": repeats,
              "warmup": warmup, "device": device, "threads": torch.get_num_threads(), "seed": seed}
    return {"config": config, **result}


def load_engine(rev: str) -> types.ModuleType:
    """The engine (``src/revnet/engine/``) of git revision ``rev`` of this checkout, for ``against``.

    The folder is read with ``git archive`` and imported as a package of its own (the engine
    imports nothing else of revnet), so an older engine runs beside the current one in one
    process; :func:`_engine` lends its classes to a model for one step.

    Raises:
        RuntimeError: not a git checkout, or ``rev`` has no ``src/revnet/engine/``.
    """
    name = "revnet_engine_at_" + re.sub(r"\W", "_", rev)
    if name in sys.modules:
        return sys.modules[name]
    root = Path(__file__).resolve().parents[3]
    try:
        archive = subprocess.run(["git", "archive", "--format=tar", rev, "src/revnet/engine"], cwd=root,
                                 capture_output=True, check=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"cannot read the engine of git revision {rev!r} in {root}: {e}") from None
    folder = Path(tempfile.mkdtemp(prefix="revnet-engine-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    package = folder / name
    (folder / "src" / "revnet" / "engine").rename(package)
    spec = importlib.util.spec_from_file_location(name, package / "__init__.py",
                                                  submodule_search_locations=[str(package)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception:
        del sys.modules[name]
        raise
    return module


@contextlib.contextmanager
def _engine(engine: types.ModuleType | None, net: nn.Module) -> Iterator[None]:
    """Runs ``net``'s sequences and couplings as instances of ``engine``'s classes (another
    revision's engine, from :func:`load_engine`) while the body runs; the same weights."""
    swapped = []
    if engine is not None:
        for m in net.modules():
            cls = type(m)
            if cls.__module__.startswith("revnet.engine.") and isinstance(getattr(engine, cls.__name__, None),
                                                                          type):
                m.__class__ = getattr(engine, cls.__name__)
                swapped.append((m, cls))
    try:
        yield
    finally:
        for m, cls in swapped:
            m.__class__ = cls


def _inference_times(net: nn.Module, x: torch.Tensor, repeats: int, device: str, rev: str,
                     plain: str) -> dict[str, Any]:
    times: dict[str, list[float]] = {rev: [], plain: []}
    net.eval()
    try:
        with torch.no_grad():
            for r in range(repeats + 1):  # the first round warms up
                for kind in ((rev, plain) if r % 2 else (plain, rev)):
                    with run_mode(net, kind):
                        sync(device)
                        t = time.perf_counter()
                        net(x)
                        sync(device)
                    if r:
                        times[kind].append(time.perf_counter() - t)
    finally:
        net.train()
    return {k: time_stats(v, x.shape[0]) for k, v in times.items()}
