"""ONNX export in integer form: integer convolutions (ConvInteger/MatMulInteger), float64 requantization.

The QDQ export (:mod:`qkd.export.onnx_qdq`) leaves the arithmetic to the runtime, which runs it in
float32: deep low-bit networks then part from the trained model's exact answers on a fraction of a
percent of images (a float32 rounding tips an activation across a quantization step, and the step
propagates). This form pins the arithmetic down instead, from the same program as the integer runtime
(:func:`qkd.export.trace.to_real_program`):

- each layer's input is quantized to its integer codes (``Round((x - offset) / step)``, clipped to the
  layer's range, stored in UINT8/INT8);
- the layer accumulates integer codes times integer weights in int32 (``ConvInteger`` /
  ``MatMulInteger``: exact);
- the accumulator is requantized in float64 (``Cast`` to double, ``Mul`` by the per-channel scale with
  BatchNorm folded, ``Add`` the bias); residual sums, ReLU and pooling stay in float64 up to the next
  layer's quantization.

The ops between layers are float64 ONNX ops. onnxruntime has no float64 kernels for HardSwish,
HardSigmoid, AveragePool or GlobalAveragePool, so those are composed: Hardsigmoid as
``Clip(x + 3, 0, 6) / 6``, Hardswish as ``x`` times that, SiLU as ``x * Sigmoid(x)``, average and
adaptive-average pooling as ``MatMul`` with 0/1 window matrices on both spatial axes then ``Div`` by
the window sizes (the spatial size is the export example's), global averages as ``ReduceMean``.

Every rounding decision is then the exact model's up to float64 rounding (about 1e-16), so the file
gives the float64 fake-quant model's predictions. Weights are stored as 8-bit integers (the integer
ops take no 4-bit inputs): the file is about twice the QDQ file at 4 bits. Interval (affine) grids add
the offset terms of ``program.TERMS`` as further integer convolutions, with ones in place of codes.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import Tensor, nn

from qkd.errors import QKDError
from qkd.export.onnx_common import save_onnx, storage_type
from qkd.export.program import SHAPE_OPS, TERMS, pool_windows
from qkd.export.trace import to_real_program

__all__ = ["OnnxIntBuilder", "export_onnx_int"]

OPSET = 21  # Pad and ReduceMean with axes as inputs (18); integer ops since 10
_INT64_MAX = 2**63 - 1


def _code_type(lo: int, hi: int) -> tuple[int, type]:
    """The 8-bit ONNX type (and its numpy type) holding codes in [lo, hi]: what ConvInteger/MatMulInteger take."""
    dtype = storage_type(lo, hi, int4=False)[0]
    return dtype, helper.tensor_dtype_to_np_dtype(dtype).type


class _Graph:
    """Nodes and initializers under construction; names are the program's op names plus a suffix."""

    def __init__(self) -> None:
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[TensorProto] = []

    def const(self, name: str, values: Any, dtype: Any = np.float64) -> str:
        self.inits.append(numpy_helper.from_array(np.asarray(values, dtype=dtype), name))
        return name

    def node(self, op: str, inputs: list[str], out: str, **attrs: Any) -> str:
        self.nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out


