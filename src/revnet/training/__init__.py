"""Training as a library: ``fit(TrainConfig(...)) -> summary``, what ``revnet train`` runs.

- :mod:`.config`: :class:`TrainConfig`, the recipes and the learning-rate schedule;
- :mod:`.precision`: which autocast dtype a run uses;
- :mod:`.datasets` and :mod:`.loader`: data sets in memory, batched and augmented on the device;
- :mod:`.text`: byte-level text (a folder of files; by default the standard library's source);
- :mod:`.setup`: the model, optimizer and loaders of one process;
- :mod:`.loop`: :func:`fit`, the training loop and its telemetry;
- :mod:`.footprint`: what reversibility saved in a run (bytes kept for backward, reversible vs plain);
- :mod:`.evaluate`: test accuracy (bits per byte for text) of a model or a checkpoint;
- :mod:`.generate`: text sampled from a language model's checkpoint;
- :mod:`.state` and :mod:`.signals`: checkpoints, resume, stopping on a signal;
- :mod:`.distributed`: process groups under ``torchrun`` (DDP);
- :mod:`.plots`: a run's curves.

Needs the ``train`` extra (numpy for the data files, tqdm, matplotlib) to run; imports
with torch alone.
"""

from .config import RECIPES, TrainConfig, lr_at
from .evaluate import evaluate_checkpoint
from .generate import generate_text
from .loop import TrainingDivergedError, fit
from .plots import plot_run, read_metrics
from .text import load_text

__all__ = ["RECIPES", "TrainConfig", "TrainingDivergedError", "evaluate_checkpoint", "fit", "generate_text",
           "load_text", "lr_at", "plot_run", "read_metrics"]
