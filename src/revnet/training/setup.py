"""Everything one training process works on: the model, optimizer, data and its place in the job."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..conversion import convert
from ..engine import compile as revnet_compile
from ..engine import has_reversible_units, set_exact, set_reversible
from ..memory import Plan, optimizer_in_backward, plan
from ..memory.measure import keep_freed_memory
from ..models import create_model, model_accepts
from .config import NORMS, TrainConfig
from .datasets import load_dataset
from .distributed import DistInfo, shard_fsdp, wrap_ddp
from .loader import Loader
from .precision import AmpChoice, autocast, probe_step_time, resolve_amp
from .shards import load_checkpoint
from .text import TextLoader, load_text, random_tokens

__all__ = ["Run", "build_model", "build_run", "peak_memory_bytes", "per_process_batch", "prediction_loss",
           "random_batch", "resolve_device", "to_layout"]

log = logging.getLogger(__name__)


def resolve_device(name: str) -> torch.device:
    """``"auto"``: CUDA if present, else the CPU; otherwise the device named, checked to exist."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but CUDA is not available; use --device cpu.")
    return device


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory so far: CUDA allocator peak, or the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with contextlib.suppress(OSError), open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    import resource  # fallback off Linux: ru_maxrss is KiB on Linux, bytes on macOS

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def to_layout(x: torch.Tensor, config: TrainConfig) -> torch.Tensor:
    """The batch in the memory layout the run trains in (channels_last by default, for images)."""
    return x.contiguous(memory_format=torch.channels_last) if config.channels_last and x.dim() == 4 else x


def prediction_loss(logits: torch.Tensor, y: torch.Tensor, label_smoothing: float = 0.0,
                    reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of a classifier's (B, K) logits against (B,) labels, or of a language
    model's (B, T, V) logits against (B, T) next tokens (every position one prediction), in float32."""
    return F.cross_entropy(logits.flatten(0, -2).float(), y.flatten(), label_smoothing=label_smoothing,
                           reduction=reduction)


def random_batch(shape: dict[str, int], n: int, config: TrainConfig, device: torch.device,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A random batch of ``n`` samples of the run's data (``shape``: a loader's ``shape_info()``),
    in its layout, for the precision probe, the memory plan and the memory count."""
    if "vocab_size" in shape:
        return random_tokens(n, shape["context_length"], generator, device)
    size = shape["image_size"]
    x = to_layout(torch.randn((n, shape["in_chans"], size, size), generator=generator, device=device), config)
    return x, torch.randint(0, shape["num_classes"], (n,), generator=generator, device=device)


@dataclass
class Run:
    """Everything the loop mutates, in one place (saved to and restored from last.pt)."""

    config: TrainConfig
    device: torch.device
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    train: Loader | TextLoader
    test: Loader | TextLoader
    total: int
    out: Path
    net: nn.Module | None = None  # what the loop trains: the model, or its DistributedDataParallel wrapper
    dist: DistInfo = field(default_factory=DistInfo)
    lr_scale: float = 1.0  # peak lr = config.lr * lr_scale (world size with lr_scaling="linear")
    step: int = 0
    best: float = -1.0
    history: list[dict[str, Any]] = field(default_factory=list)
    first_step_s: float | None = None  # this process's first step: with compile, mostly compilation
    plan: Plan | None = None  # --memory-budget: which units are stored (written to plan.txt)


def per_process_batch(config: TrainConfig, world_size: int) -> int:
    """Samples each process sees per optimiser step: ``batch_size / world_size`` (exactly)."""
    if config.batch_size % world_size:
        raise ValueError(
            f"batch size {config.batch_size} is global (all processes together) and does not divide "
            f"evenly over {world_size} processes; pass a multiple of {world_size}, e.g. --batch-size "
            f"{max(world_size, config.batch_size // world_size * world_size)}.")
    per = config.batch_size // world_size
    if per % config.accum_steps:
        raise ValueError(
            f"the per-process batch {per} (= {config.batch_size} / {world_size} processes) is not "
            f"divisible by --accum-steps {config.accum_steps}; pick a batch size that is a multiple of "
            f"{world_size * config.accum_steps}.")
    return per


AUTO_NPROC_MIN_STEPS = 200  # a shorter run does not pay back starting the processes (docs/DISTRIBUTED.md)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity), not the machine's count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def auto_nproc(config: TrainConfig, cores: int | None = None) -> tuple[int, str]:
    """``revnet train --nproc auto`` (the default): how many local processes train, and why.

    On a CPU with N >= 2 cores, N one-thread processes (DDP over gloo, each on its slice of the
    global batch) train as fast as or faster than one process whose N threads share each operation:
    PyTorch's intra-op threads split every kernel and wait for each other, and a reversible
    network's kernels are many and small (measured: ``studies/nproc_study.py``, 1.02x on an AMX
    Xeon, 1.13x on an AMD EPYC; docs/DISTRIBUTED.md). The same global
    batch and learning rate, so the same recipe; BatchNorm's statistics are taken over each
    process's slice. One process where that cannot pay or cannot be: a GPU (one process per GPU is
    asked for with ``--nproc N``), one core, a run shorter than :data:`AUTO_NPROC_MIN_STEPS` or on
    synthetic data (smoke runs), a batch that does not divide over the cores."""
    if resolve_device(config.device).type != "cpu":
        return 1, "auto: a GPU run is one process (--nproc N for one per GPU)"
    cores = usable_cores() if cores is None else cores
    if cores < 2:
        return 1, "auto: one core"
    if config.dataset == "synthetic" or (config.steps is not None and config.steps < AUTO_NPROC_MIN_STEPS):
        return 1, (f"auto: a short run (under {AUTO_NPROC_MIN_STEPS} steps, or synthetic data) does not pay "
                   f"back starting {cores} processes")
    try:
        per_process_batch(config, cores)
    except ValueError:
        return 1, f"auto: the batch of {config.batch_size} does not divide over {cores} processes"
    return cores, (f"auto: {cores} one-thread processes (DDP over gloo) on {cores} cores rather than one "
                   f"process of {cores} threads: as fast or faster on the CPUs measured "
                   f"(docs/DISTRIBUTED.md)")


def device_for(config: TrainConfig, info: DistInfo) -> torch.device:
    """The configured device; under torchrun on CUDA, this process's ``cuda:LOCAL_RANK``."""
    device = resolve_device(config.device)
    if info.enabled and device.type == "cuda":
        if config.device not in ("auto", "cuda"):
            raise ValueError(f"under torchrun each process uses cuda:LOCAL_RANK; got --device "
                             f"{config.device!r}. Pass --device cuda (or auto).")
        device = torch.device("cuda", info.local_rank)
    return device


