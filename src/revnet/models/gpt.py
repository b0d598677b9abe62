"""GPT language models: the residual ``GPT`` (GPT-2, Radford et al. 2019) and the reversible ``RevGPT``.

Both are pre-norm decoder-only transformers over byte or BPE tokens: token embedding, learned
position embeddings (or rotary ones, ``pos_embed="rope"``: Su et al. 2021, rotated into every
self-attention's queries and keys, no position parameters), causal self-attention blocks, a
final LayerNorm and a linear head whose weight is tied to the token embedding (``tie_weights``).
``forward(tokens (B, T) int64, *, key_padding_mask=None) -> logits (B, T, vocab_size)``, or with
``targets=`` the training loss without the logits ever held at once (:mod:`revnet.models.lm_loss`);
``generate(tokens, max_new_tokens, temperature=, top_k=, generator=)`` samples a continuation.

- :class:`GPT`: a :class:`~revnet.models.transformer.Transformer` with ``causal=True``. At
  GPT-2's shapes (``gpt2_small``, ``gpt2_medium``) the parameter counts are GPT-2's:
  124,439,808 and 354,823,168 (tied head, learned positions, 50257 tokens, context 1024).
- :class:`RevGPT`: the same branches in a :class:`~revnet.models.transformer.RevTransformer`:
  the embedded tokens are duplicated into two streams of width ``C`` and coupled reversibly
  (no block activations stored in training). Readout: the **mean of the two streams**
  (``fuse="mean"``), then ``LayerNorm(C)`` and the head. A concatenation (RevViT's
  ``LayerNorm(2C)``) would need a ``2C``-wide head that cannot tie to the ``C``-wide embedding;
  with the mean the head ties, and RevGPT has exactly GPT's parameters at every size.

Without gradients (``torch.no_grad()``, generation) the reversible sequence runs its plain
forward. The registered constructors take ``vocab_size=`` and ``context_length=`` (and every
other constructor argument) through :func:`revnet.create_model`; its ``num_classes`` and
``in_chans`` (image-classifier arguments it passes to every model) are ignored: a language model's
outputs are its ``vocab_size`` tokens.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from ..engine.modes import ReversibleSwitch
from .lm_loss import linear_cross_entropy
from .registry import register_model
from .transformer import RevTransformer, Transformer, rope_tables

__all__ = ["GPT", "RevGPT"]

POS_EMBEDS = ("learned", "rope")


class _GPTBase(nn.Module):
    """Embeddings, the head, GPT-2's initialisation and the input check both GPTs share."""

    transformer: Transformer | RevTransformer

    def _build_io(self, vocab_size: int, context_length: int, embed_dim: int, num_heads: int, pos_embed: str,
                  rope_base: float, drop_rate: float, tie_weights: bool, head_in: int,
                  factory: dict[str, Any]) -> None:
        owner = type(self).__name__
        if vocab_size < 1 or context_length < 1:
            raise ValueError(f"{owner}: vocab_size ({vocab_size}) and context_length ({context_length}) "
                             f"must be >= 1.")
        if pos_embed not in POS_EMBEDS:
            raise ValueError(f"{owner}: unknown pos_embed {pos_embed!r}; expected one of {POS_EMBEDS}.")
        if pos_embed == "rope" and (embed_dim // num_heads) % 2:
            raise ValueError(f"{owner}: pos_embed='rope' rotates channel pairs, so the head width "
                             f"embed_dim / num_heads = {embed_dim // num_heads} must be even. Fix: change "
                             f"num_heads or embed_dim, or use pos_embed='learned'.")
        if tie_weights and head_in != embed_dim:
            raise ValueError(f"{owner}: tie_weights needs a head on {embed_dim} features, the embedding's "
                             f"width, but the stream leaves with {head_in}. Fix: fuse='mean' or "
                             f"tie_weights=False.")
        self.vocab_size, self.context_length, self.pos_embed_kind = vocab_size, context_length, pos_embed
        self.head_dim, self.rope_base = embed_dim // num_heads, rope_base
        self.tok_embed = nn.Embedding(vocab_size, embed_dim, **factory)
        self.pos_embed = (nn.Parameter(torch.zeros(1, context_length, embed_dim, **factory))
                          if pos_embed == "learned" else None)
        self.drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(head_in, vocab_size, bias=False, **factory)
        if tie_weights:
            self.head.weight = self.tok_embed.weight

    def _init_weights(self, depth: int) -> None:
        # GPT-2's: normal(0, 0.02) for linear weights and the token embedding, 0.01 for positions,
        # and the projections back into the residual stream scaled by 1/sqrt(2 * depth).
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
        nn.init.normal_(self.tok_embed.weight, std=0.02)
        if self.pos_embed is not None:
            nn.init.normal_(self.pos_embed, std=0.01)
        for name, p in self.transformer.named_parameters():
            if name.endswith(("proj.weight", "fc2.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * depth))

    def _embed(self, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, Any]]:
        owner = type(self).__name__
        if tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"{owner}: expects token ids of shape (B, T), int64, got {tuple(tokens.shape)} "
                             f"{tokens.dtype}. Fix: pass ids.long() with a batch dimension (ids[None] for "
                             f"one sequence).")
        if tokens.numel() and not torch.compiler.is_compiling():
            low, high = int(tokens.min()), int(tokens.max())
            if low < 0 or high >= self.vocab_size:
                raise ValueError(f"{owner}: token ids must be in [0, {self.vocab_size}) (vocab_size), got "
                                 f"ids from {low} to {high}. Fix: encode with the model's vocabulary (bytes: "
                                 f"0-255 for vocab_size=256), or build the model with a larger vocab_size.")
        t = tokens.shape[1]
        if t > self.context_length:
            raise ValueError(f"{owner}: {t} tokens exceed context_length {self.context_length}. Fix: crop to "
                             f"the last {self.context_length} tokens, or build with context_length={t}.")
        x = self.tok_embed(tokens)  # (B, T, C)
        context: dict[str, Any] = {}
        if self.pos_embed is not None:
            x = x + self.pos_embed[:, :t]
        else:
            context["rope"] = rope_tables(t, self.head_dim, base=self.rope_base, device=x.device,
                                          dtype=x.dtype)
        return self.drop(x), context

    def forward(self, tokens: torch.Tensor, *, targets: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits ``(B, T, vocab_size)`` of the next token at every position of ``tokens`` ``(B, T)``;
        with ``targets`` (B, T) the mean cross-entropy against them instead (a scalar, in nats;
        targets of -100 count for nothing), computed by
        :func:`~revnet.models.lm_loss.linear_cross_entropy` without keeping the logits: for
        training, where the logits would be the largest activation of all."""
        x, context = self._embed(tokens)
        h = self.transformer(x, key_padding_mask=key_padding_mask, **context)
        if targets is None:
            return self.head(h)
        if targets.shape != tokens.shape:
            raise ValueError(f"{type(self).__name__}: targets {tuple(targets.shape)} must have the tokens' "
                             f"shape {tuple(tokens.shape)} (the next token of every position).")
        return linear_cross_entropy(h, self.head.weight, targets, self.head.bias)

    @torch.no_grad()
    def generate(self, tokens: torch.Tensor, max_new_tokens: int, *, temperature: float = 1.0,
                 top_k: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """``tokens`` (B, T) followed by ``max_new_tokens`` sampled ones, (B, T + max_new_tokens).

        Each new token is drawn from the softmax of the last position's logits divided by
        ``temperature`` (0: the most likely token), among the ``top_k`` likeliest if given; the
        model sees the last ``context_length`` tokens. Runs without gradients, so a reversible
        model runs its plain forward (nothing to rebuild); evaluation mode for the call.
        """
        owner = type(self).__name__
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"{owner}.generate: temperature must be >= 0 (0: always the likeliest token), "
                             f"got {temperature}.")
        if top_k is not None and top_k < 1:
            raise ValueError(f"{owner}.generate: top_k must be >= 1 (or None: every token), got {top_k}.")
        if max_new_tokens < 0:
            raise ValueError(f"{owner}.generate: max_new_tokens must be >= 0, got {max_new_tokens}.")
        if tokens.dim() != 2 or tokens.shape[1] < 1:
            raise ValueError(f"{owner}.generate: expects a prompt of token ids (B, T) with T >= 1, got shape "
                             f"{tuple(tokens.shape)}. Fix: ids[None] for one sequence.")
        was_training = self.training
        self.eval()
        try:
            for _ in range(max_new_tokens):
                logits = self(tokens[:, -self.context_length:])[:, -1].float()  # (B, V)
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = logits.topk(top_k, dim=-1).values[:, -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                tokens = torch.cat([tokens, nxt], dim=1)
        finally:
            self.train(was_training)
        return tokens


class GPT(_GPTBase):
    """GPT-2 (Radford et al. 2019): the residual decoder-only language model.

    Args:
        vocab_size: tokens (50257: GPT-2's BPE; 256: bytes).
        context_length: longest sequence (the learned position table's length).
        embed_dim: token width.
        depth: transformer blocks.
        num_heads: attention heads; must divide ``embed_dim``.
        mlp_ratio: MLP hidden width over ``embed_dim``.
        qkv_bias: bias in the query/key/value projection.
        drop_rate: dropout after the embeddings, the attention projection and in the MLP.
        attn_drop_rate: dropout on the attention weights.
        drop_path_rate: stochastic depth of the last block (linear from 0 over the blocks).
        pos_embed: ``"learned"`` (GPT-2) or ``"rope"`` (rotary, no position parameters).
        rope_base: RoPE's frequency base.
        tie_weights: the head's weight is the token embedding's (GPT-2).
    """

    def __init__(self, vocab_size: int = 50257, context_length: int = 1024, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, *,
                 pos_embed: str = "learned", rope_base: float = 10000.0, tie_weights: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.transformer = Transformer(embed_dim, depth, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                       drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                       drop_path_rate=drop_path_rate, causal=True, **factory)
        self._build_io(vocab_size, context_length, embed_dim, num_heads, pos_embed, rope_base, drop_rate,
                       tie_weights, self.transformer.out_features, factory)
        self._init_weights(depth)


class RevGPT(ReversibleSwitch, _GPTBase):
    """The reversible GPT: :class:`GPT`'s branches coupled in two streams, read out from their mean.

    Arguments as :class:`GPT`, plus ``fuse`` (``"mean"``, the default, lets the head tie to the
    embedding; ``"concat"`` needs ``tie_weights=False``), ``reversible`` and ``exact`` (see
    :class:`~revnet.models.transformer.RevTransformer`).
    """

    def __init__(self, vocab_size: int = 50257, context_length: int = 1024, embed_dim: int = 768,
                 depth: int = 12, num_heads: int = 12, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop_rate: float = 0.0, attn_drop_rate: float = 0.0, drop_path_rate: float = 0.0, *,
                 pos_embed: str = "learned", rope_base: float = 10000.0, tie_weights: bool = True,
                 fuse: str = "mean", reversible: bool = True, exact: bool = False,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.transformer = RevTransformer(embed_dim, depth, num_heads, mlp_ratio, qkv_bias=qkv_bias,
                                          drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
                                          drop_path_rate=drop_path_rate, causal=True, fuse=fuse,
                                          reversible=reversible, exact=exact, **factory)
        self._build_io(vocab_size, context_length, embed_dim, num_heads, pos_embed, rope_base, drop_rate,
                       tie_weights, self.transformer.out_features, factory)
        self._init_weights(depth)


# --------------------------------------------------------------------------------------
# Registered models
# --------------------------------------------------------------------------------------

def _gpt(cls: type[nn.Module], defaults: dict[str, Any], kw: dict[str, Any]) -> nn.Module:
    kw = {k: v for k, v in kw.items() if k not in ("num_classes", "in_chans")}  # image-classifier arguments
    return cls(**{**defaults, **kw})


_MINI = {"vocab_size": 256, "context_length": 128, "embed_dim": 128, "depth": 4, "num_heads": 4}  # bytes
_SMALL = {"vocab_size": 50257, "context_length": 1024, "embed_dim": 768, "depth": 12, "num_heads": 12}
_MEDIUM = {"vocab_size": 50257, "context_length": 1024, "embed_dim": 1024, "depth": 24, "num_heads": 16}


@register_model
def gpt_mini(**kw: Any) -> nn.Module:
    """CPU-sized byte-level GPT: 4 blocks of 128, 4 heads, context 128, 256 tokens: 0.84M parameters."""
    return _gpt(GPT, _MINI, kw)


@register_model
def revgpt_mini(**kw: Any) -> nn.Module:
    """CPU-sized byte-level RevGPT: as ``gpt_mini``, reversible (the same 0.84M parameters)."""
    return _gpt(RevGPT, _MINI, kw)


@register_model
def gpt2_small(**kw: Any) -> nn.Module:
    """GPT-2 small (124M): 12 blocks of 768, 12 heads, context 1024, tied head: 124,439,808 parameters."""
    return _gpt(GPT, _SMALL, kw)


@register_model
def gpt2_medium(**kw: Any) -> nn.Module:
    """GPT-2 medium (350M): 24 blocks of 1024, 16 heads, context 1024, tied head: 354,823,168 parameters."""
    return _gpt(GPT, _MEDIUM, kw)


@register_model
def revgpt2_small(**kw: Any) -> nn.Module:
    """RevGPT at GPT-2 small's shapes: reversible, mean readout, tied head: 124,439,808 parameters."""
    return _gpt(RevGPT, _SMALL, kw)


@register_model
def revgpt2_medium(**kw: Any) -> nn.Module:
    """RevGPT at GPT-2 medium's shapes: reversible, mean readout, tied head: 354,823,168 parameters."""
    return _gpt(RevGPT, _MEDIUM, kw)
