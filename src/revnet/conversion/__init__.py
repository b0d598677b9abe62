"""Conversion: the models people already have, made reversible for fine-tuning (``revnet.convert``).

- :mod:`.convert`: :func:`convert` finds a model's residual block stacks and replaces each with a
  :class:`~.stack.ConvertedStack`; :class:`ConversionReport` says what moved;
- :mod:`.stack`: the converted stack, momentum or two-stream couplings over the blocks' own
  sub-modules, driven by the model's own forward loop, with the original state-dict keys;
- :mod:`.adapters`: which blocks it knows (revnet's transformers, Hugging Face GPT-2, Llama,
  BERT, ViT, ...) and :func:`register_adapter` for a user's own.

Imports the engine, the zoo (for its transformer block) and the fidelity checks (the rebuild
error of the report); never imports ``transformers``
(Hugging Face classes are recognised by their module path).
"""

from .adapters import Adapter, Branch, register_adapter
from .convert import (
    METHODS,
    ConversionReport,
    auto_gamma,
    convert,
    converted_stacks,
    reconstruction_error,
    set_gamma,
)
from .stack import ConvertedStack

__all__ = ["METHODS", "Adapter", "Branch", "ConversionReport", "ConvertedStack", "auto_gamma", "convert",
           "converted_stacks", "reconstruction_error", "register_adapter", "set_gamma"]