def _choose_precision(model: nn.Module, shape: dict[str, int], n: int, config: TrainConfig,
                      device: torch.device) -> AmpChoice:
    """``amp="auto"`` for this model and batch: where the flags do not tell, a probe of its step."""
    g = torch.Generator(device).manual_seed(0)  # the run's own RNG streams are left alone
    x, y = random_batch(shape, n, config, device, g)
    probe = probe_step_time(model, x, lambda out: prediction_loss(out, y))
    return resolve_amp("auto", device, probe)


def _compile_problem(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot compile here (inductor on CPU writes C++), or None."""
    if backend == "inductor" and device.type == "cpu" and not any(
            shutil.which(c) for c in (os.environ.get("CXX", "g++"), "g++", "c++", "clang++")):
        return ("inductor compiles C++ on CPU and found no compiler (g++, c++ or clang++; or set CXX). "
                "Install one (apt-get install g++), or train eagerly with --no-compile.")
    return None


def plan_memory(model: nn.Module, config: TrainConfig, device: torch.device, shape: dict[str, int],
                n: int) -> Plan:
    """``--memory-budget``: the plan on a batch of the run's shape, in its precision (not applied).

    ``auto`` (CUDA): 90% of the device memory free now, less the optimizer's share (one
    gradient and up to two moments per parameter; this rank's shard of them under FSDP) that the
    step's activations must leave. Planned before any sharding, on the whole model.
    """
    if config.memory_budget == "auto":
        if device.type != "cuda":
            raise ValueError("--memory-budget auto sizes the budget from the GPU's free memory; on CPU give "
                             "a size (e.g. --memory-budget 2GiB).")
        free, _ = torch.cuda.mem_get_info(device)
        # under FSDP each rank keeps its shard of them (the gathered block is the plan's to measure)
        dist = torch.distributed
        shards = dist.get_world_size() if config.fsdp and dist.is_initialized() else 1
        state = 3 * sum(p.numel() * p.element_size() for p in model.parameters()) // shards
        budget: int | str = max(1, int(0.9 * free) - state)
    else:
        budget = str(config.memory_budget)
    g = torch.Generator(device).manual_seed(0)  # the run's own RNG streams are left alone
    x, y = random_batch(shape, n, config, device, g)
    with autocast(device, config.amp):
        return plan(model, x, budget=budget, loss_fn=lambda out: prediction_loss(out, y))


def make_optimizer(model: nn.Module, config: TrainConfig,
                   net: nn.Module | None = None) -> torch.optim.Optimizer:
    """SGD with (Nesterov) momentum on every parameter, or AdamW.

    AdamW leaves norms, biases and embeddings out of weight decay (``p.dim() < 2`` and
    position embeddings), as ViT/DeiT training does: decay there only shrinks what sets scales.
    With ``config.optimizer_in_backward`` each parameter gets its own optimizer of the same kind,
    stepped inside backward (:func:`revnet.optimizer_in_backward`; ``net``, the DDP wrapper where
    there is one, steps each after its all-reduce).
    """
    no_decay = {id(p) for name, p in model.named_parameters()
                if config.optimizer == "adamw" and (p.dim() < 2 or name.endswith(("pos_embed", "cls_token")))}

    def build(params: list[nn.Parameter], weight_decay: float) -> torch.optim.Optimizer:
        if config.optimizer == "sgd":
            return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, nesterov=config.nesterov,
                                   weight_decay=weight_decay)
        return torch.optim.AdamW(params, lr=config.lr, betas=(config.momentum, 0.999),
                                 weight_decay=weight_decay)

    if config.optimizer_in_backward:
        return optimizer_in_backward(
            net if net is not None else model,
            lambda ps: build(ps, 0.0 if id(ps[0]) in no_decay else config.weight_decay))
    if config.optimizer == "sgd":
        return build(list(model.parameters()), config.weight_decay)
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW([{"params": [p for p in params if id(p) not in no_decay]},
                              {"params": [p for p in params if id(p) in no_decay], "weight_decay": 0.0}],
                             lr=config.lr, betas=(config.momentum, 0.999), weight_decay=config.weight_decay)


def build_model(config: TrainConfig, **shape: int) -> nn.Module:
    """The run's model, freshly initialised on the CPU, for data of ``shape`` (a loader's
    ``shape_info()``): an image classifier with its norm layers, sized to its images where the
    model takes a size (a transformer's position embeddings); a language model with the data's
    vocabulary and context length; converted (``config.convert``: :func:`revnet.convert`, the same
    state-dict keys) where asked. In its modes (reversible or plain, exact or float)."""
    if "vocab_size" in shape:
        model = create_model(config.model, vocab_size=shape["vocab_size"],
                             context_length=shape["context_length"])
    else:
        extra_kw: dict[str, Any] = {} if config.norm == "batch" else {"norm_layer": NORMS[config.norm]}
        if model_accepts(config.model, "img_size"):  # asked of the model's class, not read from its name
            extra_kw["img_size"] = shape["image_size"]
        model = create_model(config.model, num_classes=shape["num_classes"], in_chans=shape["in_chans"],
                             **extra_kw)
    if config.convert:
        convert(model, method=config.convert, gamma=config.convert_gamma, exact=config.exact)
    set_reversible(model, config.reversible)
    set_exact(model, config.exact)
    return model


def load_init(model: nn.Module, path: str | os.PathLike[str]) -> list[str]:
    """Loads the weights of ``path`` (a ``revnet train`` checkpoint, or a state dict saved with
    ``torch.save``) into ``model`` where names and shapes agree; returns the names kept as they were
    (a classifier head of another shape: fine-tuning on other classes). A file that matches nothing
    is an error, and so is a model tensor of the same name with another shape outside the head.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--init: no file at {path}; pass a last.pt/best.pt of `revnet train` or a "
                                f"state dict saved with torch.save(model.state_dict(), path).")
    state = load_checkpoint(path)
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--init: {path} holds no state dict (name -> tensor).")
    own = model.state_dict()
    loaded = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not loaded:
        raise ValueError(f"--init: no tensor of {path} fits the model (e.g. {next(iter(state), '-')!r} vs "
                         f"{next(iter(own), '-')!r}): it was saved from another architecture.")
    fresh = sorted(k for k in own if k not in loaded)
    odd = [k for k in fresh if k in state and not k.startswith(("head.", "fc.", "classifier."))]
    if odd:
        raise ValueError(f"--init: {path} has {odd[0]} with shape {tuple(state[odd[0]].shape)}, the model "
                         f"{tuple(own[odd[0]].shape)}: only a classifier head may change shape.")
    model.load_state_dict(loaded, strict=False)
    return fresh


