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
reshapes and permutations (channel shuffle) and flatten. Which of them the integer engine computes
with integers only and which in float64 is said in :mod:`qkd.export.intengine`. Anything else is
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
from torch.utils import _pytree

from qkd.errors import QKDError
from qkd.quant import IntervalQuantizer, LSQQuantizer, QConv2d, QLinear, Quantizer

FRAC_BITS = 32  # fixed-point fraction bits of the int64 tensors between layers (range +-2**30)
_LEAVES = (QConv2d, QLinear, Quantizer)  # besides torch.nn's own modules, which fx keeps whole

LAYERS = ("qconv2d", "qlinear")
ACTIVATIONS = ("relu", "relu6", "hardswish", "hardsigmoid", "silu", "sigmoid")
SHAPE_OPS = ("slice", "pad", "chunk", "cat", "reshape", "permute", "flatten", "maxpool")  # values pass unchanged
OPS = (*LAYERS, *ACTIVATIONS, *SHAPE_OPS, "input", "output", "add", "mul", "add_const", "scale", "affine",
       "mean_hw", "avgpool", "adaptive_avgpool")  # fmt: skip

_ACT_MODULES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.Hardsigmoid: "hardsigmoid",
                nn.SiLU: "silu", nn.Sigmoid: "sigmoid"}  # fmt: skip
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                  F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid"}  # fmt: skip
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
_IDENTITY_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_IDENTITY_METHODS = ("contiguous", "clone", "detach")
_OTHER_CONVS = (F.conv1d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_ARITHMETIC = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", operator.imul: "mul",
               torch.mul: "mul", operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", operator.truediv: "div",
               operator.itruediv: "div", torch.div: "div"}  # fmt: skip
# shape arithmetic: evaluated on the example, never part of the program
_SHAPE_OPERATORS = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv,
                    operator.mod, len, int, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                    operator.ge, torch._assert)  # fmt: skip
_SHAPE_METHODS = ("size", "dim")


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


def fixed_multiplier(m: Tensor, what: str = "a requantization multiplier") -> tuple[Tensor, Tensor]:
    """Real multipliers as (int32 mantissa, right shift): ``x * m ~= round(x * m0 / 2**s)`` (a left shift if s < 0)."""
    m = m.double()
    exp = torch.where(m != 0, torch.ceil(torch.log2(m.abs().clamp_min(1e-300))), torch.zeros_like(m))
    m0 = torch.round(m / torch.pow(2.0, exp) * 2**31)
    full = m0.abs() == 2**31  # mantissa rounded up to 1.0
    m0, exp = torch.where(full, m0 / 2, m0), torch.where(full, exp + 1, exp)
    shift = 31 - exp
    if (shift < -30).any() or (shift > 93).any():
        big = float(m.abs().max())
        raise QKDError(f"{what} ({big:.3g}) is outside the int32 fixed-point range; activations this far from "
                       "1 (often a network whose BatchNorm statistics were never set) do not fit the integer "
                       "engine's int64 fixed point")  # fmt: skip
    return m0.long(), shift.long()


