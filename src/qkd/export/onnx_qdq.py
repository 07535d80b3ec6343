"""ONNX export of a quantized student with explicit QuantizeLinear/DequantizeLinear (QDQ) nodes.

Fake quantization is invisible to an ONNX runtime unless it is spelled out as QDQ pairs with
integer zero points; only then can a runtime (or a compiler such as TensorRT) see which tensors are
integers and run them as such. Every active quantizer is one affine integer grid,
``offset + scale * clamp(round((x - offset) / scale), qn, qp)`` (LSQ: offset 0; interval: offset =
lower bound), and becomes:

- activations: ``[Sub offset] -> [Clip] -> QuantizeLinear -> DequantizeLinear -> [Add offset]``
  (the Clip, Max -> Min for 4-bit codes, only for a range narrower than the storage type);
- weights: an integer initializer (quantized once, here) ``-> DequantizeLinear -> [Add offset]``.

Codes are stored in INT4/UINT4 at opset 21 or later when the range fits, else in INT8/UINT8; a
narrower bit-width (2, 3, 5..7 bits) lives in the wider type with its range restricted by the Clip.

How: the TorchScript exporter traces a copy of the model whose quantizers are replaced by markers
(a custom ``qkd::Quant`` node carrying an index); the marked graph is then rewritten with the
``onnx`` API. This keeps the integer types, zero points and initializers under our control instead
of depending on which fake-quant ranges the exporter happens to support.
"""

from __future__ import annotations

import contextlib
import copy
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, version_converter
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.export.grid import activation_grid, check_quantized, float_weight, grid, weight_layers
from qkd.export.onnx_common import FOUR_BIT, onnx_runner, run_onnx, save_onnx, storage_type
from qkd.quant import Quantizer, quantizers

__all__ = ["export_onnx", "onnx_runner", "run_onnx", "storage_type"]

_MIN_OPSET = 13  # per-axis (per-channel) QuantizeLinear/DequantizeLinear
_INT4_MIN_OPSET = 21
_TORCHSCRIPT_MAX_OPSET = 20  # the legacy exporter's ceiling; later opsets come from the version converter
_DOMAIN = "qkd"
_UNFOLDED_SLICE = "Constant folding - Only steps=1 can be constant folded"  # torch.onnx's warning


@dataclass
class _Grid:
    """One quantizer's grid (:class:`qkd.export.grid.Grid`) in float32 numpy; ``codes`` holds the integer weights
    (None: activation)."""

    name: str  # the quantizer's qualified name: it prefixes the nodes and initializers that replace it
    scale: np.ndarray  # float32, shape () per tensor or (C,) per output channel
    offset: np.ndarray  # float32, same shape as scale
    qn: int
    qp: int
    codes: np.ndarray | None = None

    @property
    def per_channel(self) -> bool:
        return self.scale.ndim > 0


class _Mark(torch.autograd.Function):
    """Passes the fake-quantized value through in PyTorch; exports as a ``qkd::Quant`` placeholder.

    The placeholder takes the unquantized tensor, so the float subgraph that computed the value is
    dead in the exported graph and dropped; the rewrite then puts the real QDQ nodes in its place.
    """

    @staticmethod
    def forward(ctx, x: Tensor, y: Tensor, index: int) -> Tensor:
        return y.clone()

    @staticmethod
    def symbolic(g, x, y, index: int):
        out = g.op(f"{_DOMAIN}::Quant", x, index_i=index)
        out.setType(x.type())
        return out


class _Marker(nn.Module):
    """Stands in for one quantizer during export: the same values from traceable ops, plus a mark.

    The quantizers' own fused autograd functions cannot be traced by the TorchScript exporter, hence
    the plain-op rewrite of the grid here (only its shape and values matter; the ops are dropped).
    """

    def __init__(self, grid: _Grid, index: int, ndim: int) -> None:
        super().__init__()
        shape = (-1,) + (1,) * (ndim - 1) if grid.per_channel else ()
        # plain attributes, not buffers: the trace takes them as constants and no initializer of theirs can
        # collide with the ``<quantizer name>.scale`` initializers of the rewrite
        self.scale = torch.from_numpy(grid.scale).reshape(shape)
        self.offset = torch.from_numpy(grid.offset).reshape(shape)
        self.qn, self.qp, self.index = grid.qn, grid.qp, index

    def forward(self, x: Tensor) -> Tensor:
        y = self.offset + self.scale * torch.clamp(torch.round((x - self.offset) / self.scale), self.qn, self.qp)
        return _Mark.apply(x, y, self.index)