def build_run(config: TrainConfig, info: DistInfo | None = None, *, init_weights: bool = True) -> Run:
    """Resolves the device and precision, loads the data, builds the model, optimizer and loaders;
    the model starts from ``config.init`` where given (unless ``init_weights`` is False: a resumed run
    takes its weights from its own checkpoint)."""
    info = info or DistInfo()
    device = device_for(config, info)
    keep_freed_memory()  # host memory reused from step to step, not faulted in anew (memory.measure)
    per_rank = per_process_batch(config, info.world_size)
    torch.manual_seed(config.seed)
    train, test = _loaders(config, info, per_rank, device)
    shape = train.shape_info()
    micro = per_rank // config.accum_steps
    model = build_model(config, **shape)
    if config.init and init_weights:
        fresh = load_init(model, config.init)
        if info.is_main:
            log.info("init: weights from %s%s", config.init,
                     f"; kept fresh: {', '.join(fresh)}" if fresh else "")
    model.to(device, memory_format=torch.channels_last if config.channels_last else torch.contiguous_format)
    if config.amp == "auto":  # resolved once: config.json and checkpoints hold the precision used
        choice = info.broadcast(_choose_precision(model, shape, micro, config, device)
                                if info.is_main else None)  # every rank trains in rank 0's choice
        config = dataclasses.replace(config, amp=choice.amp, amp_reason=choice.reason)
    if info.is_main:
        log.info("precision: %s (%s)", config.amp, config.amp_reason or "asked for")
    plan = None
    if config.memory_budget == "min" and not (config.reversible and has_reversible_units(model)):
        config = dataclasses.replace(config, memory_budget=None)  # plain autograd: nothing to plan
    if config.memory_budget:  # before compiling: the plan's modes are what gets compiled
        # Every rank applies rank 0's plan: DDP's ranks run the same graph.
        plan = info.broadcast(plan_memory(model, config, device, shape, micro)
                              if info.is_main else None)
        plan.apply(model)
        if info.is_main:
            log.info("%s", plan)
    if config.compile:
        problem = _compile_problem(config.compile, device)
        if problem:  # the run goes on eagerly, and config.json says so
            log.warning("not compiling: %s", problem)
            config = dataclasses.replace(config, compile=None)
        else:
            revnet_compile(model, backend=config.compile)
    net = shard_fsdp(model, info) if config.fsdp else wrap_ddp(model, info, device, sync_bn=config.sync_bn)
    optimizer = make_optimizer(model, config, net)
    scaler = torch.amp.GradScaler(device.type) if config.amp == "fp16" else None
    total = config.steps or max(1, round(config.epochs * len(train)))
    lr_scale = float(info.world_size) if config.lr_scaling == "linear" else 1.0
    return Run(config, device, model, optimizer, scaler, train, test, total, Path(config.out),
               net=net, dist=info, lr_scale=lr_scale, plan=plan)


