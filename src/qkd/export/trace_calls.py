"""The calls of a traced graph (functions and tensor methods) as ops of the integer program.

:class:`CallTranslator` is the part of :class:`qkd.export.trace.Builder` that reads ``call_function`` and
``call_method`` nodes: activations, arithmetic, pads, slicing, chunk/split, concatenation, reshapes and
permutations, means and pooling. Anything else is refused with a one-line :class:`~qkd.errors.QKDError`
naming the function and the graph node.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.export.fixedpoint import fixed_multiplier

# what a refusal of an op between layers adds: the QDQ format runs such ops in float
QDQ_HINT = "; the onnx (QDQ) format keeps such ops float between its quantized layers"
_ACT_FUNCTIONS = {F.relu: "relu", torch.relu: "relu", F.relu6: "relu6", F.hardswish: "hardswish",
                  F.hardsigmoid: "hardsigmoid", F.silu: "silu", torch.sigmoid: "sigmoid",
                  F.sigmoid: "sigmoid"}  # fmt: skip
_ACT_METHODS = {"relu": "relu", "relu_": "relu", "sigmoid": "sigmoid", "sigmoid_": "sigmoid"}
IDENTITY_METHODS = ("contiguous", "clone", "detach")
# the pooling functions' arguments after the input: (name, default)
_POOLS = {
    F.adaptive_avg_pool2d: (("output_size", None),),
    F.avg_pool2d: (("kernel_size", None), ("stride", None), ("padding", 0), ("ceil_mode", False),
                   ("count_include_pad", True), ("divisor_override", None)),
    F.max_pool2d: (("kernel_size", None), ("stride", None), ("padding", 0), ("dilation", 1), ("ceil_mode", False),
                   ("return_indices", False)),
}  # fmt: skip
_POOLS[torch.max_pool2d] = _POOLS[F.max_pool2d]
OTHER_CONVS = (F.conv1d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d)
_ARITHMETIC = {operator.add: "add", operator.iadd: "add", torch.add: "add", operator.mul: "mul", operator.imul: "mul",
               torch.mul: "mul", operator.sub: "sub", operator.isub: "sub", torch.sub: "sub", operator.truediv: "div",
               operator.itruediv: "div", torch.div: "div"}  # fmt: skip
# shape arithmetic: evaluated on the example, never part of the program
_SHAPE_OPERATORS = (operator.getitem, operator.floordiv, operator.mul, operator.add, operator.sub, operator.truediv,
                    operator.mod, len, int, operator.eq, operator.ne, operator.lt, operator.le, operator.gt,
                    operator.ge, torch._assert)  # fmt: skip
_SHAPE_METHODS = ("size", "dim")


def pair(v: Any) -> list[int]:
    """A size given as one int or a pair, as a pair."""
    return [int(x) for x in v] if isinstance(v, list | tuple) else [int(v), int(v)]


def _slice_spec(index: Any) -> list:
    items = index if isinstance(index, tuple) else (index,)
    spec = []
    for it in items:
        if isinstance(it, slice):
            if any(isinstance(v, fx.Node) for v in (it.start, it.stop, it.step)):
                raise QKDError(f"slicing with computed bounds {index!r} is not supported by the integer formats")
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


def describe_node(node: fx.Node) -> str:
    """The node and the module whose forward made it, for error messages."""
    stack = node.meta.get("nn_module_stack") or {}
    where = next(reversed(stack.values()))[0] if stack else ""
    return f"node '{node.name}' in {f'module {where!r}' if where else 'the model forward'}"


def target_name(f: Any) -> str:
    return getattr(f, "__name__", str(f))


def keeps_zero(node: fx.Node) -> bool:
    """An op between an in-place layer's quantizer and its convolution that maps quantized values to
    quantized values and adds only zeros: a zero pad, slicing, a contiguous copy."""
    if node.op == "call_method":
        return node.target in IDENTITY_METHODS
    if node.op != "call_function":
        return False
    if node.target is F.pad:
        mode = node.args[2] if len(node.args) > 2 else node.kwargs.get("mode", "constant")
        value = node.args[3] if len(node.args) > 3 else node.kwargs.get("value", None)
        return mode == "constant" and value in (None, 0, 0.0)
    return node.target is operator.getitem and not isinstance(node.args[1], int)


def is_shape_arithmetic(node: fx.Node, shape_nodes: set[str]) -> bool:
    """``x.size()``, ``x.shape``, ``x.dim()`` and integer arithmetic on them (nothing else reads a tensor)."""
    if node.op == "call_method":
        return node.target in _SHAPE_METHODS
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return node.args[1] in ("shape", "ndim")
    nodes = node.all_input_nodes
    return node.target in _SHAPE_OPERATORS and bool(nodes) and all(a.name in shape_nodes for a in nodes)


class CallTranslator:
    """``call_function`` / ``call_method`` nodes -> ops; mixed into :class:`qkd.export.trace.Builder`, whose
    ``emit``, ``same``, ``arg``, ``const``, ``out_shape``, ``rank``, ``spatial`` and ``in_place_layer`` it uses."""

    splits: dict
    shape_nodes: set

    def function(self, node: fx.Node) -> None:
        f, args = node.target, node.args
        if f in _ARITHMETIC:
            self.arithmetic(node, _ARITHMETIC[f], args[0], args[1])
        elif f in _ACT_FUNCTIONS:
            self.emit(node, _ACT_FUNCTIONS[f], [args[0]])
        elif f in (F.conv2d, F.linear):
            self.in_place_layer(node)
        elif f in OTHER_CONVS:
            raise QKDError(f"{describe_node(node)}: {f.__name__} is not supported by the integer formats (Conv2d and "
                           "Linear are)")  # fmt: skip
        elif f is F.dropout or target_name(f) == "stochastic_depth":  # torchvision.ops.stochastic_depth
            if self.arg(node, 2 if f is F.dropout else 3, "training", True):
                raise QKDError(f"{describe_node(node)}: {target_name(f)} with training=True in eval mode")
            self.same(node, args[0])
        elif f in _POOLS:
            self.pool_function(node)
        elif not self.shape_function(node):
            raise QKDError(f"function {target_name(f)} ({describe_node(node)}) is not supported by the integer formats"
                           f"{QDQ_HINT}")  # fmt: skip

    def pool_function(self, node: fx.Node) -> None:
        """``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, ``F.max_pool2d``."""
        f, x = node.target, node.args[0]
        if f is F.adaptive_avg_pool2d:
            self.adaptive_avgpool(node, x, self.arg(node, 1, "output_size"))
            return
        names = _POOLS[f]
        args = [self.arg(node, i, k, d) for i, (k, d) in enumerate(names, start=1)]
        (self.avgpool if f is F.avg_pool2d else self.maxpool)(node, x, *args)

    def shape_function(self, node: fx.Node) -> bool:
        """A function that moves values (flatten, pad, indexing, cat, chunk/split, transpose, permute, reshape) or
        averages them (mean); False: not one of them."""
        f, args = node.target, node.args
        if f is torch.flatten:
            self.flatten(node, args[0], self.arg(node, 1, "start_dim", 0), self.arg(node, 2, "end_dim", -1))
        elif f is F.pad:
            self.pad(node, args[0], self.arg(node, 1, "pad"), self.arg(node, 2, "mode", "constant"),
                     self.arg(node, 3, "value", None))  # fmt: skip
        elif f is operator.getitem:
            self.getitem(node, args[0], args[1])
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
        else:
            return False
        return True

    def method(self, node: fx.Node) -> None:
        name, x = node.target, node.args[0]
        if name in ("flatten",):
            self.flatten(node, x, self.arg(node, 1, "start_dim", 0), self.arg(node, 2, "end_dim", -1))
        elif name in _ACT_METHODS:
            self.emit(node, _ACT_METHODS[name], [x])
        elif name in IDENTITY_METHODS:
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
            raise QKDError(f"tensor method .{name}() ({describe_node(node)}) is not supported by the integer formats"
                           f"{QDQ_HINT}")  # fmt: skip

    # ----- the ops ----------------------------------------------------------------------------------
    def arithmetic(self, node: fx.Node, kind: str, a: Any, b: Any) -> None:
        """``add``/``mul`` of two tensors, or a tensor plus, minus, times or divided by a constant."""
        tensors = [isinstance(v, fx.Node) and v.name not in self.shape_nodes for v in (a, b)]
        if all(tensors) and kind in ("add", "mul"):
            self.emit(node, kind, [a, b])
            return
        if all(tensors) or not any(tensors):
            raise QKDError(f"{describe_node(node)}: {kind} of {'two tensors' if all(tensors) else 'constants'} is not "
                           "supported by the integer formats")  # fmt: skip
        x, c = (a, self.const(b)) if tensors[0] else (b, self.const(a))
        if not isinstance(c, int | float) or (kind in ("sub", "div") and not tensors[0]) or kind == "div" and not c:
            raise QKDError(
                f"{describe_node(node)}: {kind} of a tensor and {c!r} is not supported by the integer formats"
            )
        if kind in ("add", "sub"):
            self.emit(node, "add_const", [x], value=float(c if kind == "add" else -c))
        else:
            factor = float(c if kind == "mul" else 1 / c)
            mult, shift = fixed_multiplier(torch.tensor([factor], dtype=torch.float64))
            self.emit(node, "scale", [x], factor=factor, mult=int(mult), shift=int(shift))

    def getitem(self, node: fx.Node, x: fx.Node, index: Any) -> None:
        if isinstance(x, fx.Node) and x.name in self.splits:
            src, kind, arg, dim = self.splits[x.name]
            if not isinstance(index, int):
                raise QKDError(f"{describe_node(node)}: {kind} results indexed by {index!r}")
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
            raise QKDError(f"{describe_node(node)}: F.pad mode={mode!r} value={value!r}; the integer formats pad with "
                           "zeros")  # fmt: skip
        self.emit(node, "pad", [x], pad=[int(p) for p in pad])

    def transpose(self, node: fx.Node, x: fx.Node, d0: int, d1: int) -> None:
        perm = list(range(self.rank(x)))
        perm[d0], perm[d1] = perm[d1], perm[d0]
        self.emit(node, "permute", [x], perm=perm)

    def mean(self, node: fx.Node, x: fx.Node, dims: Any, keepdim: bool) -> None:
        dims = {dims} if isinstance(dims, int) else set(dims or ())
        if dims not in ({2, 3}, {-1, -2}) or (dims == {-1, -2} and self.rank(x) != 4):
            raise QKDError(f"{describe_node(node)}: mean over dims {sorted(dims)}; the integer formats averages over "
                           "height and width (dims 2, 3)")  # fmt: skip
        self.emit(node, "mean_hw", [x], keepdim=bool(keepdim))

    def adaptive_avgpool(self, node: fx.Node, x: fx.Node, size: Any) -> None:
        size = pair(size) if not isinstance(size, list | tuple) or None not in size else None
        if size is None:
            raise QKDError(f"{describe_node(node)}: adaptive average pooling to a size with None")
        if size == [1, 1]:
            self.emit(node, "mean_hw", [x], keepdim=True)
        else:
            self.emit(node, "adaptive_avgpool", [x], output_size=size, **self.spatial(x))

    def avgpool(self, node: fx.Node, x: fx.Node, kernel: Any, stride: Any, padding: Any, ceil_mode: bool,
                count_include_pad: bool, divisor_override: Any) -> None:  # fmt: skip
        if divisor_override:
            raise QKDError(f"{describe_node(node)}: average pooling with divisor_override")
        self.emit(node, "avgpool", [x], kernel=pair(kernel), stride=pair(stride or kernel), padding=pair(padding),
                  ceil_mode=bool(ceil_mode), count_include_pad=bool(count_include_pad), **self.spatial(x))  # fmt: skip

    def maxpool(self, node: fx.Node, x: fx.Node, kernel: Any, stride: Any, padding: Any, dilation: Any,
                ceil_mode: bool, return_indices: bool) -> None:  # fmt: skip
        if return_indices:
            raise QKDError(f"{describe_node(node)}: max pooling with return_indices")
        self.emit(node, "maxpool", [x], kernel=pair(kernel), stride=pair(stride or kernel), padding=pair(padding),
                  dilation=pair(dilation), ceil_mode=bool(ceil_mode))  # fmt: skip