# ----- from quantizers to grids ----------------------------------------------------------------------
def _grid(name: str, q: Quantizer, weight: Tensor | None) -> _Grid:
    """The grid of ``q`` in float32; for a weight quantizer also its integer codes, quantized once here."""
    g = grid(name, q) if weight is not None else activation_grid(name, q)
    codes = g.codes(weight).to(torch.int64).cpu().numpy() if weight is not None else None
    return _Grid(name, _float32(g.scale), _float32(g.offset), g.qn, g.qp, codes)


def _float32(t: Tensor) -> np.ndarray:
    return t.float().numpy().astype(np.float32)


def _weight_inputs(model: nn.Module) -> dict[int, Tensor]:
    """Weight quantizers (by id) and the float weight each one quantizes, from the layers holding them."""
    return {id(m.weight_quant): float_weight(m) for _, m in weight_layers(model)}


def _mark_quantizers(model: nn.Module) -> list[_Grid]:
    """Replace every active quantizer of ``model`` (in place) by a marker; return their grids by index."""
    weights = _weight_inputs(model)
    grids: list[_Grid] = []
    for name, q in list(quantizers(model)):
        if not q.active:
            continue
        weight = weights.get(id(q))
        grids.append(_grid(name, q, weight))
        ndim = weight.dim() if weight is not None else 0
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, _Marker(grids[-1], len(grids) - 1, ndim))
    return grids


# ----- the graph rewrite -----------------------------------------------------------------------------
def _tensor(name: str, dtype: int, values: np.ndarray) -> TensorProto:
    values = np.asarray(values)
    return helper.make_tensor(name, dtype, values.shape, values.ravel().tolist())


class _Rewriter:
    """Builds the nodes and initializers that replace one ``qkd::Quant`` placeholder."""

    def __init__(self, prefix: str, grid: _Grid, int4: bool) -> None:
        self.prefix, self.grid = prefix, grid
        self.dtype, lo, hi = storage_type(grid.qn, grid.qp, int4)
        self.clip = (grid.qn, grid.qp) != (lo, hi)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, suffix: str, dtype: int, values: np.ndarray) -> str:
        self.inits.append(_tensor(f"{self.prefix}.{suffix}", dtype, values))
        return self.inits[-1].name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs: int) -> str:
        out = output or f"{self.prefix}/{op}_output"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.prefix}/{op}", **attrs))
        return out

    def qparams(self) -> list[str]:
        zero = np.zeros(self.grid.scale.shape, dtype=np.int64)
        return [self.const("scale", TensorProto.FLOAT, self.grid.scale), self.const("zero_point", self.dtype, zero)]

    def activation(self, x: str, out: str) -> None:
        """``[Sub offset] -> [Clip] -> Q -> DQ -> [Add offset]``; Sub/Add only for a non-zero lower bound."""
        g, shifted = self.grid, bool(np.any(self.grid.offset != 0))
        if shifted:
            offset = self.const("offset", TensorProto.FLOAT, g.offset)
            x = self.node("Sub", [x, offset])
        if self.clip:
            x = self.restrict(x)
        params = self.qparams()
        q = self.node("QuantizeLinear", [x, *params])
        y = self.node("DequantizeLinear", [q, *params], None if shifted else out)
        if shifted:
            self.node("Add", [y, offset], out)

    def restrict(self, x: str) -> str:
        """Clamp to [qn, qp] * scale in float: a range narrower than the storage type, exact as round-then-clamp.

        A Clip for 8-bit codes; Max then Min for 4-bit ones, because onnxruntime's Clip/QuantizeLinear
        fusion rejects a 4-bit zero point (onnxruntime 1.32 fails to load the model).
        """
        g = self.grid
        lo = self.const("clip_min", TensorProto.FLOAT, np.float32(g.qn) * g.scale)
        hi = self.const("clip_max", TensorProto.FLOAT, np.float32(g.qp) * g.scale)
        if self.dtype in FOUR_BIT:
            return self.node("Min", [self.node("Max", [x, lo]), hi])
        return self.node("Clip", [x, lo, hi])

    def weight(self, out: str) -> None:
        """Integer initializer ``-> DQ (per channel on axis 0) -> [Add offset]``."""
        g = self.grid
        codes = self.const("codes", self.dtype, g.codes)
        attrs = {"axis": 0} if g.per_channel else {}
        shifted = bool(np.any(g.offset != 0))
        y = self.node("DequantizeLinear", [codes, *self.qparams()], None if shifted else out, **attrs)
        if shifted:
            shape = g.offset.shape + (1,) * (g.codes.ndim - 1) if g.per_channel else ()
            self.node("Add", [y, self.const("offset", TensorProto.FLOAT, g.offset.reshape(shape))], out)


