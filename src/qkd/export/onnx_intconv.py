"""Integer convolutions with a float output for the QDQ ONNX: the layers onnxruntime cannot fuse.

onnxruntime turns ``DQ -> Conv -> Q`` into an integer kernel (QLinearConv) only where the conv's output goes to a
quantizer. qkd quantizes layer inputs, so a conv whose output feeds a residual Add (the second conv of a ResNet
block, a shortcut conv, the stem) or the float head produces a float tensor, and ran as a float conv that
dequantized its weights on every run. Here each such conv (and a Gemm on quantized input and weights) becomes the
same arithmetic on the integer codes, exact up to one float rounding:

``codes -> Transpose (NHWC) -> [Pad -> Slice per kernel tap -> Concat] (im2col) -> MatMulInteger (int32, exact)
-> Cast -> Mul (input scale x weight scale per output channel) -> Add bias -> Reshape -> Transpose (NCHW)``

(onnxruntime cancels the NHWC/NCHW Transposes against the ones it puts around its NHWC QLinearConv.)

MatMulInteger on uint8 x int8 runs onnxruntime's integer GEMM (the kernel behind QLinearConv); ConvInteger was
measured 2.5-4.6x slower than the float conv on the same shapes (uint8 x int8 has no fast ConvInteger kernel in
onnxruntime 1.31), hence the im2col. The grids are the same: no quantizer is added, and the float conv computed
``sum (sx * a) (sw * w) + b`` with float roundings, this computes ``sx * sw * sum a w + b`` with one. The weight
codes stay in the file in the conv's layout (a constant Transpose/Reshape that onnxruntime folds at load).
Only grids without offset (zero point 0), 8-bit storage, 2-D convs of group 1 and dilation 1 with static spatial
sizes and at least :data:`MIN_CHANNELS` input channels are rewritten; everything else keeps the QDQ form it had.
ResNet-18 at 224 px, batch 1, one thread (a loaded machine): 1.26x the float ONNX's latency before, 0.85x after.
For onnxruntime only (``export_onnx(..., integer_matmul=True)``): OpenVINO runs these MatMulInteger in float32,
where it ran the plain QDQ convs in integers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

__all__ = ["integer_matmuls"]

_CODES = (TensorProto.INT8, TensorProto.UINT8)
MIN_CHANNELS = 128  # measured on ResNet-18 224 px: at 64 channels (56x56) the integer form was no faster


@dataclass
class _Operand:
    """A DequantizeLinear input of a Conv/Gemm: its codes (a tensor name), scale, and for a weight the codes."""

    codes: str
    scale: np.ndarray
    values: np.ndarray | None  # weight codes (an initializer); None: activation codes computed in the graph
    signed: bool = False


class _Graph:
    """Lookups over a graph being rewritten: initializers, producers, consumers, static shapes."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        inferred = onnx.shape_inference.infer_shapes(model).graph
        self.shapes = {
            v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in [*inferred.value_info, *inferred.input]
        }

    def array(self, name: str) -> np.ndarray | None:
        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def operand(self, name: str, weight: bool) -> _Operand | None:
        """The DequantizeLinear producing ``name``, if it is a zero-point-0 8-bit grid (weights: codes initializer,
        scale per tensor or per output channel; activations: codes computed, one scale)."""
        dq = self.producer.get(name)
        if dq is None or dq.op_type != "DequantizeLinear" or (dq.input[0] in self.inits) != weight:
            return None
        scale = self.array(dq.input[1])
        zero = self.array(dq.input[2]) if len(dq.input) > 2 and dq.input[2] else np.zeros(())
        if scale is None or zero is None or np.any(zero != 0) or self.inits[dq.input[2]].data_type not in _CODES:
            return None
        axis = next((a.i for a in dq.attribute if a.name == "axis"), 1)
        if scale.ndim > 0 and not (weight and axis == 0):
            return None
        signed = self.inits[dq.input[2]].data_type == TensorProto.INT8
        return _Operand(dq.input[0], scale.astype(np.float64), self.array(dq.input[0]) if weight else None, signed)

    def feeds_quantizer(self, name: str) -> bool:
        """Whether ``name`` goes only to a QuantizeLinear (or through one Relu to one): onnxruntime fuses that conv
        into QLinearConv already."""
        readers = self.consumers.get(name, [])
        if len(readers) != 1:
            return False
        if readers[0].op_type == "Relu":
            return self.feeds_quantizer(readers[0].output[0])
        return readers[0].op_type == "QuantizeLinear"


