"""Attention modules whose projections run through ``nn.Linear`` submodules, so that qkd can quantize them.

``nn.MultiheadAttention`` reads its input projection as a parameter (``F.multi_head_attention_forward``),
and torchvision's Swin attention passes ``self.qkv.weight`` / ``self.proj.weight`` to a function that calls
``F.linear`` itself: a swapped ``QLinear`` there would never run, its quantizers never see a tensor. Before
quantizing, :func:`swap_attention` replaces them by equivalents that call their Linear layers:

- :class:`LinearMultiheadAttention`: ``nn.MultiheadAttention`` with ``in_proj`` (E -> 3E) and ``out_proj`` as
  ``nn.Linear`` layers sharing the original parameters; its state dict keys are the original's
  (``in_proj_weight``, ``in_proj_bias``, ``out_proj.*``) plus the quantizers';
- :class:`LinearWindowAttention` (``ShiftedWindowAttention``, V1 and V2): the same object and state, a
  forward that calls ``self.qkv`` and ``self.proj``.

Both compute what the originals compute, in float (the same ops, up to float rounding where the original's
fused kernels order them otherwise). :func:`restore_attention` gives the original classes back.

>>> model = swap_attention(torchvision.models.vit_b_16())  # then quantize_model quantizes all 50 Linear layers
"""

from __future__ import annotations

import math
import sys

import torch
from torch import Tensor, nn
from torch.nn import functional as F

__all__ = ["LinearMultiheadAttention", "LinearWindowAttention", "restore_attention", "swap_attention"]

_IN_PROJ = {"in_proj.weight": "in_proj_weight", "in_proj.bias": "in_proj_bias"}


class LinearMultiheadAttention(nn.Module):
    """``nn.MultiheadAttention`` (packed q/k/v of one width, no ``add_bias_kv`` / ``add_zero_attn``) whose
    projections are the ``nn.Linear`` layers ``in_proj`` and ``out_proj``, so quantize_model quantizes both.

    Self-attention (query, key and value the same tensor) runs ``in_proj`` once; otherwise each of them goes
    through it and keeps its third. Masks, dropout, ``batch_first`` and the returned weights are as in torch.

    >>> attn = LinearMultiheadAttention.from_float(nn.MultiheadAttention(16, 2, batch_first=True))
    >>> out, weights = attn(x, x, x)
    """

    # torch's fused paths (e.g. nn.TransformerEncoderLayer's) read in_proj_weight directly when this is True
    _qkv_same_embed_dim = False

    def __init__(self, embed_dim: int, num_heads: int, dropout: float, batch_first: bool, bias: bool) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = embed_dim, num_heads, embed_dim // num_heads
        self.dropout, self.batch_first = dropout, batch_first
        self.in_proj = nn.Linear(embed_dim, 3 * embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self._register_state_dict_hook(_to_torch_keys)
        self._register_load_state_dict_pre_hook(_from_torch_keys)

    @staticmethod
    def supports(mha: nn.MultiheadAttention) -> str | None:
        """Why ``mha`` cannot be swapped (then it stays float), or None."""
        if type(mha) is not nn.MultiheadAttention:
            return f"a subclass of nn.MultiheadAttention ({type(mha).__name__}) may compute otherwise"
        if not mha._qkv_same_embed_dim:
            return "its key/value widths differ from the query's (kdim/vdim)"
        if mha.bias_k is not None or mha.add_zero_attn:
            return "add_bias_kv / add_zero_attn"
        return None

    @classmethod
    def from_float(cls, mha: nn.MultiheadAttention) -> LinearMultiheadAttention:
        """The same attention, sharing ``mha``'s parameters (optimizers and checkpoints carry over)."""
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.dropout, mha.batch_first, bias)
        new.in_proj.weight, new.out_proj.weight = mha.in_proj_weight, mha.out_proj.weight
        if bias:
            new.in_proj.bias, new.out_proj.bias = mha.in_proj_bias, mha.out_proj.bias
        new.to(mha.in_proj_weight.device).train(mha.training)
        return new

    def to_float(self) -> nn.MultiheadAttention:
        """``nn.MultiheadAttention`` back, sharing this module's parameters (both projections float Linear)."""
        bias = self.in_proj.bias is not None
        mha = nn.MultiheadAttention(self.embed_dim, self.num_heads, self.dropout, bias, batch_first=self.batch_first)
        mha.in_proj_weight, mha.out_proj.weight = self.in_proj.weight, self.out_proj.weight
        if bias:
            mha.in_proj_bias, mha.out_proj.bias = self.in_proj.bias, self.out_proj.bias
        return mha.train(self.training)

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        key_padding_mask: Tensor | None = None,
        need_weights: bool = True,
        attn_mask: Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention.forward``; ``is_causal`` is a hint there too (``attn_mask`` gives the mask)."""
        batched = query.dim() == 3
        q, k, v = (t if batched else t.unsqueeze(1) for t in self._project(query, key, value))
        if self.batch_first and batched:
            q, k, v = (t.transpose(0, 1) for t in (q, k, v))  # (length, batch, embed) from here on
        length, batch, _ = q.shape
        q, k, v = (t.reshape(t.shape[0], batch * self.num_heads, self.head_dim).transpose(0, 1) for t in (q, k, v))
        scores = torch.bmm(q * (1.0 / math.sqrt(self.head_dim)), k.transpose(1, 2))
        mask = _merged_mask(attn_mask, key_padding_mask, batch, self.num_heads, k.shape[1], scores.dtype)
        weights = F.softmax(scores if mask is None else scores + mask, dim=-1)
        out = torch.bmm(F.dropout(weights, self.dropout, self.training), v)
        out = self.out_proj(out.transpose(0, 1).reshape(length, batch, self.embed_dim))
        if self.batch_first and batched:
            out = out.transpose(0, 1)
        return (out if batched else out.squeeze(1)), self._weights(weights, need_weights, average_attn_weights, batched)

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v through ``in_proj``: once for self-attention, else each input keeps its third."""
        if query is key and key is value:
            return tuple(self.in_proj(query).chunk(3, dim=-1))  # type: ignore[return-value]
        e = self.embed_dim
        return self.in_proj(query)[..., :e], self.in_proj(key)[..., e : 2 * e], self.in_proj(value)[..., 2 * e :]

    def _weights(self, weights: Tensor, need: bool, average: bool, batched: bool) -> Tensor | None:
        if not need:
            return None
        weights = weights.view(-1, self.num_heads, *weights.shape[1:])
        weights = weights.mean(dim=1) if average else weights
        return weights if batched else weights.squeeze(0)


