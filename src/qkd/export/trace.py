"""From a trained fake-quant student to an integer program: a list of ops plus integer tensors.

The student is traced with ``torch.fx``. Every quantized Conv/Linear becomes a ``qconv``/``qlinear``
op holding its weights as integers, the BatchNorm that follows it folded into a per-channel
requantization (multiplier and bias), and its input quantizer's scale. Accumulators are int32.
The tensors between layers (what the fake-quant model keeps in float: BatchNorm outputs, residual
sums, ReLU outputs before the next quantizer) are int64 fixed point with ``FRAC_BITS`` fraction
bits, finer than float32 at these magnitudes, so the integer program follows the fake-quant model's
rounding decisions rather than adding its own; each layer's input is requantized to its own
low-bit integers exactly where the fake-quant model quantizes it. Multipliers are stored as int32
mantissas with a right shift (gemmlowp / TFLite style).

Between the layers the program has the ops torchvision's classification networks use (``OPS``):
ReLU/ReLU6, Hardswish, Hardsigmoid, SiLU, Sigmoid, residual sums, elementwise products (the
squeeze-excitation gate), sums and products with constants, a BatchNorm that follows no layer (a
per-channel affine), average/adaptive-average/max pooling, concatenation, chunk/split/slicing, pads,
reshapes and permutations (channel shuffle) and flatten. Which of them the integer formats compute
with integers only and which in float64 is said in :mod:`qkd.export.int_runtime`. Anything else is
refused with a :class:`~qkd.errors.QKDError` naming the op and the module or graph node.

Layers quantized in place (:class:`qkd.quant.QuantizedLayer`: a user's Conv2d subclass with its own
forward) are traced through: their ``act_quant`` node, the user's zero-preserving ops (a zero pad,
slicing) and the ``F.conv2d``/``F.linear`` call become one layer op whose input is requantized after
the pad, which is the same thing when the input grid holds 0 exactly (checked).

Reshapes, permutations and pooling read shapes: pass ``example`` (one input batch) to
:func:`to_int_program` / :func:`to_real_program` for models that have them. The batch dimension stays
free (found by running the example at two batch sizes); spatial sizes are the example's.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.utils import parametrize

from qkd.errors import QKDError
from qkd.export.fixedpoint import affine_to_fixed_point, layer_to_fixed_point
from qkd.export.grid import check_quantized, float_weight, layer_grids
from qkd.export.program import SHAPE_OPS
from qkd.export.trace_calls import (
    OTHER_CONVS,
    QDQ_HINT,
    CallTranslator,
    describe_node,
    is_shape_arithmetic,
    keeps_zero,
    pair,
    target_name,
)
from qkd.quant import IntervalQuantizer, QConv2d, QLinear, Quantizer
from qkd.quant.attention import LinearMultiheadAttention, LinearWindowAttention

# besides torch.nn's own modules, which fx keeps whole; attention is refused by name, as one module
_LEAVES = (QConv2d, QLinear, Quantizer, LinearMultiheadAttention, LinearWindowAttention)
_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}  # fmt: skip
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if _is_in_place(m):  # its own forward holds ops of the network (e.g. a pad): trace through it
            return False
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def _is_in_place(m: nn.Module) -> bool:
    """A layer quantized in place: an ``act_quant`` and a weight fake-quantized by a parametrization."""
    return (
        isinstance(getattr(m, "act_quant", None), Quantizer)
        and parametrize.is_parametrized(m, "weight")
        and isinstance(m.parametrizations.weight[0], Quantizer)
    )


def _layer_op(name: str, layer: nn.Module, bias: Tensor | None,
              conv: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Tensor]]:  # fmt: skip
    """The integer form of one quantized layer (before any BatchNorm is folded in); ``conv`` the convolution's
    hyperparameters (None: linear)."""
    wq, aq, weight = layer.weight_quant, layer.act_quant, float_weight(layer)
    wg, ag = layer_grids(name, wq, aq)
    out_ch = weight.shape[0]
    w_step, w_off = (t.reshape(-1).expand(out_ch) for t in (wg.scale, wg.offset))
    a_step, a_off = float(ag.scale), float(ag.offset)
    op: dict[str, Any] = {
        "op": "qlinear" if conv is None else "qconv2d",
        "module": name,
        "w_bits": wq.bits, "w_range": [wg.qn, wg.qp], "w_shape": list(weight.shape),
        "a_bits": aq.bits, "a_range": [ag.qn, ag.qp], "a_scale": a_step, "a_offset": a_off,
    }  # fmt: skip
    if isinstance(aq, IntervalQuantizer):  # the network's input is quantized with the quantizer's own float32 maths
        op["a_interval"] = list(aq.interval())
    op.update(conv or {})
    bias = bias.detach().double() if bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    # real output = sum of terms (see program.TERMS) + bias; kept as float64 until the BN fold is known
    scales = {"": a_step * w_step, "xsum": a_step * w_off, "wsum": a_off * w_step, "count": a_off * w_off}
    tensors = {"weight": wg.codes(weight.detach()).to(torch.int16), "bias": bias}
    tensors.update({f"scale_{k}" if k else "scale": v for k, v in scales.items() if k == "" or bool(v.any())})
    return op, tensors


def _conv_params(name: str, stride: Any, padding: Any, dilation: Any, groups: int, kernel: list[int]) -> dict:
    if isinstance(padding, str):  # F.conv2d(padding="same"/"valid"); "same" only where it is symmetric
        total = [d * (k - 1) for d, k in zip(pair(dilation), kernel)]
        if padding == "same" and any(t % 2 for t in total):
            raise QKDError(f"layer '{name}': asymmetric padding='same' is not supported by the integer formats")
        padding = [t // 2 for t in total] if padding == "same" else [0, 0]
    return {"stride": pair(stride), "padding": pair(padding), "dilation": pair(dilation), "groups": int(groups)}


def _bn_affine(name: str, bn: nn.BatchNorm2d) -> tuple[Tensor, Tensor]:
    """BatchNorm in eval mode as ``x * k + b`` per channel (float64)."""
    if bn.running_mean is None or bn.running_var is None:
        raise QKDError(f"BatchNorm '{name}' has no running statistics (track_running_stats=False)")
    k = torch.sqrt(bn.running_var.double() + bn.eps).reciprocal()
    k = k * bn.weight.detach().double() if bn.weight is not None else k
    b = -bn.running_mean.double() * k
    return k, b + bn.bias.detach().double() if bn.bias is not None else b


def _fold_bn(tensors: dict[str, Tensor], k: Tensor, b: Tensor) -> None:
    for key in [key for key in tensors if key.startswith("scale")]:
        tensors[key] = tensors[key] * k
    tensors["bias"] = tensors["bias"] * k + b


def _holds_tensor(value: Any) -> bool:
    """Whether a node's value (a tensor, or a tuple/list/dict of them and constants) holds a tensor."""
    found: list[bool] = []
    fx.node.map_aggregate(value, lambda v: found.append(isinstance(v, Tensor)))
    return any(found)