class _Builder:
    """Nodes and initializers of one rewritten layer, named after it."""

    def __init__(self, prefix: str) -> None:
        self.prefix, self.nodes, self.inits = prefix, [], []

    def const(self, suffix: str, values: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(values), f"{self.prefix}.{suffix}"))
        return self.inits[-1].name

    def node(self, op: str, inputs: list[str], output: str | None = None, **attrs) -> str:
        out = output or f"{self.prefix}/{op}_{len(self.nodes)}"
        self.nodes.append(helper.make_node(op, inputs, [out], name=f"{self.prefix}/{op}_{len(self.nodes)}", **attrs))
        return out

    def unsigned(self, x: _Operand) -> tuple[str, str]:
        """The activation codes as uint8 and their zero point: int8 codes shifted by 128 (zero point 128), because
        onnxruntime's int8 x int8 MatMulInteger was measured 20x slower than its uint8 x int8 one."""
        if not x.signed:
            return x.codes, self.const("zero_point", np.array(0, np.uint8))
        wide = self.node("Cast", [x.codes], to=TensorProto.INT32)
        wide = self.node("Add", [wide, self.const("shift", np.array(128, np.int32))])
        return self.node("Cast", [wide], to=TensorProto.UINT8), self.const("zero_point", np.array(128, np.uint8))

    def scaled(self, codes: str, zero: str, weight: str, x: _Operand, w: _Operand, bias: str | None,
               channels: int) -> str:  # fmt: skip
        """``MatMulInteger(codes, weight) -> Cast -> Mul(scales) [-> Add bias]``: float, output channels last."""
        acc = self.node("MatMulInteger", [codes, weight, zero])
        y = self.node("Cast", [acc], to=TensorProto.FLOAT)
        factor = np.broadcast_to(x.scale * w.scale, (channels,)).astype(np.float32)
        y = self.node("Mul", [y, self.const("scale_product", factor)])
        return self.node("Add", [y, bias]) if bias else y


def _attr(node: onnx.NodeProto, name: str, default):
    found = next((a for a in node.attribute if a.name == name), None)
    return default if found is None else helper.get_attribute_value(found)


def _im2col(b: _Builder, codes: str, zero: str, shape: list[int], kernel: tuple[int, int], stride: list[int],
            pads: list[int]) -> tuple[str, int, int]:  # fmt: skip
    """Rows ``[N, Ho*Wo, kh*kw*C]`` of the codes ``[N, C, H, W]`` (tap-major, channel-minor), and Ho, Wo.

    Channels last: each row is a Concat of contiguous C-code chunks, and the one Transpose is on the input (C*H*W
    codes), not on the kh*kw times larger columns."""
    _, channels, height, width = shape
    (kh, kw), (sh, sw) = kernel, stride
    out_h, out_w = (height + pads[0] + pads[2] - kh) // sh + 1, (width + pads[1] + pads[3] - kw) // sw + 1
    codes = b.node("Transpose", [codes], perm=[0, 2, 3, 1])
    if any(pads):
        pad = b.const("pads", np.array([0, pads[0], pads[1], 0, 0, pads[2], pads[3], 0]))
        codes = b.node("Pad", [codes, pad, zero])  # the zero point: a padded 0.0
    taps = []
    axes, steps = b.const("axes", np.array([1, 2])), b.const("steps", np.array([sh, sw]))
    for i in range(kh):
        for j in range(kw):
            if (kh, kw, sh, sw) == (1, 1, 1, 1):
                taps.append(codes)
                continue
            starts = b.const(f"starts{i}_{j}", np.array([i, j]))
            ends = b.const(f"ends{i}_{j}", np.array([i + sh * (out_h - 1) + 1, j + sw * (out_w - 1) + 1]))
            taps.append(b.node("Slice", [codes, starts, ends, axes, steps]))
    cols = b.node("Concat", taps, axis=3) if len(taps) > 1 else taps[0]
    rows_shape = b.const("rows_shape", np.array([0, out_h * out_w, kh * kw * channels]))
    return b.node("Reshape", [cols, rows_shape]), out_h, out_w