def _as_float_mask(mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """A mask to add to the scores: a boolean one's True (not allowed) becomes -inf."""
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))


def _merged_mask(attn_mask: Tensor | None, padding: Tensor | None, batch: int, heads: int, keys: int,
                 dtype: torch.dtype) -> Tensor | None:  # fmt: skip
    """``attn_mask`` ((L, S) or (N*H, L, S)) and ``key_padding_mask`` ((N, S)) as one additive (N*H, L|1, S)
    mask."""
    mask, pad = _as_float_mask(attn_mask, dtype), _as_float_mask(padding, dtype)
    if pad is not None:
        pad = pad.reshape(-1, 1, 1, keys).expand(-1, heads, 1, keys).reshape(batch * heads, 1, keys)
        mask = pad if mask is None else mask + pad
    return mask


def _to_torch_keys(module: nn.Module, state: dict, prefix: str, local_metadata: dict) -> None:
    for ours, torchs in _IN_PROJ.items():
        if prefix + ours in state:
            state[prefix + torchs] = state.pop(prefix + ours)


def _from_torch_keys(state: dict, prefix: str, *args: object) -> None:
    for ours, torchs in _IN_PROJ.items():
        if prefix + torchs in state:
            state[prefix + ours] = state.pop(prefix + torchs)


# ----- torchvision's Swin ----------------------------------------------------------------------------------
def _linear(layer: nn.Module, x: Tensor, bias: Tensor | None) -> Tensor:
    """``layer(x)`` with another bias (Swin V2 zeroes the key's): a quantized layer's quantizers still apply."""
    act_quant, weight_quant = getattr(layer, "act_quant", None), getattr(layer, "weight_quant", None)
    weight = weight_quant(layer.weight) if weight_quant is not None else layer.weight
    return F.linear(act_quant(x) if act_quant is not None else x, weight, bias)