class _Recorder(fx.Interpreter):
    """Runs the traced graph once, keeping each tensor's shape and each shape-arithmetic value."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.consts: dict[str, Any] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, Tensor):
            self.shapes[n.name] = tuple(out.shape)
        elif not _holds_tensor(out):
            self.consts[n.name] = out
        return out


def _propagate(model: nn.Module, graph: fx.Graph, example: Tensor) -> tuple[_Recorder, _Recorder]:
    """The graph run on ``example`` and on one image more (the sizes that depend on the batch differ)."""
    gm = fx.GraphModule(model, graph)
    param = next(model.parameters())
    runs = []
    with torch.no_grad():
        for x in (example, torch.cat([example, example[:1]])):
            runs.append(_Recorder(gm))
            runs[-1].run(x.to(param.device, param.dtype))
    return runs[0], runs[1]


class Builder(CallTranslator):
    """Walks the fx graph once, emitting ops; BatchNorm right after a layer is folded into it."""

    def __init__(self, model: nn.Module, graph: fx.Graph, example: Tensor | None) -> None:
        self.model = model
        self.ops: list[dict[str, Any]] = []
        self.pending: dict[str, tuple[dict, dict[str, Tensor]]] = {}  # layer ops awaiting a possible BN
        self.folded: set[str] = set()  # layers with a BatchNorm folded in
        self.extra: dict[str, tuple[dict, dict[str, Tensor]]] = {}  # other ops' float64 tensors (affine)
        self.alias: dict[str, str] = {}  # fx node name -> op name holding its value
        self.values: set[str] = set()  # fx nodes whose value the program holds
        self.raw: set[str] = set()  # values still the network's float input (only shape ops applied)
        self.users = {n.name: len(n.users) for n in graph.nodes}
        self.splits: dict[str, tuple[fx.Node, str, Any, int]] = {}  # chunk/split nodes, read through getitem
        self.weights: dict[str, str] = {}  # `<layer>.parametrizations.weight` nodes -> the in-place layer
        self.in_place_inputs: dict[str, str] = {}  # F.conv2d/F.linear node -> in-place layer, checked from act_quant
        self.shape_nodes: set[str] = set()  # nodes computing sizes (x.size(), x.shape[1] // 2): evaluated, not emitted
        runs = _propagate(model, graph, example) if example is not None else None
        self.shapes_a, self.shapes_b = (runs[0].shapes, runs[1].shapes) if runs else ({}, {})
        self.consts = runs[0].consts if runs else {}

    # ----- values and helpers ---------------------------------------------------------------------
    def src(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            raise QKDError(f"unsupported constant operand {node!r} in the traced model")
        if node.name not in self.values:
            what = f"parameter or buffer '{node.target}'" if node.op == "get_attr" else f"'{node.name}'"
            raise QKDError(f"{describe_node(node)} uses {what} directly, which the integer formats do not compute "
                           "(only quantized layers hold parameters)")  # fmt: skip
        return self.alias.get(node.name, node.name)

    def emit(self, node: fx.Node, op: str, inputs: list, **attrs: Any) -> None:
        names = [self.src(i) for i in inputs]
        raw = [n in self.raw for n in names]
        if any(raw) and (op not in SHAPE_OPS or not all(raw)):
            raise QKDError(f"{op} on the network's input before its first quantized layer ({describe_node(node)}): "
                           "the integer program starts at a quantized layer")  # fmt: skip
        self.ops.append({"name": node.name, "op": op, "in": names, **attrs})
        self.values.add(node.name)
        if any(raw):
            self.raw.add(node.name)

    def same(self, node: fx.Node, x: fx.Node) -> None:
        """``node`` holds the value of ``x`` (dropout in eval, identity, contiguous)."""
        self.alias[node.name] = self.src(x)
        self.values.add(node.name)

    def const(self, v: Any) -> Any:
        """A literal argument, or the example's value of a shape-arithmetic node."""
        if isinstance(v, fx.Node):
            if v.name in self.shape_nodes and v.name in self.consts:
                return self.consts[v.name]
            if v.name in self.shape_nodes:
                raise QKDError(f"{describe_node(v)} computes a shape: pass an example input to the export")
            raise QKDError(f"{describe_node(v)} gives a tensor where the integer formats need a constant")
        if isinstance(v, list | tuple):
            return type(v)(self.const(x) for x in v)
        return v

    def arg(self, node: fx.Node, i: int, key: str, default: Any = None) -> Any:
        return self.const(node.args[i] if len(node.args) > i else node.kwargs.get(key, default))

    def out_shape(self, node: fx.Node) -> list[int]:
        """``node``'s output shape on the example, the batch-dependent size as -1."""
        if node.name not in self.shapes_a:
            raise QKDError(f"{describe_node(node)} reshapes: pass an example input to the export")
        a, b = self.shapes_a[node.name], self.shapes_b[node.name]
        shape = [-1 if x != y else x for x, y in zip(a, b)]
        if shape.count(-1) != 1:
            raise QKDError(f"{describe_node(node)} reshapes so that the batch size is not one dimension of the result")
        return shape

    def rank(self, node: fx.Node) -> int:
        if node.name not in self.shapes_a:
            raise QKDError(f"{describe_node(node)} needs its rank: pass an example input to the export")
        return len(self.shapes_a[node.name])

    def spatial(self, node: fx.Node) -> dict[str, list[int]]:
        """The input's height and width where the example gives them (the ONNX form needs them)."""
        return {"in_hw": list(self.shapes_a[node.name][-2:])} if node.name in self.shapes_a else {}

    # ----- layers ---------------------------------------------------------------------------------
    def layer(self, node: fx.Node, x: fx.Node, op: dict, tensors: dict[str, Tensor]) -> None:
        self.ops.append({"name": node.name, "in": [self.src(x)], **op})
        self.values.add(node.name)
        self.pending[node.name] = (self.ops[-1], tensors)

    def batchnorm(self, node: fx.Node, name: str, bn: nn.BatchNorm2d) -> None:
        x = node.args[0]
        k, b = _bn_affine(name, bn)
        producer = self.src(x)
        if producer == x.name and producer in self.pending and self.users[x.name] == 1 and producer not in self.folded:
            _fold_bn(self.pending[producer][1], k, b)
            self.folded.add(producer)
            self.alias[node.name] = producer
            self.values.add(node.name)
            return
        self.emit(node, "affine", [x], module=name)  # a BatchNorm on a sum or a concatenation (DenseNet)
        self.extra[node.name] = (self.ops[-1], {"scale": k, "bias": b})

    # ----- call_module ----------------------------------------------------------------------------
    def module(self, node: fx.Node) -> None:
        m = self.model.get_submodule(node.target)
        x = node.args[0] if node.args else None
        if isinstance(m, QConv2d | QLinear):
            conv = None if isinstance(m, QLinear) else _conv_params(node.target, m.stride, m.padding, m.dilation,
                                                                  m.groups, list(m.kernel_size))  # fmt: skip
            if conv is not None and m.padding_mode != "zeros":
                raise QKDError(f"layer '{node.target}': padding_mode='{m.padding_mode}' is not supported by the "
                               "integer formats")  # fmt: skip
            self.layer(node, x, *_layer_op(node.target, m, m.bias, conv))
        elif isinstance(m, nn.BatchNorm2d):
            self.batchnorm(node, node.target, m)
        elif type(m) in _ACT_MODULES:
            self.emit(node, _ACT_MODULES[type(m)], [x])
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            self.adaptive_avgpool(node, x, m.output_size)
        elif isinstance(m, nn.AvgPool2d):
            self.avgpool(node, x, m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                         m.divisor_override)  # fmt: skip
        elif isinstance(m, nn.MaxPool2d):
            self.maxpool(node, x, m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode, m.return_indices)
        elif isinstance(m, _IDENTITY_MODULES):
            self.same(node, x)
        elif isinstance(m, nn.Flatten):
            self.flatten(node, x, m.start_dim, m.end_dim)
        elif isinstance(m, Quantizer):
            self.act_quant(node, x)
        elif isinstance(m, parametrize.ParametrizationList) and node.target.endswith(".parametrizations.weight"):
            self.weights[node.name] = node.target.rsplit(".parametrizations.", 1)[0]
        else:
            raise QKDError(f"module '{node.target}' ({type(m).__name__}) is not supported by the integer formats"
                           f"{QDQ_HINT}")  # fmt: skip

    def act_quant(self, node: fx.Node, x: fx.Node) -> None:
        """The input quantizer of an in-place layer: the layer op requantizes its input after the ops the
        user applies first, which commute with quantization when they only move values or add zeros."""
        layer_name = node.target.rpartition(".")[0]
        layer = self.model.get_submodule(layer_name) if layer_name else self.model
        if node.target.rpartition(".")[2] != "act_quant" or not _is_in_place(layer):
            raise QKDError(f"quantizer '{node.target}' is not the input quantizer of a quantized layer; the "
                           "integer formats quantize activations only at a layer's input")  # fmt: skip
        path, cur = [], node
        while True:
            if len(cur.users) != 1:
                raise QKDError(f"the quantized input of layer '{layer_name}' is used by more than its convolution; "
                               "the integer formats cannot export it")  # fmt: skip
            cur = next(iter(cur.users))
            if cur.op == "call_function" and cur.target in (F.conv2d, F.linear) and cur.args[0] is (path or [node])[-1]:
                break
            if cur.op == "call_function" and cur.target in OTHER_CONVS:
                self.function(cur)  # refused there, by name
            if not keeps_zero(cur):
                raise QKDError(f"layer '{layer_name}' applies {target_name(cur.target)} to its quantized input "
                               f"({describe_node(cur)}); the integer formats support only zero pads and slicing "
                               "there")  # fmt: skip
            path.append(cur)
        _, a_off, _, _ = layer.act_quant.affine() if layer.act_quant.bits is not None else (0, 0, 0, 0)
        if path and float(a_off) != 0:
            raise QKDError(f"layer '{layer_name}' pads its quantized input, but 0 is not on its input grid "
                           "(a signed interval quantizer): the integer formats cannot export it")  # fmt: skip
        self.in_place_inputs[cur.name] = layer_name
        self.same(node, x)

    def in_place_layer(self, node: fx.Node) -> None:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        name = self.weights.get(w.name) if isinstance(w, fx.Node) else None
        if name is None:
            raise QKDError(f"{describe_node(node)}: {node.target.__name__} with a weight that is not a quantized "
                           "layer's (quantize the layer, or use nn.Conv2d/nn.Linear modules)")  # fmt: skip
        if self.in_place_inputs.get(node.name) != name:
            raise QKDError(f"layer '{name}': its convolution does not take its quantized input")
        layer = self.model.get_submodule(name)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None:
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                raise QKDError(f"layer '{name}': its bias is computed; the integer formats take a parameter")
            bias = operator.attrgetter(bias.target)(self.model)
        conv = None
        if node.target is F.conv2d:
            a = [self.arg(node, i, k, d) for i, (k, d) in
                 enumerate([("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)], start=3)]  # fmt: skip
            conv = _conv_params(name, *a, kernel=list(float_weight(layer).shape[2:]))
        self.layer(node, node.args[0], *_layer_op(name, layer, bias, conv))


def _trace(model: nn.Module, example: Tensor | None) -> Builder:
    """The traced program of a quantized model (in eval mode), its layers' float64 requantization still pending."""
    model = model.eval()
    check_quantized(model)
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        reason = str(e).splitlines()[0].split(". ")[0]
        raise QKDError(f"cannot trace the model for integer export (torch.fx: {reason}); the integer formats take "
                       "models torch.fx traces, the onnx (QDQ) format traces with torch.onnx") from None  # fmt: skip
    b = Builder(model, graph, example)
    handlers = {"call_module": b.module, "call_function": b.function, "call_method": b.method}
    for node in graph.nodes:
        if node.op == "placeholder":
            b.ops.append({"name": node.name, "op": "input", "in": []})
            b.values.add(node.name)
            b.raw.add(node.name)
        elif node.op == "output":
            b.emit(node, "output", [node.args[0]])
        elif is_shape_arithmetic(node, b.shape_nodes):
            b.shape_nodes.add(node.name)
        elif node.op in handlers:
            handlers[node.op](node)
    return b


def to_real_program(model: nn.Module, example: Tensor | None = None) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """The same ops as :func:`to_int_program`, each layer's tensors still real: integer ``weight`` codes,
    float64 ``bias`` and ``scale[_<term>]`` (see ``TERMS``) with BatchNorm folded in. Between layers the
    values are real numbers; the ONNX integer export computes them in float64."""
    b = _trace(model, example)
    held = {**b.pending, **b.extra}
    return b.ops, {f"{name}.{k}": v for name, (_, t) in held.items() for k, v in t.items()}


def to_int_program(model: nn.Module, example: Tensor | None = None) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Trace a quantized model (in eval mode) into integer ops and tensors named ``<op>.<field>``.

    ``example`` (one input batch) is needed by models that reshape, permute or read sizes.
    """
    b = _trace(model, example)
    tensors = {f"{name}.{k}": v for name, (op, t) in b.pending.items() for k, v in layer_to_fixed_point(op, t).items()}
    tensors.update(
        {f"{name}.{k}": v for name, (op, t) in b.extra.items() for k, v in affine_to_fixed_point(op, t).items()}
    )
    return b.ops, tensors
