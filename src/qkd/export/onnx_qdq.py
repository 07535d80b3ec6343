"""ONNX export of a quantized student with explicit QuantizeLinear/DequantizeLinear (QDQ) nodes.

Fake quantization is invisible to an ONNX runtime unless it is spelled out as QDQ pairs with
integer zero points; only then can a runtime (or a compiler such as TensorRT) see which tensors are
integers and run them as such. Every active quantizer is one affine integer grid,
``offset + scale * clamp(round((x - offset) / scale), qn, qp)`` (LSQ: offset 0; interval: offset =
lower bound), and becomes:

- activations: ``[Sub offset] -> QuantizeLinear -> [Clip on the codes] -> DequantizeLinear -> [Add offset]``
  (the Clip only for a range narrower than the storage type);
- weights: an integer initializer (quantized once, here) ``-> DequantizeLinear -> [Add offset]``, with an
  inference BatchNormalization after the Conv folded into its per-channel scale and a bias.

That is the standard pattern runtimes fuse (onnxruntime: ``DQ -> Conv -> Q`` into QLinearConv) wherever a
conv's output goes only to the next quantizer; the Sub/Add of a grid with an offset (interval) keeps that
layer in float (an offset of a whole number of steps, ``quant.integer_zero_point``, is an integer zero point
instead; the export warns and counts the float ones in its metadata). Codes are stored in INT8/UINT8 (the types
integer kernels take), a narrower bit-width with its range restricted by the Clip; ``four_bit_storage`` stores
4-bit codes in INT4/UINT4 at opset 21 or later (a float Max -> Min before Q then restricts the range), which no
onnxruntime CPU kernel fuses.

How: the TorchScript exporter traces a copy of the model whose quantizers are replaced by markers
(a custom ``qkd::Quant`` node carrying an index); the marked graph is then rewritten with the
``onnx`` API. This keeps the integer types, zero points and initializers under our control instead
of depending on which fake-quant ranges the exporter happens to support.

Everything between quantized layers (LayerNorm, GELU, softmax, the matmuls of attention, permutes) stays as
torch.onnx writes it, a float island between a DequantizeLinear and the next QuantizeLinear, as TensorRT and
onnxruntime expect; a Linear weight a MatMul reads is stored transposed, so it too is ``DQ -> MatMul``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper, version_converter
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.export.grid import activation_grid, check_quantized, float_weight, fold_batchnorm, grid, weight_layers
from qkd.export.onnx_common import FOUR_BIT, onnx_runner, run_onnx, save_onnx, storage_type
from qkd.export.onnx_intconv import integer_matmuls
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
    axis: int = 0  # the codes' output-channel axis (1 once transposed for a MatMul)

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
_RAW = {TensorProto.FLOAT: np.float32, TensorProto.INT8: np.int8, TensorProto.UINT8: np.uint8}


def _tensor(name: str, dtype: int, values: np.ndarray) -> TensorProto:
    """An initializer; 8-bit and float32 ones as raw bytes (as a list, int8 codes were int32 varints: a
    negative one took 10 bytes)."""
    values = np.asarray(values)
    if dtype in _RAW:
        return helper.make_tensor(name, dtype, values.shape, values.astype(_RAW[dtype]).tobytes(), raw=True)
    return helper.make_tensor(name, dtype, values.shape, values.ravel().tolist())


class _Rewriter:
    """Builds the nodes and initializers that replace one ``qkd::Quant`` placeholder."""

    def __init__(self, prefix: str, grid: _Grid, int4: bool) -> None:
        self.prefix, self.grid = prefix, grid
        self.dtype, lo, hi = storage_type(grid.qn, grid.qp, int4)
        self.clip = (grid.qn, grid.qp) != (lo, hi)
        self.zero = _integer_zero_point(grid, lo, hi)
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
        zero = self.zero if self.zero is not None else np.zeros(self.grid.scale.shape, dtype=np.int64)
        return [self.const("scale", TensorProto.FLOAT, self.grid.scale), self.const("zero_point", self.dtype, zero)]

    @property
    def shifted(self) -> bool:
        """A non-zero offset that is no integer zero point: a float Sub/Add around the QDQ (a float layer)."""
        return bool(np.any(self.grid.offset != 0)) and self.zero is None

    def activation(self, x: str, out: str) -> None:
        """``[Sub offset] -> Q -> [Clip codes] -> DQ -> [Add offset]``; Sub/Add only for a non-zero lower bound.

        A range narrower than the storage type is clamped on the integer codes, between Q and DQ: nothing
        comes between the producer and its QuantizeLinear nor between DequantizeLinear and its consumer, so
        onnxruntime fuses ``DQ -> Conv -> Q`` into an integer convolution (QLinearConv). For 8-bit storage the
        clamp is a Clip on the codes, exact as round-then-clamp; 4-bit types (``four_bit_storage``) keep the
        float clamp before Q, because no runtime op clips INT4/UINT4.
        """
        g, shifted = self.grid, self.shifted
        if shifted:
            offset = self.const("offset", TensorProto.FLOAT, g.offset)
            x = self.node("Sub", [x, offset])
        float_clip = self.clip and self.dtype in FOUR_BIT
        if float_clip:
            x = self.restrict(x)
        params = self.qparams()
        q = self.node("QuantizeLinear", [x, *params])
        if self.clip and not float_clip:
            lo = self.const("code_min", self.dtype, np.array(g.qn))
            hi = self.const("code_max", self.dtype, np.array(g.qp))
            q = self.node("Clip", [q, lo, hi])
        y = self.node("DequantizeLinear", [q, *params], None if shifted else out)
        if shifted:
            self.node("Add", [y, offset], out)

    def restrict(self, x: str) -> str:
        """Clamp to [qn, qp] * scale in float: a range narrower than the storage type, exact as round-then-clamp.

        4-bit storage only: Max then Min, because onnxruntime's Clip/QuantizeLinear fusion rejects a 4-bit
        zero point (onnxruntime 1.32 fails to load the model).
        """
        g = self.grid
        zero = np.float32(0) if self.zero is None else self.zero.astype(np.float32)  # codes count from the zero point
        lo = self.const("clip_min", TensorProto.FLOAT, (np.float32(g.qn) - zero) * g.scale)
        hi = self.const("clip_max", TensorProto.FLOAT, (np.float32(g.qp) - zero) * g.scale)
        return self.node("Min", [self.node("Max", [x, lo]), hi])

    def weight(self, out: str) -> None:
        """Integer initializer ``-> DQ (per channel on its output-channel axis) -> [Add offset]``."""
        g = self.grid
        codes = self.const("codes", self.dtype, g.codes)
        attrs = {"axis": g.axis} if g.per_channel else {}
        shifted = self.shifted
        y = self.node("DequantizeLinear", [codes, *self.qparams()], None if shifted else out, **attrs)
        if shifted:
            shape = tuple(-1 if d == g.axis else 1 for d in range(g.codes.ndim)) if g.per_channel else ()
            self.node("Add", [y, self.const("offset", TensorProto.FLOAT, g.offset.reshape(shape))], out)


def _integer_zero_point(grid: _Grid, lo: int, hi: int) -> np.ndarray | None:
    """The zero point that makes ``offset + scale * code`` an ONNX ``(code - zero) * scale``, where the offset is a
    whole number of steps (interval trained with ``quant.integer_zero_point``) and that zero point fits the storage
    type [lo, hi]; None otherwise (and for offset 0, which needs none)."""
    if not np.any(grid.offset != 0):
        return None
    steps = grid.offset.astype(np.float64) / grid.scale.astype(np.float64)
    zero = -np.round(steps)
    if np.abs(steps + zero).max() > 1e-3 or zero.min() < lo or zero.max() > hi:
        return None
    return zero.astype(np.int64)


def _index(node: onnx.NodeProto) -> int:
    return next(a.i for a in node.attribute if a.name == "index")


def _constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """The graph's constant tensors by name: initializers, and the Identity nodes (torch.onnx's deduplication of
    equal initializers) and Constant nodes that give them other names."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Identity" and node.input[0] in values:
            values[node.output[0]] = values[node.input[0]]
        elif node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    return values