def _loaders(config: TrainConfig, info: DistInfo, per_rank: int,
             device: torch.device) -> tuple[Loader | TextLoader, Loader | TextLoader]:
    """This process's training and test batches: images (:class:`Loader`) or byte windows
    (:class:`TextLoader`, ``--dataset text``)."""
    if config.dataset == "text":
        # Each global step's windows are drawn from (seed, epoch, step); rank r trains on its slice.
        train_streams, test_streams = load_text(config.data_dir)
        if not test_streams:
            raise ValueError(f"text data folder {config.data_dir}: no held-out file to evaluate on; a folder "
                             f"needs at least two files (every 10th is held out).")
        kw = dict(device=device, rank=info.rank, world_size=info.world_size)
        return (TextLoader(train_streams, per_rank, config.context_length, train=True, seed=config.seed,
                           **kw),
                TextLoader(test_streams, max(per_rank, 64), config.context_length, train=False, **kw))
    extra = dict(config.synthetic) if config.dataset == "synthetic" else {}
    train_ds = load_dataset(config.dataset, "train", config.data_dir, **extra)
    test_ds = load_dataset(config.dataset, "test", config.data_dir, **extra)
    # Each global step takes the next batch_size samples of a seeded per-epoch permutation;
    # rank r trains on its slice r of them (revnet.training.loader.Loader).
    train = Loader(train_ds, per_rank, train=True, device=device, seed=config.seed,
                   pad=config.crop_pad, flip=config.flip, augment=config.crop_pad > 0 or config.flip,
                   rank=info.rank, world_size=info.world_size)
    # Evaluation is sharded too: each rank takes its part of every global test batch.
    test_batch = min(max(per_rank, 256), max(1, math.ceil(len(test_ds) / info.world_size)))
    test = Loader(test_ds, test_batch, train=False, device=device, rank=info.rank, world_size=info.world_size)
    return train, test
