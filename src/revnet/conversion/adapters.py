"""Adapters: how :func:`revnet.convert` finds the residual branches of a block it knows.

An adapter turns one block into its residual branches, in order: functions ``f(x, **context)``
such that the block computes ``x = x + f_1(x)``, then ``x = x + f_2(x)``, ... Each branch is an
``nn.Module`` made of the block's **own** sub-modules (so its weights are the block's, shared,
not copied); ``context`` is the block's call arguments other than the hidden states (attention
masks, rotary tables, position ids, the key/value cache), by name.

Built in (matched by class, Hugging Face's by their module path, so ``transformers`` is never
imported here):

- revnet's own :class:`~revnet.models.transformer.TransformerBlock` (``vit_*``, ``gpt_*``):
  attention, MLP; and the ResNets' units (``resnet*``), ``x + residual(x)``, after each stage's
  first unit (whose shortcut changes the shape, and which runs as it is);
- PyTorch's ``nn.TransformerEncoderLayer`` (self-attention, feed-forward) and
  ``nn.TransformerDecoderLayer`` (self-attention, cross-attention to ``memory``, feed-forward),
  pre-norm (``norm_first=True``) and post-norm;
- Hugging Face GPT-2 (``GPT2Block``): ``attn(ln_1(x))``, ``mlp(ln_2(x))``;
- Hugging Face Llama, Mistral, Qwen2 (``*DecoderLayer``): ``self_attn(input_layernorm(x))``,
  ``mlp(post_attention_layernorm(x))``, with the model's rotary tables and mask as context;
- Hugging Face BERT and RoBERTa (``BertLayer``, ``RobertaLayer``), post-norm;
- Hugging Face ViT (``ViTLayer``): ``attention(layernorm_before(x))``, ``mlp(layernorm_after(x))``.

A post-norm sub-layer ``x -> LayerNorm(x + A(x))`` converts as the residual step with
``f(x) = LayerNorm(x + A(x)) - x``: the same function, so at ``gamma = 0`` the converted model is
the original. The Hugging Face adapters follow the block layouts of ``transformers`` 5 (tested
with the version ``scripts/constraints.txt`` pins); a layout they do not find is reported by
:func:`revnet.convert`.

:func:`register_adapter` adds a user's block class.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..models.layers import ResidualUnit
from ..models.transformer import TransformerBlock

__all__ = ["Adapter", "Branch", "adapter_for", "register_adapter"]


class Branch(nn.Module):
    """One residual branch made of a block's sub-modules: ``forward(x, **context) = fn(self, x, **context)``.

    Args:
        fn: the branch, a function of this module (whose attributes are ``modules``), the hidden
            states and the context keywords. A module-level function keeps the model picklable.
        modules: the block's sub-modules the branch uses, by name (registered, not copied).
    """

    def __init__(self, fn: Callable[..., torch.Tensor], **modules: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        for name, m in modules.items():
            self.add_module(name, m)

    def forward(self, x: torch.Tensor, **context: Any) -> torch.Tensor:
        return self.fn(self, x, **context)

    def extra_repr(self) -> str:
        return f"fn={getattr(self.fn, '__name__', type(self.fn).__name__)}"


Branches = Callable[[nn.Module], Sequence[nn.Module]]


@dataclass(frozen=True)
class Adapter:
    """What :func:`revnet.convert` knows about a block class.

    Attributes:
        name: the block class's name, for messages.
        branches: ``block -> [f_1, f_2, ...]``, its residual branches in order.
        check: ``block -> reason`` it cannot be converted (or None), e.g. cross-attention.
        parent: called with the module holding the converted list, to switch off what would no longer
            work (``nn.TransformerEncoder``'s nested-tensor fast path).
    """

    name: str
    branches: Branches
    check: Callable[[nn.Module], str | None] | None = None
    parent: Callable[[nn.Module], None] | None = None


_BY_TYPE: dict[type, Adapter] = {}
_BY_NAME: dict[str, Adapter] = {}


def register_adapter(block_type: type | str, branches: Branches, *,
                     check: Callable[[nn.Module], str | None] | None = None,
                     parent: Callable[[nn.Module], None] | None = None) -> None:
    """Teaches :func:`revnet.convert` a residual block class.

    Example:
        >>> import torch, revnet
        >>> from torch import nn
        >>> class MyBlock(nn.Module):  # x + attn(norm1(x)), then + mlp(norm2(x))
        ...     def __init__(self, c):
        ...         super().__init__()
        ...         self.norm1, self.attn = nn.LayerNorm(c), nn.Linear(c, c)
        ...         self.norm2, self.mlp = nn.LayerNorm(c), nn.Linear(c, c)
        ...     def forward(self, x):
        ...         x = x + self.attn(self.norm1(x))
        ...         return x + self.mlp(self.norm2(x))
        >>> revnet.register_adapter(MyBlock, lambda b: [nn.Sequential(b.norm1, b.attn),
        ...                                             nn.Sequential(b.norm2, b.mlp)])

    Args:
        block_type: the block class, or its full path ``"package.module.Class"`` (matches that class
            without importing its package).
        branches: ``block -> [f_1, f_2, ...]``: modules over the block's own sub-modules with
            ``block(x) == x + f_1(x) + f_2(x + f_1(x))`` (each ``f_k(x, **context)`` if the block takes
            call arguments beyond ``x``; an ``nn.Sequential`` branch takes none).
        check: optional ``block -> reason`` it cannot be converted, or None.
        parent: optional, called with the module that holds the converted list.
    """
    if isinstance(block_type, str):
        adapter = Adapter(block_type.rpartition(".")[2], branches, check, parent)
        _BY_NAME[block_type] = adapter
    elif isinstance(block_type, type) and issubclass(block_type, nn.Module):
        _BY_TYPE[block_type] = Adapter(block_type.__name__, branches, check, parent)
    else:
        raise TypeError(f"register_adapter: block_type must be an nn.Module class or its path "
                        f"'package.module.Class', got {block_type!r}.")


def adapter_for(module: nn.Module) -> Adapter | None:
    """The adapter for ``module``'s class (its own, else its nearest registered base), or None."""
    for cls in type(module).__mro__:
        if cls in _BY_TYPE:
            return _BY_TYPE[cls]
        found = _BY_NAME.get(f"{cls.__module__}.{cls.__qualname__}")
        if found is not None:
            return found
    return None


# --------------------------------------------------------------------------------------
# revnet's own transformer block
# --------------------------------------------------------------------------------------

register_adapter(TransformerBlock, lambda block: [block.attn, block.mlp])


def _unit_check(unit: nn.Module) -> str | None:
    if not isinstance(unit.shortcut, nn.Identity):
        return "its shortcut changes the shape (a stage's first unit), so it is not x + f(x)"
    return None


# The zoo's ResNets: each unit of a stage after the first is x + residual(x).
register_adapter(ResidualUnit, lambda unit: [unit.residual], check=_unit_check)


# --------------------------------------------------------------------------------------
# PyTorch's nn.TransformerEncoderLayer / nn.TransformerDecoderLayer (pre- and post-norm)
# --------------------------------------------------------------------------------------

def _post_norm(norm: nn.Module, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    return norm(x + h) - x  # x -> norm(x + h(x)) as the residual step x + f(x)


def _torch_sa(m: Branch, x: torch.Tensor, *, src_mask: Any = None, src_key_padding_mask: Any = None,
              is_causal: bool = False, tgt_mask: Any = None, tgt_key_padding_mask: Any = None,
              tgt_is_causal: bool = False, **context: Any) -> torch.Tensor:
    mask, pad = (tgt_mask, tgt_key_padding_mask) if "memory" in context else (src_mask, src_key_padding_mask)
    causal = tgt_is_causal if "memory" in context else is_causal
    inp = m.norm(x) if m.norm_first else x
    h = m.drop(m.attn(inp, inp, inp, attn_mask=mask, key_padding_mask=pad, need_weights=False,
                      is_causal=causal)[0])
    return h if m.norm_first else _post_norm(m.norm, x, h)


def _torch_cross(m: Branch, x: torch.Tensor, *, memory: torch.Tensor, memory_mask: Any = None,
                 memory_key_padding_mask: Any = None, memory_is_causal: bool = False,
                 **context: Any) -> torch.Tensor:
    inp = m.norm(x) if m.norm_first else x
    h = m.drop(m.attn(inp, memory, memory, attn_mask=memory_mask, key_padding_mask=memory_key_padding_mask,
                      is_causal=memory_is_causal, need_weights=False)[0])
    return h if m.norm_first else _post_norm(m.norm, x, h)


def _torch_ff(m: Branch, x: torch.Tensor, **context: Any) -> torch.Tensor:
    inp = m.norm(x) if m.norm_first else x
    h = m.drop_out(m.linear2(m.dropout(m.activation(m.linear1(inp)))))
    return h if m.norm_first else _post_norm(m.norm, x, h)


def _branch(fn: Callable[..., torch.Tensor], layer: nn.Module, **modules: nn.Module) -> Branch:
    b = Branch(fn, **modules)
    b.norm_first = layer.norm_first
    return b


def _ff(layer: nn.Module, norm: nn.Module, drop_out: nn.Module) -> Branch:
    b = _branch(_torch_ff, layer, norm=norm, linear1=layer.linear1, dropout=layer.dropout,
                linear2=layer.linear2, drop_out=drop_out)
    if isinstance(layer.activation, nn.Module):
        b.add_module("activation", layer.activation)
    else:
        b.activation = layer.activation  # F.relu or F.gelu
    return b


def _torch_encoder(layer: nn.Module) -> list[nn.Module]:
    return [_branch(_torch_sa, layer, norm=layer.norm1, attn=layer.self_attn, drop=layer.dropout1),
            _ff(layer, layer.norm2, layer.dropout2)]


def _torch_decoder(layer: nn.Module) -> list[nn.Module]:
    return [_branch(_torch_sa, layer, norm=layer.norm1, attn=layer.self_attn, drop=layer.dropout1),
            _branch(_torch_cross, layer, norm=layer.norm2, attn=layer.multihead_attn, drop=layer.dropout2),
            _ff(layer, layer.norm3, layer.dropout3)]


def _no_nested_tensors(encoder: nn.Module) -> None:
    # nn.TransformerEncoder's inference fast path packs padded batches into nested tensors, which a
    # momentum stream (a concatenation) cannot hold: the converted stack takes the padded batch.
    if hasattr(encoder, "use_nested_tensor"):
        encoder.use_nested_tensor = False


register_adapter(nn.TransformerEncoderLayer, _torch_encoder, parent=_no_nested_tensors)
register_adapter(nn.TransformerDecoderLayer, _torch_decoder)


# --------------------------------------------------------------------------------------
# Hugging Face transformers (branch functions at module level: the model stays picklable)
# --------------------------------------------------------------------------------------

def _gpt2_attn(m: Branch, x: torch.Tensor, *, encoder_hidden_states: Any = None,
               encoder_attention_mask: Any = None, **context: Any) -> torch.Tensor:
    if encoder_hidden_states is not None:
        raise ValueError("revnet.convert: GPT2Block's cross-attention is not converted; run the model "
                         "without encoder_hidden_states, or unconverted.")
    return m.attn(m.ln_1(x), **context)[0]


def _gpt2_mlp(m: Branch, x: torch.Tensor, **context: Any) -> torch.Tensor:
    return m.mlp(m.ln_2(x))


def _gpt2(block: nn.Module) -> list[nn.Module]:
    return [Branch(_gpt2_attn, ln_1=block.ln_1, attn=block.attn),
            Branch(_gpt2_mlp, ln_2=block.ln_2, mlp=block.mlp)]


def _gpt2_check(block: nn.Module) -> str | None:
    if hasattr(block, "crossattention"):
        return "it has cross-attention (add_cross_attention=True), which is not converted yet"
    return None


def _llama_attn(m: Branch, x: torch.Tensor, **context: Any) -> torch.Tensor:
    return m.self_attn(hidden_states=m.input_layernorm(x), **context)[0]


def _llama_mlp(m: Branch, x: torch.Tensor, **context: Any) -> torch.Tensor:
    return m.mlp(m.post_attention_layernorm(x))


def _llama(block: nn.Module) -> list[nn.Module]:
    return [Branch(_llama_attn, input_layernorm=block.input_layernorm, self_attn=block.self_attn),
            Branch(_llama_mlp, post_attention_layernorm=block.post_attention_layernorm, mlp=block.mlp)]


def _bert_attn(m: Branch, x: torch.Tensor, *, attention_mask: Any = None, encoder_hidden_states: Any = None,
               encoder_attention_mask: Any = None, **context: Any) -> torch.Tensor:
    if encoder_hidden_states is not None:
        raise ValueError("revnet.convert: the BERT layer's cross-attention is not converted; run the model "
                         "without encoder_hidden_states, or unconverted.")
    return m.attention(x, attention_mask, **context)[0] - x  # post-norm: LayerNorm(x + A(x)) - x


def _bert_ffn(m: Branch, x: torch.Tensor, **context: Any) -> torch.Tensor:
    return m.output(m.intermediate(x), x) - x  # LayerNorm(x + FFN(x)) - x


def _bert(block: nn.Module) -> list[nn.Module]:
    return [Branch(_bert_attn, attention=block.attention),
            Branch(_bert_ffn, intermediate=block.intermediate, output=block.output)]


def _bert_check(block: nn.Module) -> str | None:
    if hasattr(block, "crossattention"):
        return "it has cross-attention (add_cross_attention=True), which is not converted yet"
    return None


def _vit_attn(m: Branch, x: torch.Tensor, *, attention_mask: Any = None, **context: Any) -> torch.Tensor:
    return m.dropout(m.attention(m.layernorm_before(x), attention_mask, **context)[0])


def _vit_mlp(m: Branch, x: torch.Tensor, **context: Any) -> torch.Tensor:
    return m.dropout(m.mlp(m.layernorm_after(x)))


def _vit(block: nn.Module) -> list[nn.Module]:
    return [Branch(_vit_attn, layernorm_before=block.layernorm_before, attention=block.attention,
                   dropout=block.dropout),
            Branch(_vit_mlp, layernorm_after=block.layernorm_after, mlp=block.mlp, dropout=block.dropout)]


_HF = "transformers.models"
register_adapter(f"{_HF}.gpt2.modeling_gpt2.GPT2Block", _gpt2, check=_gpt2_check)
for _name in ("llama.modeling_llama.LlamaDecoderLayer", "mistral.modeling_mistral.MistralDecoderLayer",
              "qwen2.modeling_qwen2.Qwen2DecoderLayer"):
    register_adapter(f"{_HF}.{_name}", _llama)
for _name in ("bert.modeling_bert.BertLayer", "roberta.modeling_roberta.RobertaLayer"):
    register_adapter(f"{_HF}.{_name}", _bert, check=_bert_check)
register_adapter(f"{_HF}.vit.modeling_vit.ViTLayer", _vit)