def _fold_batchnorm(graph: onnx.GraphProto, grids: list[_Grid]) -> dict[str, _Grid]:
    """Fold every inference BatchNormalization that alone reads a Conv of quantized weights into that Conv.

    ``Conv -> BatchNormalization`` becomes ``Conv`` with a bias and the weight grid's scale multiplied per
    output channel by ``gamma / sqrt(var + eps)`` (made per channel; a channel of negative factor has its
    codes negated, so every scale stays positive). The codes are the same integers up to that sign: the
    same grid, folded the way every deployment folds BN. Left in, the BN sits between the Conv and the next
    QuantizeLinear and onnxruntime cannot fuse the Conv (the weight is a DequantizeLinear output, not a
    constant, so neither torch.onnx nor onnxruntime folds the BN).

    Works on the placeholder graph, in place; returns the folded grids by the weight placeholder's output.
    A weight grid with an offset (interval), or whose negated codes fit no 8-bit type, is left unfolded.
    """
    inits = _constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    producers = {o: node for node in graph.node for o in node.output}
    folded: dict[str, _Grid] = {}
    dropped: set[int] = set()
    for conv in graph.node:
        if conv.op_type != "Conv" or len(conv.input) < 2 or len(consumers.get(conv.output[0], [])) != 1:
            continue
        mark, bn = producers.get(conv.input[1]), consumers[conv.output[0]][0]
        if mark is None or mark.domain != _DOMAIN or len(consumers[conv.input[1]]) != 1:
            continue
        if bn.op_type != "BatchNormalization" or len(bn.output) != 1 or any(i not in inits for i in bn.input[1:5]):
            continue
        bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
        if bias is not None and bias not in inits:
            continue
        grid = grids[_index(mark)]
        if grid.codes is None or np.any(grid.offset != 0):
            continue
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        b = inits[bias].astype(np.float64) if bias is not None else 0.0
        codes, scale, folded_bias = fold_batchnorm(grid.codes, grid.scale, b, tuple(inits[i] for i in bn.input[1:5]),
                                                   eps)  # fmt: skip
        negated = bool(np.any(inits[bn.input[1]] < 0))  # a negative gamma: that channel's codes negated
        qn, qp = (min(grid.qn, -grid.qp), max(grid.qp, -grid.qn)) if negated else (grid.qn, grid.qp)
        try:
            storage_type(qn, qp, int4=False)
        except QKDError:
            continue  # negated codes fit no 8-bit type
        channels = grid.codes.shape[0]
        folded[conv.input[1]] = _Grid(grid.name, scale.astype(np.float32), np.zeros(channels, np.float32), qn, qp,
                                      codes)  # fmt: skip
        bias_name = f"{grid.name}.folded_bias"
        if bias_name in inits:  # a layer called twice
            bias_name = f"{grid.name}.call{len(folded)}.folded_bias"
        inits[bias_name] = np.empty(0)
        graph.initializer.append(_tensor(bias_name, TensorProto.FLOAT, folded_bias.astype(np.float32)))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        dropped.add(id(bn))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _fold_weight_transposes(graph: onnx.GraphProto, grids: list[_Grid]) -> dict[str, _Grid]:
    """Store the codes of a Linear weight read by a MatMul already transposed: ``DQ -> MatMul``, not ``DQ ->
    Transpose -> MatMul``.

    torch.onnx writes ``F.linear`` on a 3-D input (a transformer's tokens) as ``MatMul(x, Transpose(W))``; with the
    weight behind a DequantizeLinear the Transpose stays, and no runtime fuses the MatMul. A 2-D weight placeholder
    read only by a ``Transpose(perm=[1, 0])`` takes the Transpose's output and transposed codes, quantized per
    channel on axis 1. Works on the placeholder graph, in place; returns the new grids by the placeholder's output.
    """
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    folded: dict[str, _Grid] = {}
    dropped: set[int] = set()
    for mark in graph.node:
        readers = consumers.get(mark.output[0], [])
        if mark.domain != _DOMAIN or len(readers) != 1 or readers[0].op_type != "Transpose":
            continue
        grid, transpose = grids[_index(mark)], readers[0]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), [1, 0])
        if grid.codes is None or grid.codes.ndim != 2 or perm != [1, 0]:
            continue
        folded[transpose.output[0]] = dataclasses.replace(grid, codes=grid.codes.T.copy(), axis=1)
        mark.output[0] = transpose.output[0]
        dropped.add(id(transpose))
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    return folded