def _window_partition(x: Tensor, window: list[int], shift: list[int]) -> tuple[Tensor, list[int], tuple[int, int]]:
    """Pad to whole windows, roll by ``shift`` (none where a window covers the map), cut into windows."""
    b, h, w, c = x.shape
    x = F.pad(x, (0, 0, 0, (window[1] - w % window[1]) % window[1], 0, (window[0] - h % window[0]) % window[0]))
    _, ph, pw, _ = x.shape
    shift = [0 if window[0] >= ph else shift[0], 0 if window[1] >= pw else shift[1]]
    if sum(shift) > 0:
        x = torch.roll(x, shifts=(-shift[0], -shift[1]), dims=(1, 2))
    x = x.view(b, ph // window[0], window[0], pw // window[1], window[1], c)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window[0] * window[1], c), shift, (ph, pw)


def _shift_mask(x: Tensor, padded: tuple[int, int], window: list[int], shift: list[int]) -> Tensor:
    """torchvision's mask of the shifted windows: -100 between tokens from different regions."""
    ph, pw = padded
    mask = x.new_zeros((ph, pw))
    h_slices = ((0, -window[0]), (-window[0], -shift[0]), (-shift[0], None))
    w_slices = ((0, -window[1]), (-window[1], -shift[1]), (-shift[1], None))
    for count, (h, w) in enumerate((h, w) for h in h_slices for w in w_slices):
        mask[h[0] : h[1], w[0] : w[1]] = count
    mask = mask.view(ph // window[0], window[0], pw // window[1], window[1]).permute(0, 2, 1, 3)
    mask = mask.reshape(-1, window[0] * window[1])
    mask = mask.unsqueeze(1) - mask.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


class LinearWindowAttention(nn.Module):
    """Mixin over torchvision's ``ShiftedWindowAttention`` / ``ShiftedWindowAttentionV2``: their
    ``shifted_window_attention`` with ``self.qkv`` and ``self.proj`` called as layers (quantized ones quantize)."""

    float_class: type[nn.Module]

    def forward(self, x: Tensor) -> Tensor:
        b, h, w, c = x.shape
        windows, shift, padded = _window_partition(x, self.window_size, self.shift_size)
        n, tokens = windows.shape[:2]
        qkv = self._qkv(windows).reshape(n, tokens, 3, self.num_heads, c // self.num_heads).permute(2, 0, 3, 1, 4)
        attn = self._scores(qkv[0], qkv[1], c) + self.get_relative_position_bias()
        if sum(shift) > 0:
            nw = n // b
            attn = attn.view(b, nw, self.num_heads, tokens, tokens)
            attn = attn + _shift_mask(x, padded, self.window_size, shift).unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, tokens, tokens)
        attn = F.dropout(F.softmax(attn, dim=-1), p=self.attention_dropout, training=self.training)
        out = self.proj(attn.matmul(qkv[2]).transpose(1, 2).reshape(n, tokens, c))
        out = F.dropout(out, p=self.dropout, training=self.training)
        return self._reverse(out, b, padded, shift)[:, :h, :w, :].contiguous()

    def _qkv(self, x: Tensor) -> Tensor:
        bias = self.qkv.bias
        if getattr(self, "logit_scale", None) is not None and bias is not None:  # V2: no bias on the keys
            bias = bias.clone()
            bias[bias.numel() // 3 : 2 * bias.numel() // 3] = 0
        return _linear(self.qkv, x, bias)

    def _scores(self, q: Tensor, k: Tensor, c: int) -> Tensor:
        logit_scale = getattr(self, "logit_scale", None)
        if logit_scale is None:
            return (q * (c // self.num_heads) ** -0.5).matmul(k.transpose(-2, -1))
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)  # V2: cosine attention
        return attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()

    def _reverse(self, x: Tensor, b: int, padded: tuple[int, int], shift: list[int]) -> Tensor:
        ph, pw = padded
        ws = self.window_size
        x = x.view(b, ph // ws[0], pw // ws[1], ws[0], ws[1], -1).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, -1)
        return torch.roll(x, shifts=(shift[0], shift[1]), dims=(1, 2)) if sum(shift) > 0 else x


_WINDOW_CLASSES: dict[type[nn.Module], type[nn.Module]] = {}


def _window_class(cls: type[nn.Module]) -> type[nn.Module]:
    if cls not in _WINDOW_CLASSES:
        _WINDOW_CLASSES[cls] = type(f"Linear{cls.__name__}", (LinearWindowAttention, cls), {"float_class": cls})
    return _WINDOW_CLASSES[cls]


def _swin_classes() -> tuple[type[nn.Module], ...]:
    """torchvision's Swin attention classes, when torchvision's Swin is loaded (else no model holds one)."""
    swin = sys.modules.get("torchvision.models.swin_transformer")
    return (swin.ShiftedWindowAttention, swin.ShiftedWindowAttentionV2) if swin is not None else ()


# ----- swapping -------------------------------------------------------------------------------------------
def swap_attention(model: nn.Module) -> dict[str, str]:
    """Replace, in place, every ``nn.MultiheadAttention`` :class:`LinearMultiheadAttention` supports and every
    torchvision Swin attention by their Linear-calling forms; return ``{name: why}`` of the attention modules
    left as they were (their projections stay float)."""
    kept, swin = {}, _swin_classes()
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.MultiheadAttention):
            why = LinearMultiheadAttention.supports(module)
            if why is None:
                _set(model, name, LinearMultiheadAttention.from_float(module))
            else:
                kept[name] = why
        elif type(module) in swin:
            module.__class__ = _window_class(type(module))
    return kept


def restore_attention(model: nn.Module) -> nn.Module:
    """Undo :func:`swap_attention`, in place (the projections must be float layers again)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LinearMultiheadAttention):
            _set(model, name, module.to_float())
        elif isinstance(module, LinearWindowAttention):
            module.__class__ = module.float_class
    return model


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)
