"""From a trained fake-quant student to an integer program: a list of ops plus integer tensors.

The student is traced with ``torch.fx``. Every quantized Conv/Linear becomes a ``qconv``/``qlinear``
op holding its weights as integers, the BatchNorm that follows it folded into a per-channel
requantization (multiplier and bias), and its input quantizer's scale. Accumulators are int32.
The tensors between layers (what the fake-quant model keeps in float: BatchNorm outputs, residual
sums, ReLU outputs before the next quantizer) are int64 fixed point with ``FRAC_BITS`` fraction
bits, finer than float32 at these magnitudes, so the integer program follows the fake-quant model's
rounding decisions rather than adding its own; each layer's input is requantized to its own
low-bit integers exactly where the fake-quant model quantizes it. Multipliers are stored as int32
mantissas with a right shift (gemmlowp / TFLite style), so the engine uses integer arithmetic only:
float appears only in quantizing the network's input and in reading the logits.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.quant import IntervalQuantizer, LSQQuantizer, QConv2d, QLinear

FRAC_BITS = 32  # fixed-point fraction bits of the int64 tensors between layers (range +-2**30)
_LEAVES = (QConv2d, QLinear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.AdaptiveAvgPool2d, nn.MaxPool2d, nn.Dropout,
           nn.Identity, nn.Flatten)  # fmt: skip


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _LEAVES) or super().is_leaf_module(m, qualname)


def fixed_multiplier(m: Tensor) -> tuple[Tensor, Tensor]:
    """Real multipliers as (int32 mantissa, right shift): ``x * m ~= round(x * m0 / 2**s)`` (a left shift if s < 0)."""
    m = m.double()
    exp = torch.where(m != 0, torch.ceil(torch.log2(m.abs().clamp_min(1e-300))), torch.zeros_like(m))
    m0 = torch.round(m / torch.pow(2.0, exp) * 2**31)
    full = m0.abs() == 2**31  # mantissa rounded up to 1.0
    m0, exp = torch.where(full, m0 / 2, m0), torch.where(full, exp + 1, exp)
    shift = 31 - exp
    if (shift < -30).any() or (shift > 93).any():
        raise QKDError("a requantization multiplier is outside the int32 fixed-point range")
    return m0.long(), shift.long()


# A layer's real output is a sum of integer terms, each with its own real multiplier (affine grids:
# input ``oa + sa * ca``, weight ``ow[c] + sw[c] * cw``; padding contributes exact zeros):
#   sa sw conv(ca, cw) + sa ow conv(ca, 1) + oa sw conv(valid, cw) + oa ow conv(valid, 1)
# LSQ grids have zero offsets, so only the first term remains (the usual integer layer). The keys
# name the terms: "" (codes x codes), "xsum" (input code sums), "wsum" and "count" (over the
# unpadded window); a layer's file holds ``mult_<key>``/``shift_<key>`` only for the terms it has.
TERMS = ("", "xsum", "wsum", "count")


def _check_quantizers(name: str, layer: nn.Module) -> None:
    for q in (layer.weight_quant, layer.act_quant):
        if not isinstance(q, LSQQuantizer | IntervalQuantizer):
            raise QKDError(f"layer '{name}' uses a {type(q).__name__}; the integer engine supports LSQ and "
                           "interval quantizers")  # fmt: skip
        if q.bits is None or not q.enabled:
            raise QKDError(f"layer '{name}' is not quantized on both weights and input; the integer engine "
                           "needs every Conv/Linear quantized (set quant.first_last_bits to 8, not float)")  # fmt: skip
        if not bool(q.initialized):
            raise QKDError(f"layer '{name}' has an uninitialised quantizer; calibrate or train the model first")


def _layer_op(name: str, layer: nn.Module) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """The integer form of one quantized layer (before any BatchNorm is folded in)."""
    _check_quantizers(name, layer)
    wq, aq = layer.weight_quant, layer.act_quant
    out_ch = layer.weight.shape[0]
    w_step, w_off, w_lo, w_hi = (t.double().reshape(-1).expand(out_ch) if isinstance(t, Tensor) else t
                                 for t in wq.affine())  # fmt: skip
    a_step, a_off, a_lo, a_hi = aq.affine()
    a_step, a_off = float(a_step), float(a_off)
    # the integers the fake-quant model uses, computed by its own quantizer (same float32 rounding)
    per_ch = (-1, *[1] * (layer.weight.dim() - 1))
    w_int = torch.round((wq(layer.weight.detach()).double() - w_off.view(per_ch)) / w_step.view(per_ch))
    w_int = w_int.clamp(w_lo, w_hi).to(torch.int16)
    op: dict[str, Any] = {
        "op": "qconv2d" if isinstance(layer, QConv2d) else "qlinear",
        "module": name,
        "w_bits": wq.bits, "w_range": [int(w_lo), int(w_hi)], "w_shape": list(layer.weight.shape),
        "a_bits": aq.bits, "a_range": [int(a_lo), int(a_hi)], "a_scale": a_step, "a_offset": a_off,
    }  # fmt: skip
    if isinstance(aq, IntervalQuantizer):  # the network's input is quantized with the quantizer's own float32 maths
        op["a_interval"] = [float(aq.lower.detach()), float(aq.upper.detach())]
    if isinstance(layer, QConv2d):
        op.update(stride=list(layer.stride), padding=list(layer.padding), dilation=list(layer.dilation),
                  groups=layer.groups)  # fmt: skip
    bias = layer.bias.detach().double() if layer.bias is not None else torch.zeros(out_ch, dtype=torch.float64)
    # real output = sum of terms (see TERMS) + bias; kept as float64 until the BN fold is known
    scales = {"": a_step * w_step, "xsum": a_step * w_off, "wsum": a_off * w_step, "count": a_off * w_off}
    tensors = {"weight": w_int, "bias": bias}
    tensors.update({f"scale_{k}" if k else "scale": v for k, v in scales.items() if k == "" or bool(v.any())})
    return op, tensors


def _fold_bn(tensors: dict[str, Tensor], bn: nn.BatchNorm2d) -> None:
    k = bn.weight.detach().double() / torch.sqrt(bn.running_var.double() + bn.eps)
    for key in [key for key in tensors if key.startswith("scale")]:
        tensors[key] = tensors[key] * k
    tensors["bias"] = (tensors["bias"] - bn.running_mean.double()) * k + bn.bias.detach().double()


def _finish_layer(op: dict, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Turn float64 scales/bias into the integer requantization the engine uses."""
    out = {"weight": tensors["weight"], "bias": torch.round(tensors["bias"] * 2**FRAC_BITS).long()}
    for key, scale in tensors.items():
        if key.startswith("scale"):
            term = key[len("scale") :]
            out[f"mult{term}"], out[f"shift{term}"] = m0, shift = fixed_multiplier(scale * 2**FRAC_BITS)
            if term:  # offset terms are large and cancel one another: a second mantissa for the remainder
                rest = scale * 2**FRAC_BITS - m0.double() * torch.pow(2.0, -shift.double())
                out[f"mult{term}_lo"], out[f"shift{term}_lo"] = fixed_multiplier(rest)
    out["in_mult"], out["in_shift"] = fixed_multiplier(torch.tensor([2.0**-FRAC_BITS / op["a_scale"]],
                                                                    dtype=torch.float64))  # fmt: skip
    out["in_offset"] = torch.tensor([round(op["a_offset"] * 2**FRAC_BITS)], dtype=torch.long)
    return out