def _rewrite(model: onnx.ModelProto, grids: list[_Grid], int4: bool) -> None:
    """Replace every placeholder by its QDQ nodes, in place, keeping the topological order."""
    graph, nodes, inits, seen = model.graph, [], [], set()
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        grid = grids[next(a.i for a in node.attribute if a.name == "index")]
        prefix = grid.name if grid.name not in seen else f"{grid.name}.call{len(seen)}"  # a layer called twice
        seen.add(prefix)
        rw = _Rewriter(prefix, grid, int4)
        if grid.codes is None:
            rw.activation(node.input[0], node.output[0])
        else:
            rw.weight(node.output[0])
        nodes.extend(rw.nodes)
        inits.extend(rw.inits)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(inits)
    _drop_unused_initializers(graph)
    kept = [o for o in model.opset_import if o.domain != _DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(kept)


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """The float weights now feed nothing (their integer codes replaced them): keep them out of the file."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    value_info = [v for v in graph.value_info if v.name in used]
    del graph.value_info[:]
    graph.value_info.extend(value_info)


# ----- public API ----------------------------------------------------------------------------------
@contextlib.contextmanager
def _refused_by_torch_onnx() -> Iterator[None]:
    """An op the TorchScript exporter cannot write (e.g. adaptive pooling to a size that does not divide the
    input) becomes a one-line QKDError naming it."""
    try:
        yield
    except QKDError:
        raise
    except Exception as e:
        reason = str(e).split(". Please feel free")[0].splitlines()[0]
        raise QKDError(f"torch.onnx cannot export this model in QDQ form ({reason}); the onnx-int format has "
                       "its own exporter") from None  # fmt: skip


def _trace_to_onnx(model: nn.Module, example: Tensor, opset: int) -> onnx.ModelProto:
    """Export the marked model with the TorchScript exporter (it keeps custom placeholder nodes)."""
    buffer = io.BytesIO()
    with warnings.catch_warnings(), _refused_by_torch_onnx():
        warnings.simplefilter("ignore", DeprecationWarning)  # the legacy exporter announces its deprecation
        # F.pad reverses its padding list with a Slice of step -1, which constant folding skips: the graph is right
        warnings.filterwarnings("ignore", _UNFOLDED_SLICE, UserWarning)
        torch.onnx.export(
            model,
            (example,),
            buffer,
            dynamo=False,
            opset_version=min(opset, _TORCHSCRIPT_MAX_OPSET),
            input_names=["input"],
            output_names=["output"],
            dynamic_axes={"input": {0: "batch"}, "output": {0: "batch"}},
            do_constant_folding=True,
            custom_opsets={_DOMAIN: 1},
        )
    return onnx.load_from_string(buffer.getvalue())


def export_onnx(
    model: nn.Module, example: torch.Tensor, path: str | Path, opset: int = 21, contract: dict | None = None
) -> Path:
    """Write ``model`` (a quantized student) as ONNX with QDQ nodes and integer weights; return the path.

    ``example`` is one input batch (its batch size is free in the file). The model itself is left
    untouched: a CPU copy in eval mode is exported. The file passes ``onnx.checker.check_model``.
    ``contract`` (see :mod:`qkd.export.contract`) goes into its metadata, and its preprocessing into the
    graph where it says ``preprocessing_baked``.
    """
    if opset < _MIN_OPSET:
        raise QKDError(f"ONNX export needs opset {_MIN_OPSET} or later (per-channel QDQ); got {opset}")
    check_quantized(model)
    clone = copy.deepcopy(model).float().cpu().eval()
    grids = _mark_quantizers(clone)
    with torch.no_grad():
        onnx_model = _trace_to_onnx(clone, example.detach().float().cpu(), opset)
    if opset > _TORCHSCRIPT_MAX_OPSET:  # before the rewrite, so no 4-bit type meets an older opset
        onnx_model = version_converter.convert_version(onnx_model, opset)
    _rewrite(onnx_model, grids, int4=opset >= _INT4_MIN_OPSET)
    return save_onnx(onnx_model, path, contract)