class OnnxIntBuilder:
    """Translates the program's ops one by one, each op of :data:`~qkd.export.program.OPS` by a method ``_<op>``
    (see :class:`~qkd.export.int_runtime.IntRuntime` for the integer semantics they mirror)."""

    def __init__(self, ops: list[dict], tensors: dict[str, Tensor]) -> None:
        self.ops, self.tensors, self.graph = ops, tensors, _Graph()
        # values that are still the float32 input (shape ops only): quantized with the first layer's float32 maths
        self.raw = {op["name"] for op in ops if op["op"] == "input"}
        for op in ops:
            if op["op"] in SHAPE_OPS and op["in"] and all(i in self.raw for i in op["in"]):
                self.raw.add(op["name"])

    def run(self) -> _Graph:
        for op in self.ops:
            getattr(self, "_" + op["op"])(op, *op["in"])
        return self.graph

    def _input(self, op: dict) -> None:
        self.graph.node("Identity", ["input"], op["name"])

    # ----- layers ----------------------------------------------------------------------------------
    def _codes(self, op: dict, x: str, offset: int = 0) -> str:
        """The layer's input codes, as UINT8 or INT8 (INT8 ``codes - offset`` when ``offset``)."""
        g, name, (lo, hi) = self.graph, op["name"], op["a_range"]
        if x in self.raw:  # the network's float32 input, with the fake-quant model's float32 maths
            if "a_interval" in op:
                lower, upper = np.float32(op["a_interval"][0]), np.float32(op["a_interval"][1])
                width = max(upper - lower, np.float32(1e-8))
                z = g.node("Min", [g.node("Max", [x, g.const(f"{name}.lower", lower, np.float32)], f"{name}/max"),
                                   g.const(f"{name}.upper", upper, np.float32)], f"{name}/min")  # fmt: skip
                z = g.node("Sub", [z, f"{name}.lower"], f"{name}/sub")
                z = g.node("Div", [z, g.const(f"{name}.width", width, np.float32)], f"{name}/div")
                z = g.node("Mul", [z, g.const(f"{name}.levels", hi, np.float32)], f"{name}/levels")
            else:
                z = g.node("Div", [x, g.const(f"{name}.in_step", op["a_scale"], np.float32)], f"{name}/div")
            bounds = (g.const(f"{name}.lo", lo, np.float32), g.const(f"{name}.hi", hi, np.float32))
        else:  # a float64 value of the program
            if op["a_offset"]:
                x = g.node("Sub", [x, g.const(f"{name}.in_offset", op["a_offset"])], f"{name}/sub")
            z = g.node("Div", [x, g.const(f"{name}.in_step", op["a_scale"])], f"{name}/div")
            bounds = (g.const(f"{name}.lo", float(lo)), g.const(f"{name}.hi", float(hi)))
        z = g.node("Clip", [g.node("Round", [z], f"{name}/round"), *bounds], f"{name}/clip")
        if offset:
            dtype = np.float32 if x in self.raw else np.float64
            z = g.node("Sub", [z, g.const(f"{name}.code_offset", offset, dtype)], f"{name}/code_offset")
            return g.node("Cast", [z], f"{name}/codes", to=TensorProto.INT8)
        return g.node("Cast", [z], f"{name}/codes", to=_code_type(lo, hi)[0])

    def _ones(self, op: dict, codes: str) -> str:
        """Ones on one image's positions (batch 1): convolved, they count each window's unpadded inputs."""
        g, name = self.graph, op["name"]
        shape = g.node("Shape", [codes], f"{name}/shape", start=1)
        shape = g.node("Concat", [g.const(f"{name}.batch1", [1], np.int64), shape], f"{name}/ones_shape", axis=0)
        one = helper.make_tensor(f"{name}.one", _code_type(*op["a_range"])[0], [1], [1])
        return g.node("ConstantOfShape", [shape], f"{name}/ones", value=one)

    def _layer(self, op: dict, x: str, integer_op: str, **attrs: Any) -> None:
        g, name, t = self.graph, op["name"], self.tensors
        weight = t[f"{name}.weight"].numpy()
        channel_shape: tuple[int, ...] = (-1, 1, 1) if integer_op == "ConvInteger" else (-1,)
        if integer_op == "MatMulInteger":
            weight = weight.T  # x (N, K) @ w (K, M)
        w_dtype = _code_type(*op["w_range"])[1]
        w = g.const(f"{name}.weight", weight, w_dtype)
        # onnxruntime's uint8 x int8 MatMulInteger saturates pairs of products at int16 on x86 CPUs without
        # VNNI (255 * 127 * 2 > 32767): unsigned codes above 127 go in as int8 ``codes - 128``, zero point -128
        offset = 128 if integer_op == "MatMulInteger" and op["a_range"][1] > 127 and w_dtype == np.int8 else 0
        codes = self._codes(op, x, offset)
        zero_point = [g.const(f"{name}.code_zero_point", -offset, np.int8)] if offset else []
        keys = [k for k in TERMS if f"{name}.scale{'_' + k if k else ''}" in t]
        # the offset terms of affine grids: ones in place of the codes of the weights and/or the input
        ones_w = ""
        if {"xsum", "count"} & set(keys):  # made at load time from the shape: no second weight tensor in the file
            one = numpy_helper.from_array(np.ones(1, w_dtype), f"{name}.one_weight")
            ones_w = g.node("ConstantOfShape", [g.const(f"{name}.weight_shape", weight.shape, np.int64)],
                            f"{name}/weight_ones", value=one)  # fmt: skip
        ones_x = self._ones(op, codes) if {"wsum", "count"} & set(keys) else ""
        operands = {"": (codes, w, *zero_point), "xsum": (codes, ones_w, *zero_point), "wsum": (ones_x, w),
                    "count": (ones_x, ones_w)}  # fmt: skip
        terms = []
        for key in keys:
            suffix = f"_{key}" if key else ""
            acc = g.node(integer_op, list(operands[key]), f"{name}/{integer_op}{suffix}", **attrs)
            real = g.node("Cast", [acc], f"{acc}/double", to=TensorProto.DOUBLE)
            scale = g.const(f"{name}.scale{suffix}", t[f"{name}.scale{suffix}"].numpy().reshape(channel_shape))
            terms.append(g.node("Mul", [real, scale], f"{acc}/scaled"))
        total = terms[0] if len(terms) == 1 else g.node("Sum", terms, f"{name}/terms")
        bias = g.const(f"{name}.bias", t[f"{name}.bias"].numpy().reshape(channel_shape))
        g.node("Add", [total, bias], name)

    def _qconv2d(self, op: dict, x: str) -> None:
        pads = list(op["padding"]) * 2
        self._layer(op, x, "ConvInteger", strides=op["stride"], pads=pads, dilations=op["dilation"],
                    group=op["groups"])  # fmt: skip

    def _qlinear(self, op: dict, x: str) -> None:
        self._layer(op, x, "MatMulInteger")

    # ----- float64 glue between layers ---------------------------------------------------------------
    def _relu(self, op: dict, x: str) -> None:
        self.graph.node("Relu", [x], op["name"])

    def _relu6(self, op: dict, x: str) -> None:
        g, name = self.graph, op["name"]
        g.node("Clip", [x, g.const(f"{name}.min", 0.0), g.const(f"{name}.max", 6.0)], name)

    def _add(self, op: dict, a: str, b: str) -> None:
        self.graph.node("Add", [a, b], op["name"])

    def _slice(self, op: dict, x: str) -> None:
        spec, axes, starts, ends, steps = op["index"], [], [], [], []
        ellipsis = spec.index("...") if "..." in spec else len(spec)
        for i, s in enumerate(spec):
            if s == "..." or s == [None, None, None]:
                continue
            start, stop, step = s
            if step is not None and step < 0:
                raise QKDError(f"negative slice step in '{op['name']}' is not supported by the integer ONNX form")
            axes.append(i if i < ellipsis else i - len(spec))  # after an ellipsis: counted from the end
            starts.append(start or 0)
            ends.append(_INT64_MAX if stop is None else stop)
            steps.append(step or 1)
        g, name = self.graph, op["name"]
        if not axes:
            g.node("Identity", [x], name)
            return
        args = [g.const(f"{name}.{k}", v, np.int64) for k, v in
                (("starts", starts), ("ends", ends), ("axes", axes), ("steps", steps))]  # fmt: skip
        g.node("Slice", [x, *args], name)

    def _pad(self, op: dict, x: str) -> None:
        pad = op["pad"]  # F.pad order: (last dim begin, last dim end, second-to-last begin, ...)
        axes = [-1 - i for i in range(len(pad) // 2)]
        g, name = self.graph, op["name"]
        pads = g.const(f"{name}.pads", pad[0::2] + pad[1::2], np.int64)
        zero = g.const(f"{name}.value", 0.0, np.float32 if x in self.raw else np.float64)
        g.node("Pad", [x, pads, zero, g.const(f"{name}.axes", axes, np.int64)], name)

    def _mean_hw(self, op: dict, x: str) -> None:
        g, name = self.graph, op["name"]
        axes = g.const(f"{name}.axes", [2, 3], np.int64)
        g.node("ReduceMean", [x, axes], name, keepdims=int(op.get("keepdim", True)))

    def _pool(self, op: dict, x: str) -> None:
        """Separable window sums (see ``program.pool_windows``): ``rows @ x @ cols.T / sizes``, in float64."""
        if "in_hw" not in op:
            raise QKDError(f"pooling '{op['name']}' has no input size: export with an example input")
        g, name = self.graph, op["name"]
        (rows, n_rows), (cols, n_cols) = (pool_windows(op, size, i) for i, size in enumerate(op["in_hw"]))
        total = g.node("MatMul", [g.const(f"{name}.rows", rows.double().numpy()), x], f"{name}/rows")
        total = g.node("MatMul", [total, g.const(f"{name}.cols", cols.T.double().numpy())], f"{name}/sum")
        sizes = (n_rows[:, None] * n_cols[None, :]).double().numpy()
        g.node("Div", [total, g.const(f"{name}.sizes", sizes)], name)

    _avgpool = _adaptive_avgpool = _pool

    def _maxpool(self, op: dict, x: str) -> None:
        def pair(v: Any) -> list[int]:
            return list(v) if isinstance(v, list | tuple) else [v, v]

        kernel, stride = pair(op["kernel"]), pair(op["stride"] or op["kernel"])
        self.graph.node("MaxPool", [x], op["name"], kernel_shape=kernel, strides=stride, pads=pair(op["padding"]) * 2,
                    dilations=pair(op.get("dilation", 1)), ceil_mode=int(op.get("ceil_mode", False)))  # fmt: skip

    def _flatten(self, op: dict, x: str) -> None:
        if op["start_dim"] != 1:
            raise QKDError(f"flatten from dim {op['start_dim']} in '{op['name']}': the integer ONNX form flattens "
                           "from dim 1")  # fmt: skip
        self.graph.node("Flatten", [x], op["name"], axis=1)

    def _reshape(self, op: dict, x: str) -> None:
        g, name = self.graph, op["name"]
        g.node("Reshape", [x, g.const(f"{name}.shape", op["shape"], np.int64)], name)

    def _permute(self, op: dict, x: str) -> None:
        self.graph.node("Transpose", [x], op["name"], perm=op["perm"])

    def _cat(self, op: dict, *xs: str) -> None:
        self.graph.node("Concat", list(xs), op["name"], axis=op["dim"])

    def _chunk(self, op: dict, x: str) -> None:
        """``torch.chunk``: ``Split`` into as many parts (the same sizes: ceil(n / chunks), the last smaller)."""
        name, n = op["name"], op["chunks"]
        outs = [name if i == op["index"] else f"{name}/part{i}" for i in range(n)]
        self.graph.nodes.append(
            helper.make_node("Split", [x], outs, name=f"{name}/split", axis=op["dim"], num_outputs=n)
        )

    # ----- activations and products, in float64 ------------------------------------------------------
    def _hardsigmoid(self, op: dict, x: str, out: str | None = None) -> str:
        g, name = self.graph, op["name"]
        shifted = g.node("Add", [x, g.const(f"{name}.three", 3.0)], f"{name}/add3")
        clipped = g.node("Clip", [shifted, g.const(f"{name}.zero", 0.0), g.const(f"{name}.six", 6.0)], f"{name}/clip")
        return g.node("Div", [clipped, f"{name}.six"], out or name)

    def _hardswish(self, op: dict, x: str) -> None:
        self.graph.node("Mul", [x, self._hardsigmoid(op, x, f"{op['name']}/hardsigmoid")], op["name"])

    def _sigmoid(self, op: dict, x: str) -> None:
        self.graph.node("Sigmoid", [x], op["name"])

    def _silu(self, op: dict, x: str) -> None:
        self.graph.node("Mul", [x, self.graph.node("Sigmoid", [x], f"{op['name']}/sigmoid")], op["name"])

    def _mul(self, op: dict, a: str, b: str) -> None:
        self.graph.node("Mul", [a, b], op["name"])

    def _scale(self, op: dict, x: str) -> None:
        self.graph.node("Mul", [x, self.graph.const(f"{op['name']}.factor", op["factor"])], op["name"])

    def _add_const(self, op: dict, x: str) -> None:
        self.graph.node("Add", [x, self.graph.const(f"{op['name']}.value", op["value"])], op["name"])

    def _affine(self, op: dict, x: str) -> None:
        g, name = self.graph, op["name"]
        scale = g.const(f"{name}.scale", self.tensors[f"{name}.scale"].numpy().reshape(-1, 1, 1))
        shifted = g.node("Mul", [x, scale], f"{name}/scale")
        g.node("Add", [shifted, g.const(f"{name}.bias", self.tensors[f"{name}.bias"].numpy().reshape(-1, 1, 1))], name)

    def _output(self, op: dict, x: str) -> None:
        self.graph.node("Identity", [x], "output")


def export_onnx_int(model: nn.Module, example: Tensor, path: str | Path, contract: dict | None = None) -> Path:
    """Write ``model`` (a quantized student) as ONNX with integer convolutions and float64 requantization.

    ``example`` is one input batch (its batch size is free in the file). Input ``input``: float32
    images; output ``output``: float64 logits. The file passes ``onnx.checker.check_model``.
    ``contract`` (see :mod:`qkd.export.contract`) goes into its metadata, and its preprocessing into the
    graph where it says ``preprocessing_baked``.
    """
    model = copy.deepcopy(model).float().cpu().eval()  # the caller's model is left as it is
    ops, tensors = to_real_program(model, example.float().cpu())
    inputs = [op["name"] for op in ops if op["op"] == "input"]
    if len(inputs) != 1:
        raise QKDError(f"the integer ONNX form takes a model with one input; this one has {len(inputs)}")
    with torch.no_grad():
        n_out = model(example.float().cpu()).shape[1:]
    g = OnnxIntBuilder(ops, tensors).run()
    graph = helper.make_graph(
        g.nodes,
        "qkd-int",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, ["batch", *example.shape[1:]])],
        [helper.make_tensor_value_info("output", TensorProto.DOUBLE, ["batch", *n_out])],
        g.inits,
    )
    onnx_model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="qkd")
    return save_onnx(onnx_model, path, contract)