def _conv(g: _Graph, conv: onnx.NodeProto, min_channels: int) -> _Builder | None:
    """The integer form of one Conv, or None where it does not apply."""
    x, w = g.operand(conv.input[0], weight=False), g.operand(conv.input[1], weight=True)
    shape = g.shapes.get(conv.input[0])
    if x is None or w is None or w.values.ndim != 4 or shape is None or len(shape) != 4 or None in shape[1:]:
        return None
    if shape[1] < min_channels:
        return None
    if _attr(conv, "group", 1) != 1 or any(d != 1 for d in _attr(conv, "dilations", [1, 1])):
        return None
    if _attr(conv, "auto_pad", b"NOTSET") not in (b"NOTSET", "NOTSET"):
        return None
    bias = conv.input[2] if len(conv.input) > 2 and conv.input[2] else None
    channels, kh, kw = w.values.shape[0], w.values.shape[2], w.values.shape[3]
    b = _Builder(f"{conv.name or conv.output[0]}.integer")
    codes, zero = b.unsigned(x)
    rows, out_h, out_w = _im2col(b, codes, zero, shape, (kh, kw), _attr(conv, "strides", [1, 1]),
                                 _attr(conv, "pads", [0, 0, 0, 0]))  # fmt: skip
    # [K, Cout] in the order of the rows, from the codes initializer (onnxruntime folds these constants)
    matrix = b.node("Transpose", [w.codes], perm=[2, 3, 1, 0])
    matrix = b.node("Reshape", [matrix, b.const("weight_shape", np.array([-1, channels]))])
    y = b.scaled(rows, zero, matrix, x, w, bias, channels)
    y = b.node("Reshape", [y, b.const("output_shape", np.array([0, out_h, out_w, channels]))])
    b.node("Transpose", [y], conv.output[0], perm=[0, 3, 1, 2])  # back to NCHW
    return b


def _gemm(g: _Graph, gemm: onnx.NodeProto, min_channels: int = 0) -> _Builder | None:
    """The integer form of one Gemm ``x @ W^T + b`` on quantized input and weights, or None."""
    x, w = g.operand(gemm.input[0], weight=False), g.operand(gemm.input[1], weight=True)
    if x is None or w is None or w.values.ndim != 2 or _attr(gemm, "transA", 0) or _attr(gemm, "alpha", 1.0) != 1:
        return None
    bias = gemm.input[2] if len(gemm.input) > 2 and gemm.input[2] else None
    if bias is not None and (_attr(gemm, "beta", 1.0) != 1 or g.array(bias) is None or g.array(bias).ndim != 1):
        return None
    if w.scale.ndim > 0 and not _attr(gemm, "transB", 0):
        return None  # per-channel scales on axis 0 are per output only when W is [out, in]
    channels = w.values.shape[0] if _attr(gemm, "transB", 0) else w.values.shape[1]
    b = _Builder(f"{gemm.name or gemm.output[0]}.integer")
    matrix = b.node("Transpose", [w.codes], perm=[1, 0]) if _attr(gemm, "transB", 0) else w.codes
    codes, zero = b.unsigned(x)
    b.node("Identity", [b.scaled(codes, zero, matrix, x, w, bias, channels)], gemm.output[0])
    return b


def integer_matmuls(model: onnx.ModelProto, min_channels: int | None = None) -> int:
    """Rewrite in place every quantized Conv/Gemm whose output onnxruntime cannot requantize (it goes elsewhere
    than to one quantizer) into its integer form; drop the DequantizeLinear nodes left unread. Returns how many.

    Convs with fewer than ``min_channels`` input channels (default :data:`MIN_CHANNELS`) stay float: there the
    im2col copies cost more than the integer GEMM saves (ResNet-18's 64-channel 56x56 convs, measured).
    """
    min_channels = MIN_CHANNELS if min_channels is None else min_channels
    g = _Graph(model)
    nodes, inits, count = [], [], 0
    for node in model.graph.node:
        rewrite = {"Conv": _conv, "Gemm": _gemm}.get(node.op_type)
        built = None if rewrite is None or g.feeds_quantizer(node.output[0]) else rewrite(g, node, min_channels)
        if built is None:
            nodes.append(node)
            continue
        nodes.extend(built.nodes)
        inits.extend(built.inits)
        count += 1
    nodes = _without_unread_dequantize(nodes, {o.name for o in model.graph.output})
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    model.graph.initializer.extend(inits)
    return count


def _without_unread_dequantize(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    read = {i for n in nodes for i in n.input} | outputs
    return [n for n in nodes if n.op_type != "DequantizeLinear" or n.output[0] in read]