def _slice_spec(index: Any) -> list:
    items = index if isinstance(index, tuple) else (index,)
    spec = []
    for it in items:
        if isinstance(it, slice):
            spec.append([it.start, it.stop, it.step])
        elif it is Ellipsis:
            spec.append("...")
        else:
            raise QKDError(f"unsupported indexing {index!r} in the traced model")
    return spec


def _const_arg(node: fx.Node, i: int, key: str, default: Any) -> Any:
    return node.args[i] if len(node.args) > i else node.kwargs.get(key, default)


class _Builder:
    """Walks the fx graph once, emitting ops; BatchNorm right after a layer is folded into it."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.ops: list[dict[str, Any]] = []
        self.pending: dict[str, tuple[dict, dict[str, Tensor]]] = {}  # layer ops awaiting a possible BN
        self.alias: dict[str, str] = {}  # fx node name -> op name holding its value
        self.users: dict[str, int] = {}

    def src(self, node: Any) -> str:
        if not isinstance(node, fx.Node):
            raise QKDError(f"unsupported constant operand {node!r} in the traced model")
        return self.alias.get(node.name, node.name)

    def emit(self, node: fx.Node, op: str, inputs: list, **attrs: Any) -> None:
        self.ops.append({"name": node.name, "op": op, "in": [self.src(i) for i in inputs], **attrs})

    def module(self, node: fx.Node) -> None:
        m = self.model.get_submodule(node.target)
        x = node.args[0]
        if isinstance(m, QConv2d | QLinear):
            op, tensors = _layer_op(node.target, m)
            self.ops.append({"name": node.name, "in": [self.src(x)], **op})
            self.pending[node.name] = (self.ops[-1], tensors)
        elif isinstance(m, nn.BatchNorm2d):
            producer = self.src(x)
            if producer in self.pending and self.users[x.name] == 1:
                _fold_bn(self.pending[producer][1], m)
                self.alias[node.name] = producer
            else:
                raise QKDError(f"BatchNorm '{node.target}' does not directly follow a quantized layer")
        elif isinstance(m, nn.ReLU | nn.ReLU6):
            self.emit(node, "relu" if isinstance(m, nn.ReLU) else "relu6", [x])
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            if m.output_size not in (1, (1, 1)):
                raise QKDError(f"AdaptiveAvgPool2d '{node.target}' must pool to 1x1 for the integer engine")
            self.emit(node, "mean_hw", [x])
        elif isinstance(m, nn.MaxPool2d):
            self.emit(node, "maxpool", [x], kernel=m.kernel_size, stride=m.stride, padding=m.padding)
        elif isinstance(m, nn.Dropout | nn.Identity):
            self.alias[node.name] = self.src(x)
        elif isinstance(m, nn.Flatten):
            self.emit(node, "flatten", [x], start_dim=m.start_dim)
        else:
            raise QKDError(f"module '{node.target}' ({type(m).__name__}) is not supported by the integer engine")

    def function(self, node: fx.Node) -> None:
        f, args = node.target, node.args
        if f in (operator.add, torch.add):
            self.emit(node, "add", list(args[:2]))
        elif f in (F.relu, torch.relu):
            self.emit(node, "relu", [args[0]])
        elif f is torch.flatten:
            self.emit(node, "flatten", [args[0]], start_dim=_const_arg(node, 1, "start_dim", 0))
        elif f is F.pad:
            self.emit(node, "pad", [args[0]], pad=list(_const_arg(node, 1, "pad", ())))
        elif f is operator.getitem:
            self.emit(node, "slice", [args[0]], index=_slice_spec(args[1]))
        elif f is F.adaptive_avg_pool2d and _const_arg(node, 1, "output_size", None) in (1, (1, 1)):
            self.emit(node, "mean_hw", [args[0]])
        else:
            raise QKDError(f"function {getattr(f, '__name__', f)} is not supported by the integer engine")

    def method(self, node: fx.Node) -> None:
        if node.target == "flatten":
            self.emit(node, "flatten", [node.args[0]], start_dim=_const_arg(node, 1, "start_dim", 0))
        else:
            raise QKDError(f"tensor method .{node.target}() is not supported by the integer engine")


def _trace(model: nn.Module) -> _Builder:
    """The traced program of a quantized model (in eval mode), its layers' float64 requantization still pending."""
    model = model.eval()
    try:
        graph = _Tracer().trace(model)
    except Exception as e:
        raise QKDError(f"cannot trace the model for integer export: {str(e).splitlines()[0]}") from None
    b = _Builder(model)
    b.users = {n.name: len(n.users) for n in graph.nodes}
    handlers = {"call_module": b.module, "call_function": b.function, "call_method": b.method}
    for node in graph.nodes:
        if node.op == "placeholder":
            b.ops.append({"name": node.name, "op": "input", "in": []})
        elif node.op == "output":
            b.emit(node, "output", [node.args[0]])
        elif node.op in handlers:
            handlers[node.op](node)
    if not b.pending:
        raise QKDError("the model has no quantized layers; export the student of a quantized run")
    return b


def to_real_program(model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """The same ops as :func:`to_int_program`, each layer's tensors still real: integer ``weight`` codes,
    float64 ``bias`` and ``scale[_<term>]`` (see ``TERMS``) with BatchNorm folded in. Between layers the
    values are real numbers; the ONNX integer export computes them in float64."""
    b = _trace(model)
    return b.ops, {f"{name}.{k}": v for name, (_, t) in b.pending.items() for k, v in t.items()}


def to_int_program(model: nn.Module) -> tuple[list[dict[str, Any]], dict[str, Tensor]]:
    """Trace a quantized model (in eval mode) into integer ops and tensors named ``<op>.<field>``."""
    b = _trace(model)
    tensors = {f"{name}.{k}": v for name, (op, t) in b.pending.items() for k, v in _finish_layer(op, t).items()}
    return b.ops, tensors
