"""What quantize_model did to each Conv/Linear-like layer (and which modules compute with weights of their own, so
stay float), as a table and as JSON-ready rows.

>>> summary = quantization_summary(quantize_model(model, QuantConfig(weight_bits=4, act_bits=4)))
>>> print(summary)  # layer, type, weight/act bits, weight grid, how (swapped / in place / float: why)
>>> json.dumps(summary.to_dict())
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from qkd.quant.convert import MODEL_ITSELF, is_layer_like, own_weight_modules
from qkd.quant.modules import FLOAT_REASON, SWAPPED, is_quantized_layer
from qkd.quant.quantizer import Quantizer

COLUMNS = ("name", "type", "weight_bits", "act_bits", "weight_grid", "how")
HEADERS = ("layer", "type", "weight", "act", "weight grid", "how")


@dataclass
class QuantSummary:
    """One row per Conv/Linear-like layer (and per module computing with a weight of its own, always float): a
    dict with the keys of :data:`COLUMNS` (bits are ints, or None for float; ``how`` is ``swapped``, ``in place``
    or ``float: <reason>``)."""

    rows: list[dict] = field(default_factory=list)

    @property
    def n_float(self) -> int:
        return sum(r["how"].startswith("float") for r in self.rows)

    @property
    def n_quantized(self) -> int:
        return len(self.rows) - self.n_float

    def to_dict(self) -> dict:
        """JSON-serialisable: the counts and the rows."""
        return {"quantized": self.n_quantized, "float": self.n_float, "layers": [dict(r) for r in self.rows]}

    def __str__(self) -> str:
        table = [HEADERS, *([_cell(r[c]) for c in COLUMNS] for r in self.rows)]
        widths = [max(len(row[i]) for row in table) for i in range(len(HEADERS))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table]
        return "\n".join([*lines, f"{self.n_quantized} quantized, {self.n_float} float"])


def _cell(value: object) -> str:
    return "float" if value is None else str(value)


def quantization_summary(model: nn.Module) -> QuantSummary:
    """Every Conv/Linear-like layer of ``model``, quantized or left float, and how; and every module that computes
    with a weight of its own (``F.conv2d`` on its own parameters), which stays float."""
    own = dict(own_weight_modules(model))
    return QuantSummary([_row(n, m) if n not in own else _float_row(n or MODEL_ITSELF, m, own[n])
                         for n, m in model.named_modules() if (n and is_layer_like(m)) or n in own])  # fmt: skip


def _float_row(name: str, module: nn.Module, reason: str) -> dict:
    return dict(zip(COLUMNS, (name, type(module).__name__, None, None, "", f"float: {reason}")))


def _row(name: str, layer: nn.Module) -> dict:
    if not is_quantized_layer(layer):
        return _float_row(name, layer, getattr(layer, FLOAT_REASON, "not quantized"))
    wq, aq = layer.weight_quant, layer.act_quant
    how = "swapped" if isinstance(layer, SWAPPED) else "in place"
    if wq.bits is None and aq.bits is None:
        how = f"float: {getattr(layer, FLOAT_REASON, 'its quantizers are float')}"
    return dict(zip(COLUMNS, (name, layer.float_class.__name__, wq.bits, aq.bits, _grid(wq), how)))


def _grid(weight_quant: Quantizer) -> str:
    if weight_quant.bits is None:
        return ""
    if not weight_quant.per_channel:
        return "per-tensor"
    return f"per-channel (dim {weight_quant.channel_dim})" if weight_quant.channel_dim else "per-channel"