def pool_windows(op: dict[str, Any], size: int, axis: int) -> tuple[Tensor, Tensor]:
    """One spatial axis of an ``avgpool`` / ``adaptive_avgpool`` op over an input of ``size``: a 0/1
    matrix ``(out, size)`` whose row ``i`` selects window ``i``'s inputs, and each window's divisor.

    Both pools are separable: a window's sum is ``rows @ x @ cols.T`` and its divisor the product of
    the two axes' divisors (PyTorch's ``avg_pool2d`` / ``adaptive_avg_pool2d`` rules, ceil mode and
    ``count_include_pad`` included).
    """
    if op["op"] == "adaptive_avgpool":
        out = op["output_size"][axis]
        starts = [i * size // out for i in range(out)]
        ends = [-(-(i + 1) * size // out) for i in range(out)]
        counts = [e - s for s, e in zip(starts, ends)]
    else:
        k, s, p = op["kernel"][axis], op["stride"][axis], op["padding"][axis]
        out = (size + 2 * p - k + (s - 1 if op["ceil_mode"] else 0)) // s + 1
        if op["ceil_mode"] and (out - 1) * s >= size + p:
            out -= 1
        starts = [i * s - p for i in range(out)]
        ends = [min(b + k, size + p) for b in starts]
        counts = [e - b for b, e in zip(starts, ends)]
        starts, ends = [max(b, 0) for b in starts], [min(e, size) for e in ends]
        if not op["count_include_pad"]:
            counts = [e - b for b, e in zip(starts, ends)]
    rows = torch.zeros(out, size, dtype=torch.long)
    for i, (b, e) in enumerate(zip(starts, ends)):
        rows[i, b:e] = 1
    return rows, torch.tensor(counts, dtype=torch.long)


# A layer's real output is a sum of integer terms, each with its own real multiplier (affine grids:
# input ``oa + sa * ca``, weight ``ow[c] + sw[c] * cw``; padding contributes exact zeros):
#   sa sw conv(ca, cw) + sa ow conv(ca, 1) + oa sw conv(valid, cw) + oa ow conv(valid, 1)
# LSQ grids have zero offsets, so only the first term remains (the usual integer layer). The keys
# name the terms: "" (codes x codes), "xsum" (input code sums), "wsum" and "count" (over the
# unpadded window); a layer's file holds ``mult_<key>``/``shift_<key>`` only for the terms it has.
TERMS = ("", "xsum", "wsum", "count")


def _check_quantizers(name: str, wq: nn.Module, aq: nn.Module) -> None:
    for q in (wq, aq):
        if not isinstance(q, LSQQuantizer | IntervalQuantizer):
            raise QKDError(f"layer '{name}' uses a {type(q).__name__}; the integer engine supports LSQ and "
                           "interval quantizers")  # fmt: skip
        if q.bits is None or not q.enabled:
            raise QKDError(f"layer '{name}' is not quantized on both weights and input; the integer engine "
                           "needs every Conv/Linear quantized (set quant.first_last_bits to 8, not float)")  # fmt: skip
        if not bool(q.initialized):
            raise QKDError(f"layer '{name}' has an uninitialised quantizer; calibrate or train the model first")


def _layer_op(name: str, wq: Quantizer, aq: Quantizer, weight: Tensor, bias: Tensor | None,
              conv: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Tensor]]:  # fmt: skip
    """The integer form of one quantized layer (before any BatchNorm is folded in); ``weight`` is the
    float weight before its quantizer, ``conv`` the convolution's hyperparameters (None: linear)."""
    _check_quantizers(name, wq, aq)
    out_ch = weight.shape[0]
    w_step, w_off, w_lo, w_hi = (t.double().reshape(-1).expand(out_ch) if isinstance(t, Tensor) else t
                                 for t in wq.affine())  # fmt: skip
    a_step, a_off, a_lo, a_hi = aq.affine()
    a_step, a_off = float(a_step), float(a_off)
    # the integers the fake-quant model uses, computed by its own quantizer (same float32 rounding)
    per_ch = (-1, *[1] * (weight.dim() - 1))
    with torch.no_grad():
        w_int = torch.round((wq(weight.detach()).double() - w_off.view(per_ch)) / w_step.view(per_ch))
    w_int = w_int.clamp(w_lo, w_hi).to(torch.int16)
    op: dict[str, Any] = {
        "op": "qlinear" if conv is None else "qconv2d",
        "module": name,
        "w_bits": wq.bits, "w_range": [int(w_lo), int(w_hi)], "w_shape": list(weight.shape),
        "a_bits": aq.bits, "a_range": [int(a_lo), int(a_hi)], "a_scale": a_step, "a_offset": a_off,
    }  # fmt: skip
    if isinstance(aq, IntervalQuantizer):  # the network's input is quantized with the quantizer's own float32 maths
        op["a_interval"] = [float(aq.lower.detach()), float(aq.upper.detach())]
    op.update(conv or {})
    bias = bias.detach().double() if bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    # real output = sum of terms (see TERMS) + bias; kept as float64 until the BN fold is known
    scales = {"": a_step * w_step, "xsum": a_step * w_off, "wsum": a_off * w_step, "count": a_off * w_off}
    tensors = {"weight": w_int, "bias": bias}
    tensors.update({f"scale_{k}" if k else "scale": v for k, v in scales.items() if k == "" or bool(v.any())})
    return op, tensors


def _pair(v: Any) -> list[int]:
    return [int(x) for x in v] if isinstance(v, list | tuple) else [int(v), int(v)]


def _conv_params(name: str, stride: Any, padding: Any, dilation: Any, groups: int, kernel: list[int]) -> dict:
    if isinstance(padding, str):  # F.conv2d(padding="same"/"valid"); "same" only where it is symmetric
        total = [d * (k - 1) for d, k in zip(_pair(dilation), kernel)]
        if padding == "same" and any(t % 2 for t in total):
            raise QKDError(f"layer '{name}': asymmetric padding='same' is not supported by the integer engine")
        padding = [t // 2 for t in total] if padding == "same" else [0, 0]
    return {"stride": _pair(stride), "padding": _pair(padding), "dilation": _pair(dilation), "groups": int(groups)}


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


def _finish_layer(op: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Turn float64 scales/bias into the integer requantization the engine uses."""
    what = f"the requantization multiplier of layer '{op['module']}'"
    out = {"weight": tensors["weight"], "bias": torch.round(tensors["bias"] * 2**FRAC_BITS).long()}
    for key, scale in tensors.items():
        if key.startswith("scale"):
            term = key[len("scale") :]
            out[f"mult{term}"], out[f"shift{term}"] = m0, shift = fixed_multiplier(scale * 2**FRAC_BITS, what)
            if term:  # offset terms are large and cancel one another: a second mantissa for the remainder
                rest = scale * 2**FRAC_BITS - m0.double() * torch.pow(2.0, -shift.double())
                out[f"mult{term}_lo"], out[f"shift{term}_lo"] = fixed_multiplier(rest, what)
    in_scale = torch.tensor([2.0**-FRAC_BITS / op["a_scale"]], dtype=torch.float64)
    out["in_mult"], out["in_shift"] = fixed_multiplier(in_scale, f"the input requantization of layer '{op['module']}'")
    out["in_offset"] = torch.tensor([round(op["a_offset"] * 2**FRAC_BITS)], dtype=torch.long)
    return out


def _finish_affine(op: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """A per-channel ``x * scale + bias`` between fixed-point values: int32 mantissa and shift, fixed-point bias."""
    mult, shift = fixed_multiplier(tensors["scale"], f"the multiplier of BatchNorm '{op['module']}'")
    return {"mult": mult, "shift": shift, "bias": torch.round(tensors["bias"] * 2**FRAC_BITS).long()}


def _slice_spec(index: Any) -> list:
    items = index if isinstance(index, tuple) else (index,)
    spec = []
    for it in items:
        if isinstance(it, slice):
            if any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step)):
                raise QKDError(f"slicing with computed bounds {index!r} is not supported by the integer engine")
            spec.append([it.start, it.stop, it.step])
        elif it is Ellipsis:
            spec.append("...")
        else:
            raise QKDError(f"unsupported indexing {index!r} in the traced model")
    return spec


def _dim_slice(dim: int, start: int, stop: int) -> list:
    """The ``slice`` op's index selecting ``start:stop`` along ``dim``."""
    if dim >= 0:
        return [[None, None, None]] * dim + [[start, stop, None]]
    return ["...", [start, stop, None]] + [[None, None, None]] * (-dim - 1)


def _describe(node: fx.Node) -> str:
    """The node and the module whose forward made it, for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    where = next(reversed(stack.values()))[0] if stack else ""
    return f"node '{node.name}' in {f'module {where!r}' if where else 'the model forward'}"


def _target_name(f: Any) -> str:
    return getattr(f, "__name__", str(f))


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
        elif not any(isinstance(v, Tensor) for v in _pytree.tree_leaves(out)):
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


class _Builder:
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
            raise QKDError(f"{_describe(node)} uses {what} directly, which the integer engine does not compute "
                           "(only quantized layers hold parameters)")  # fmt: skip
        return self.alias.get(node.name, node.name)

    def emit(self, node: fx.Node, op: str, inputs: list, **attrs: Any) -> None:
        names = [self.src(i) for i in inputs]
        raw = [n in self.raw for n in names]
        if any(raw) and (op not in SHAPE_OPS or not all(raw)):
            raise QKDError(f"{op} on the network's input before its first quantized layer ({_describe(node)}): "
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
                raise QKDError(f"{_describe(v)} computes a shape: pass an example input to the export")
            raise QKDError(f"{_describe(v)} gives a tensor where the integer engine needs a constant")
        if isinstance(v, list | tuple):
            return type(v)(self.const(x) for x in v)
        return v

    def arg(self, node: fx.Node, i: int, key: str, default: Any = None) -> Any:
        return self.const(node.args[i] if len(node.args) > i else node.kwargs.get(key, default))

    def out_shape(self, node: fx.Node) -> list[int]:
        """``node``'s output shape on the example, the batch-dependent size as -1."""
        if node.name not in self.shapes_a:
            raise QKDError(f"{_describe(node)} reshapes: pass an example input to the export")
        a, b = self.shapes_a[node.name], self.shapes_b[node.name]
        shape = [-1 if x != y else x for x, y in zip(a, b)]
        if shape.count(-1) != 1:
            raise QKDError(f"{_describe(node)} reshapes so that the batch size is not one dimension of the result")
        return shape

    def rank(self, node: fx.Node) -> int:
        if node.name not in self.shapes_a:
            raise QKDError(f"{_describe(node)} needs its rank: pass an example input to the export")
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
                               "integer engine")  # fmt: skip
            self.layer(node, x, *_layer_op(node.target, m.weight_quant, m.act_quant, m.weight, m.bias, conv))
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
            raise QKDError(f"module '{node.target}' ({type(m).__name__}) is not supported by the integer engine")

    def act_quant(self, node: fx.Node, x: fx.Node) -> None:
        """The input quantizer of an in-place layer: the layer op requantizes its input after the ops the
        user applies first, which commute with quantization when they only move values or add zeros."""
        layer_name = node.target.rpartition(".")[0]
        layer = self.model.get_submodule(layer_name) if layer_name else self.model
        if node.target.rpartition(".")[2] != "act_quant" or not _is_in_place(layer):
            raise QKDError(f"quantizer '{node.target}' is not the input quantizer of a quantized layer; the "
                           "integer engine quantizes activations only at a layer's input")  # fmt: skip
        path, cur = [], node
        while True:
            if len(cur.users) != 1:
                raise QKDError(f"the quantized input of layer '{layer_name}' is used by more than its convolution; "
                               "the integer engine cannot export it")  # fmt: skip
            cur = next(iter(cur.users))
            if cur.op == "call_function" and cur.target in (F.conv2d, F.linear) and cur.args[0] is (path or [node])[-1]:
                break
            if cur.op == "call_function" and cur.target in _OTHER_CONVS:
                self.function(cur)  # refused there, by name
            if not _keeps_zero(cur):
                raise QKDError(f"layer '{layer_name}' applies {_target_name(cur.target)} to its quantized input "
                               f"({_describe(cur)}); the integer engine supports only zero pads and slicing "
                               "there")  # fmt: skip
            path.append(cur)
        _, a_off, _, _ = layer.act_quant.affine() if layer.act_quant.bits is not None else (0, 0, 0, 0)
        if path and float(a_off) != 0:
            raise QKDError(f"layer '{layer_name}' pads its quantized input, but 0 is not on its input grid "
                           "(a signed interval quantizer): the integer engine cannot export it")  # fmt: skip
        self.in_place_inputs[cur.name] = layer_name
        self.same(node, x)

    # ----- call_function / call_method ------------------------------------------------------------
    def function(self, node: fx.Node) -> None:
        f, args = node.target, node.args
        if f in _ARITHMETIC:
            self.arithmetic(node, _ARITHMETIC[f], args[0], args[1])
        elif f in _ACT_FUNCTIONS:
            self.emit(node, _ACT_FUNCTIONS[f], [args[0]])
        elif f in (F.conv2d, F.linear):
            self.in_place_layer(node)
        elif f in _OTHER_CONVS:
            raise QKDError(f"{_describe(node)}: {f.__name__} is not supported by the integer engine (Conv2d and "
                           "Linear are)")  # fmt: skip
        elif f is torch.flatten:
            self.flatten(node, args[0], self.arg(node, 1, "start_dim", 0), self.arg(node, 2, "end_dim", -1))
        elif f is F.pad:
            self.pad(node, args[0], self.arg(node, 1, "pad"), self.arg(node, 2, "mode", "constant"),
                     self.arg(node, 3, "value", None))  # fmt: skip
        elif f is operator.getitem:
            self.getitem(node, args[0], args[1])
        elif f is F.adaptive_avg_pool2d:
            self.adaptive_avgpool(node, args[0], self.arg(node, 1, "output_size"))
        elif f is F.avg_pool2d:
            a = [self.arg(node, i, k, d) for i, (k, d) in enumerate(
                [("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                 ("count_include_pad", True), ("divisor_override", None)], start=1)]  # fmt: skip
            self.avgpool(node, args[0], *a)
        elif f in (F.max_pool2d, torch.max_pool2d):
            a = [self.arg(node, i, k, d) for i, (k, d) in enumerate(
                [("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
                 ("return_indices", False)], start=1)]  # fmt: skip
            self.maxpool(node, args[0], *a)
        elif f in (torch.cat, torch.concat):
            self.emit(node, "cat", list(args[0]), dim=self.arg(node, 1, "dim", 0))
        elif f in (torch.chunk, torch.split):
            self.splits[node.name] = (args[0], f.__name__, self.arg(node, 1, "chunks" if f is torch.chunk else
                                      "split_size_or_sections"), self.arg(node, 2, "dim", 0))  # fmt: skip
        elif f in (torch.transpose, torch.swapaxes):
            self.transpose(node, args[0], self.arg(node, 1, "dim0"), self.arg(node, 2, "dim1"))
        elif f is torch.permute:
            self.emit(node, "permute", [args[0]], perm=list(self.arg(node, 1, "dims")))
        elif f is torch.reshape:
            self.emit(node, "reshape", [args[0]], shape=self.out_shape(node))
        elif f is torch.mean:
            self.mean(node, args[0], self.arg(node, 1, "dim"), self.arg(node, 2, "keepdim", False))
        elif f is F.dropout or _target_name(f) == "stochastic_depth":  # torchvision.ops.stochastic_depth
            if self.arg(node, 2 if f is F.dropout else 3, "training", True):
                raise QKDError(f"{_describe(node)}: {_target_name(f)} with training=True in eval mode")
            self.same(node, args[0])
        else:
            raise QKDError(f"function {_target_name(f)} ({_describe(node)}) is not supported by the integer engine")

    def method(self, node: fx.Node) -> None:
        name, x = node.target, node.args[0]
        if name in ("flatten",):
            self.flatten(node, x, self.arg(node, 1, "start_dim", 0), self.arg(node, 2, "end_dim", -1))
        elif name in _ACT_METHODS:
            self.emit(node, _ACT_METHODS[name], [x])
        elif name in _IDENTITY_METHODS:
            self.same(node, x)
        elif name in ("view", "reshape"):
            self.emit(node, "reshape", [x], shape=self.out_shape(node))
        elif name in ("transpose", "swapaxes"):
            self.transpose(node, x, self.arg(node, 1, "dim0"), self.arg(node, 2, "dim1"))
        elif name == "permute":
            dims = node.args[1:] if len(node.args) > 2 else self.arg(node, 1, "dims")
            self.emit(node, "permute", [x], perm=[int(d) for d in self.const(list(dims))])
        elif name == "mean":
            self.mean(node, x, self.arg(node, 1, "dim"), self.arg(node, 2, "keepdim", False))
        elif name in ("chunk", "split"):
            key = "chunks" if name == "chunk" else "split_size"
            self.splits[node.name] = (x, name, self.arg(node, 1, key), self.arg(node, 2, "dim", 0))
        elif name in ("add", "add_", "mul", "mul_", "sub", "sub_", "div", "div_"):
            self.arithmetic(node, name.rstrip("_"), x, node.args[1])
        else:
            raise QKDError(f"tensor method .{name}() ({_describe(node)}) is not supported by the integer engine")

    # ----- the ops ----------------------------------------------------------------------------------
    def arithmetic(self, node: fx.Node, kind: str, a: Any, b: Any) -> None:
        """``add``/``mul`` of two tensors, or a tensor plus, minus, times or divided by a constant."""
        tensors = [isinstance(v, fx.Node) and v.name not in self.shape_nodes for v in (a, b)]
        if all(tensors) and kind in ("add", "mul"):
            self.emit(node, kind, [a, b])
            return
        if all(tensors) or not any(tensors):
            raise QKDError(f"{_describe(node)}: {kind} of {'two tensors' if all(tensors) else 'constants'} is not "
                           "supported by the integer engine")  # fmt: skip
        x, c = (a, self.const(b)) if tensors[0] else (b, self.const(a))
        if not isinstance(c, int | float) or (kind in ("sub", "div") and not tensors[0]) or kind == "div" and not c:
            raise QKDError(f"{_describe(node)}: {kind} of a tensor and {c!r} is not supported by the integer engine")
        if kind in ("add", "sub"):
            self.emit(node, "add_const", [x], value=float(c if kind == "add" else -c))
        else:
            factor = float(c if kind == "mul" else 1 / c)
            mult, shift = fixed_multiplier(torch.tensor([factor], dtype=torch.float64))
            self.emit(node, "scale", [x], factor=factor, mult=int(mult), shift=int(shift))

    def in_place_layer(self, node: fx.Node) -> None:
        w = node.args[1] if len(node.args) > 1 else node.kwargs.get("weight")
        name = self.weights.get(w.name) if isinstance(w, fx.Node) else None
        if name is None:
            raise QKDError(f"{_describe(node)}: {node.target.__name__} with a weight that is not a quantized "
                           "layer's (quantize the layer, or use nn.Conv2d/nn.Linear modules)")  # fmt: skip
        if self.in_place_inputs.get(node.name) != name:
            raise QKDError(f"layer '{name}': its convolution does not take its quantized input")
        layer = self.model.get_submodule(name)
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None:
            if not (isinstance(bias, fx.Node) and bias.op == "get_attr"):
                raise QKDError(f"layer '{name}': its bias is computed; the integer engine takes a parameter")
            bias = operator.attrgetter(bias.target)(self.model)
        conv = None
        if node.target is F.conv2d:
            a = [self.arg(node, i, k, d) for i, (k, d) in
                 enumerate([("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1)], start=3)]  # fmt: skip
            conv = _conv_params(name, *a, kernel=list(layer.parametrizations.weight.original.shape[2:]))
        wq, weight = layer.parametrizations.weight[0], layer.parametrizations.weight.original
        self.layer(node, node.args[0], *_layer_op(name, wq, layer.act_quant, weight, bias, conv))

    def getitem(self, node: fx.Node, x: fx.Node, index: Any) -> None:
        if isinstance(x, fx.Node) and x.name in self.splits:
            src, kind, arg, dim = self.splits[x.name]
            if not isinstance(index, int):
                raise QKDError(f"{_describe(node)}: {kind} results indexed by {index!r}")
            if kind == "chunk":
                self.emit(node, "chunk", [src], chunks=int(arg), dim=int(dim), index=index)
                return
            sizes = arg if isinstance(arg, list | tuple) else None
            start = sum(sizes[:index]) if sizes else index * arg
            stop = start + sizes[index] if sizes else start + arg
            self.emit(node, "slice", [src], index=_dim_slice(int(dim), start, stop))
            return
        self.emit(node, "slice", [x], index=_slice_spec(index))

    def flatten(self, node: fx.Node, x: fx.Node, start: int, end: int) -> None:
        if start == 1 and end == -1:
            self.emit(node, "flatten", [x], start_dim=1)
        else:
            self.emit(node, "reshape", [x], shape=self.out_shape(node))

    def pad(self, node: fx.Node, x: fx.Node, pad: Any, mode: str, value: Any) -> None:
        if mode != "constant" or value not in (None, 0, 0.0):
            raise QKDError(f"{_describe(node)}: F.pad mode={mode!r} value={value!r}; the integer engine pads with "
                           "zeros")  # fmt: skip
        self.emit(node, "pad", [x], pad=[int(p) for p in pad])

    def transpose(self, node: fx.Node, x: fx.Node, d0: int, d1: int) -> None:
        perm = list(range(self.rank(x)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        self.emit(node, "permute", [x], perm=perm)

    def mean(self, node: fx.Node, x: fx.Node, dims: Any, keepdim: bool) -> None:
        dims = {dims} if isinstance(dims, int) else set(dims or ())
        if dims not in ({2, 3}, {-1, -2}) or (dims == {-1, -2} and self.rank(x) != 4):
            raise QKDError(f"{_describe(node)}: mean over dims {sorted(dims)}; the integer engine averages over "
                           "height and width (dims 2, 3)")  # fmt: skip
        self.emit(node, "mean_hw", [x], keepdim=bool(keepdim))

    def adaptive_avgpool(self, node: fx.Node, x: fx.Node, size: Any) -> None:
        size = _pair(size) if not isinstance(size, list | tuple) or None not in size else None
        if size is None:
            raise QKDError(f"{_describe(node)}: adaptive average pooling to a size with None")
        if size == [1, 1]:
            self.emit(node, "mean_hw", [x], keepdim=True)
        else:
            self.emit(node, "adaptive_avgpool", [x], output_size=size, **self.spatial(x))

    def avgpool(self, node: fx.Node, x: fx.Node, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                count_include_pad: bool, divisor_override: Any) -> None:  # fmt: skip
        if divisor_override:
            raise QKDError(f"{_describe(node)}: average pooling with divisor_override")
        self.emit(node, "avgpool", [x], kernel=_pair(kernel), stride=_pair(stride or kernel), padding=_pair(padding),
                  ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad), **self.spatial(x))  # fmt: skip

    def maxpool(self, node: fx.Node, x: fx.Node, kernel: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: bool, return_indices: bool) -> None:  # fmt: skip
        if return_indices:
            raise QKDError(f"{_describe(node)}: max pooling with return_indices")
        self.emit(node, "maxpool", [x], kernel=_pair(kernel), stride=_pair(stride or kernel), padding=_pair(padding),
                  dilation=_pair(dilation), ceil_mode=bool(ceil_mode))  # fmt: skip


def _keeps_zero(node: fx.Node) -> bool:
    """An op between an in-place layer's quantizer and its convolution that maps quantized values to
    quantized values and adds only zeros: a zero pad, slicing, a contiguous copy."""
    if node.op == "call_method":
        return node.target in _IDENTITY_METHODS
    if node.op != "call_function":
        return False
    if node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        return mode == "constant" and value in (None, 0, 0.0)
    return node.target is operator.getitem and not isinstance(node.args[1], int)


def _is_shape_arithmetic(node: fx.Node, shape_nodes: set[str]) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()`` and integer arithmetic on them (nothing else reads a tensor)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    nodes = [a for a in _pytree.tree_leaves((node.args, node.kwargs)) if isinstance(a, fx.Node)]
    return node.target in _SHAPE_OPERATORS and bool(nodes) and all(a.name in shape_nodes for a in nodes)


def _trace(model: nn.Module, example: Tensor | None) -> _Builder:
    """The traced program of a quantized model (in eval mode), its layers' float64 requantization still pending."""
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise QKDError(f"cannot trace the model for integer export: {str(e).splitlines()[0]}") from None
    b = _Builder(model, graph, example)
    handlers = {"call_module": b.module, "call_function": b.function, "call_method": b.method}
    for node in graph.nodes:
        if node.op == "placeholder":
            b.ops.append({"name": node.name, "op": "input", "in": []})
            b.values.add(node.name)
            b.raw.add(node.name)
        elif node.op == "output":
            b.emit(node, "output", [node.args[0]])
        elif _is_shape_arithmetic(node, b.shape_nodes):
            b.shape_nodes.add(node.name)
        elif node.op in handlers:
            handlers[node.op](node)
    if not b.pending:
        raise QKDError("the model has no quantized layers; export the student of a quantized run")
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
    tensors = {f"{name}.{k}": v for name, (op, t) in b.pending.items() for k, v in _finish_layer(op, t).items()}
    tensors.update({f"{name}.{k}": v for name, (op, t) in b.extra.items() for k, v in _finish_affine(op, t).items()})
    return b.ops, tensors