def _drop_redundant_relu6(graph: onnx.GraphProto, grids: list[_Grid]) -> None:
    """``Clip(x, 0, m)`` (ReLU6) read only by activation quantizers whose grid tops out at or below ``m`` becomes
    ``Relu``: the quantizer clamps at its top anyway (round-then-clamp gives the top code for every x above it),
    and a float Clip between a Conv and its QuantizeLinear keeps onnxruntime from fusing the Conv."""
    constants = _constants(graph)
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        if node.op_type != "Clip" or len(node.input) != 3 or any(i not in constants for i in node.input[1:]):
            continue
        lo, hi = (np.float32(constants[i]) for i in node.input[1:])
        readers = consumers.get(node.output[0], [])
        if lo != 0 or not readers or any(r.domain != _DOMAIN for r in readers):
            continue
        tops = [grids[_index(r)] for r in readers]
        if all(g.codes is None and not np.any(g.offset) and np.all(np.float32(g.qp) * g.scale <= hi) for g in tops):
            node.op_type = "Relu"
            del node.input[1:]


def _rewrite(model: onnx.ModelProto, grids: list[_Grid], int4: bool) -> int:
    """Fold BatchNormalization into the quantized Convs before it and a Linear weight's Transpose into its codes,
    turn a ReLU6 its quantizer makes redundant into ReLU, then replace every placeholder by its QDQ nodes, in place,
    keeping the topological order. Returns how many quantizers kept a float offset (Sub/Add around their QDQ)."""
    folded = _fold_batchnorm(model.graph, grids) | _fold_weight_transposes(model.graph, grids)
    _drop_redundant_relu6(model.graph, grids)
    graph, nodes, inits, seen, offsets = model.graph, [], [], set(), 0
    for node in graph.node:
        if node.domain != _DOMAIN:
            nodes.append(node)
            continue
        grid = folded.get(node.output[0], grids[_index(node)])
        prefix = grid.name if grid.name not in seen else f"{grid.name}.call{len(seen)}"  # a layer called twice
        seen.add(prefix)
        rw = _Rewriter(prefix, grid, int4)
        offsets += rw.shifted
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
    return offsets


FLOAT_OFFSET_KEY = "qdq_float_offset_quantizers"


def _say_float_offsets(model: onnx.ModelProto, count: int, contract: dict | None) -> dict | None:
    """Never silently slow: quantizers whose offset is no integer zero point (interval bounds) keep a float Sub/Add
    around their QDQ, and their layers run in float in onnxruntime; one warning line, and the count in the file's
    metadata (``qdq_float_offset_quantizers``). Returns the contract to write (None: the count set directly)."""
    if count:
        warnings.warn(f"QDQ ONNX: {count} quantizer(s) have a lower bound that is no integer zero point and keep a "
                      "float offset (Sub/Add): their layers run in float; train interval grids with "
                      "quant.integer_zero_point=true to avoid it", UserWarning, stacklevel=3)  # fmt: skip
    if contract is not None:
        return {**contract, FLOAT_OFFSET_KEY: count}
    helper.set_model_props(model, {FLOAT_OFFSET_KEY: str(count)})
    return None


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    """The float weights now feed nothing (their integer codes replaced them), nor the bounds of a ReLU6 made
    ReLU: keep them out of the file."""
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    nodes = [n for n in graph.node if n.op_type != "Constant" or any(o in used for o in n.output)]
    del graph.node[:]
    graph.node.extend(nodes)
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
    model: nn.Module,
    example: torch.Tensor,
    path: str | Path,
    opset: int = 21,
    contract: dict | None = None,
    four_bit_storage: bool = False,
    integer_matmul: bool = False,
) -> Path:
    """Write ``model`` (a quantized student) as ONNX with QDQ nodes and integer weights; return the path.

    ``example`` is one input batch (its batch size is free in the file). The model itself is left
    untouched: a CPU copy in eval mode is exported. The file passes ``onnx.checker.check_model``.
    ``contract`` (see :mod:`qkd.export.contract`) goes into its metadata, and its preprocessing into the
    graph where it says ``preprocessing_baked``. Codes are stored in 8-bit types (the ones runtimes fuse into
    integer kernels); ``four_bit_storage`` (opset 21 or later) stores codes of 4 bits or fewer in INT4/UINT4
    instead: half the weight bytes, but onnxruntime then runs every layer in float.

    ``integer_matmul`` (for onnxruntime): the convs whose output goes to no quantizer (residual adds, the head),
    which onnxruntime runs in float, are written as MatMulInteger on the codes instead
    (:mod:`qkd.export.onnx_intconv`; same grids, exact). Off by default because OpenVINO, which runs the plain QDQ
    form of those convs in integers itself, runs that form in float32 (ResNet-18 224 px, measured: 0.25x the float
    model's latency without it, 1.0x with it).
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
    offsets = _rewrite(onnx_model, grids, int4=four_bit_storage and opset >= _INT4_MIN_OPSET)
    contract = _say_float_offsets(onnx_model, offsets, contract)
    if integer_matmul and integer_matmuls(onnx_model):  # the convs onnxruntime cannot fuse, on the codes
        _drop_unused_initializers(onnx_model.graph)
    return save_onnx(onnx_model, path, contract)
