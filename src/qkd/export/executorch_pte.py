"""ExecuTorch export: a quantized student as a ``.pte`` program lowered to the XNNPACK backend.

The learned grids go in as they are (no calibration): every quantized Conv/Linear becomes the reference
representation XNNPACK's partitioner recognises (what PT2E's ``convert_pt2e`` writes), with
``quantized_decomposed`` ops:

- its input: ``hardtanh(lo, hi) -> quantize_per_tensor -> dequantize_per_tensor`` on the input grid, int8 with an
  integer zero point (an unsigned 4-bit LSQ grid 0..15 is int8 codes -128..-113, zero point -128). The hardtanh
  is the grid's clamp: XNNPACK stores every int8 code whatever ``quant_max`` says, and fuses a hardtanh (or a ReLU
  merged into it) into the convolution before;
- its weight: int8 codes (the b-bit codes as they are) ``-> dequantize_per_channel`` (output channels, zero point
  0), an inference BatchNorm after a Conv folded into the per-channel scale and a bias
  (:func:`qkd.export.grid.fold_batchnorm`, as the QDQ ONNX export folds it).

XNNPACK runs a convolution in int8 only where its output goes (through a ReLU or hardtanh) to a quantizer alone:
it has no int8 convolution with a float output. A layer whose output stays float in the fake-quant model (it
feeds a residual sum, the pooling, the logits) therefore runs in float32, its weight stored as float32 (the
grid's values, exact), and so does one whose grid has no integer zero point (an interval grid whose lower bound
is not a whole number of steps). Both are exact; the export says which layers they are in one line and in the
file's ``not_int8`` field, and lists in ``portable_ops`` any op left to ExecuTorch's portable kernels.
Int8 layers requantize in XNNPACK's own rounding (an int32 bias, a float32 multiplier), so an activation code
near a rounding boundary can land one step off, as in onnxruntime's fused QLinearConv.

The qkd contract (:mod:`qkd.export.contract`) travels inside the program as the constant method
``qkd_contract`` (its JSON as uint8): one file, nothing beside it to lose or mix up.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.export.contract import first_line, write_export
from qkd.export.grid import Grid, activation_grid, check_quantized, float_weight, fold_batchnorm, grid
from qkd.quant import QConv2d, QLinear, Quantizer

log = logging.getLogger("qkd")

CONTRACT_METHOD = "qkd_contract"
PTE_MAGIC = b"ET12"  # bytes 4..8 of every ExecuTorch program (its flatbuffer file identifier)
INSTALL = "pip install 'qkd-distill[executorch]'"
_PER_CHANNEL_AXIS = 0


def require_executorch() -> None:
    """The one-line refusal where ExecuTorch is not installed (or cannot be imported)."""
    try:
        import executorch.exir  # noqa: F401
        import executorch.runtime  # noqa: F401
    except ImportError as e:
        raise QKDError(f"the executorch format needs ExecuTorch ({first_line(e)}): {INSTALL}") from None


def _qd() -> Any:
    """The ``quantized_decomposed`` operator namespace (registered by torch.ao's decomposed ops)."""
    import torch.ao.quantization.fx._decomposed  # noqa: F401

    return torch.ops.quantized_decomposed


# ----- one quantized layer in the reference representation -------------------------------------------------------
class _InputGrid:
    """An input grid as int8 quantize/dequantize parameters: codes ``c`` (``qn..qp``) stored as ``c + m + zp`` with
    ``m = offset / scale`` a whole number; ``shift`` holds the offset where it is not one (then the grid is applied
    around it in float32: ``x - offset`` quantized, ``+ offset`` after)."""

    def __init__(self, g: Grid) -> None:
        s, o = float(g.scale), float(g.offset)
        self.scale, self.lo, self.hi = s, o + g.qn * s, o + g.qp * s
        m = round(o / s)
        self.integer = o == m * s
        if not self.integer:
            m = 0
        self.shift = 0.0 if self.integer else o
        lo, hi = g.qn + m, g.qp + m  # the stored codes before the zero point
        self.zero_point = 0 if -128 <= lo and hi <= 127 else -128 - lo
        self.qmin, self.qmax = lo + self.zero_point, hi + self.zero_point
        if not (-128 <= self.zero_point <= 127 and self.qmax <= 127):
            raise QKDError(f"input grid of '{g.name}' (codes {g.qn}..{g.qp}, offset {o:g}) fits no int8 zero point; "
                           "export it as onnx or int")  # fmt: skip

    def __call__(self, x: Tensor) -> Tensor:
        qd = _qd()
        x = F.hardtanh(x, self.lo, self.hi)
        if self.shift:
            x = x - self.shift
        args = (self.scale, self.zero_point, self.qmin, self.qmax, torch.int8)
        x = qd.dequantize_per_tensor.default(qd.quantize_per_tensor.default(x, *args), *args)
        return x + self.shift if self.shift else x


class _QDQLayer(nn.Module):
    """A quantized Conv2d/Linear as XNNPACK's partitioner reads it: input Q/DQ, weight codes with per-channel scales
    (int8 -> DQ, or their float32 values where the layer runs in float), float32 bias."""

    def __init__(self, name: str, layer: QConv2d | QLinear) -> None:
        super().__init__()
        self.name, self.reasons = name, []
        self.conv = (
            None
            if isinstance(layer, QLinear)
            else dict(stride=layer.stride, padding=layer.padding, dilation=layer.dilation, groups=layer.groups)
        )
        if self.conv is not None and layer.padding_mode != "zeros":
            raise QKDError(f"layer '{name}': padding_mode='{layer.padding_mode}' is not supported by the executorch "
                           "format")  # fmt: skip
        self.input = (
            _InputGrid(activation_grid(f"{name}.act_quant", layer.act_quant)) if layer.act_quant.active else None
        )
        if self.input is not None and not self.input.integer:
            self.reasons.append("input grid offset not a whole number of steps")
        self.codes, self.scale = self._weight(layer)
        out = self.codes.shape[0]
        self.bias = layer.bias.detach().double().numpy() if layer.bias is not None else np.zeros(out)
        self.int8 = not self.reasons

    def _weight(self, layer: nn.Module) -> tuple[np.ndarray, np.ndarray]:
        """The weight as ``codes * scale`` per output channel: the grid's integer codes (shifted by the offset where
        that is a whole number of steps), else its float values with scale 1."""
        w = float_weight(layer).detach()
        if not layer.weight_quant.active:
            self.reasons.append("weights not quantized")
            return w.double().numpy(), np.ones(w.shape[0])
        g = grid(f"{self.name}.weight_quant", layer.weight_quant)
        codes = g.codes(w)
        scale, offset = (t.expand(w.shape[0]) if g.per_channel else t.reshape(1).expand(w.shape[0])
                         for t in (g.scale, g.offset))  # fmt: skip
        m = torch.round(offset / scale)
        if not torch.equal(m * scale, offset):
            self.reasons.append("weight grid offset not a whole number of steps")
            return g.values(codes).numpy(), np.ones(w.shape[0])
        return (codes + m.reshape(-1, *[1] * (w.dim() - 1))).numpy(), scale.numpy()

    def fold(self, bn: nn.BatchNorm2d) -> None:
        """Fold the inference BatchNorm that alone reads this Conv's output into its weights and bias."""
        n = self.codes.shape[0]
        defaults = (np.ones(n), np.zeros(n), None, None)  # an affine=False BatchNorm: gamma 1, beta 0
        stats = (bn.weight, bn.bias, bn.running_mean, bn.running_var)
        bn_params = tuple(t.detach().double().numpy() if t is not None else d for t, d in zip(stats, defaults))
        self.codes, self.scale, self.bias = fold_batchnorm(self.codes, self.scale, self.bias, bn_params, bn.eps)

    def finalize(self, int8: bool) -> None:
        """The tensors the program holds: int8 codes and their scales (``int8``), or the float32 weight."""
        for key in ("w_codes", "w_scale", "w_zero", "w_float", "b"):
            self._buffers.pop(key, None)
        self.int8 = int8 and bool(np.all((self.codes >= -128) & (self.codes <= 127)))
        if int8 and not self.int8:
            self.reasons.append("codes negated by the BatchNorm fold leave int8")
        if self.int8:
            self.register_buffer("w_codes", torch.from_numpy(self.codes).to(torch.int8))
            self.register_buffer("w_scale", torch.from_numpy(self.scale).float())
            self.register_buffer("w_zero", torch.zeros(len(self.scale), dtype=torch.int64))
        else:
            shape = (-1, *[1] * (self.codes.ndim - 1))
            self.register_buffer("w_float", torch.from_numpy(self.codes * self.scale.reshape(shape)).float())
        self.register_buffer("b", torch.from_numpy(self.bias).float())

    def forward(self, x: Tensor) -> Tensor:
        if self.input is not None:
            x = self.input(x)
        if self.int8:
            w = _qd().dequantize_per_channel.default(self.w_codes, self.w_scale, self.w_zero, _PER_CHANNEL_AXIS,
                                                     -128, 127, torch.int8)  # fmt: skip
        else:
            w = self.w_float
        return F.linear(x, w, self.b) if self.conv is None else F.conv2d(x, w, self.b, **self.conv)


# ----- the module graph: layers swapped, BatchNorm folded ---------------------------------------------------------
class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, QConv2d | QLinear | Quantizer) or super().is_leaf_module(m, qualname)


def _swap_and_fold(model: nn.Module) -> tuple[fx.GraphModule, dict[str, _QDQLayer]]:
    """``model`` traced, each quantized Conv/Linear replaced by a :class:`_QDQLayer` and each BatchNorm that alone
    reads a Conv folded into it; any other active quantizer is refused."""
    try:
        gm = fx.GraphModule(model, _Tracer().trace(model))
    except Exception as e:
        raise QKDError(f"cannot trace the model for the executorch format: {first_line(e)}") from None
    layers: dict[str, _QDQLayer] = {}
    calls = Counter(n.target for n in gm.graph.nodes if n.op == "call_module")
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        m = gm.get_submodule(node.target)
        if isinstance(m, QConv2d | QLinear):
            layers[node.target] = _QDQLayer(node.target, m)
            gm.set_submodule(node.target, layers[node.target])
        elif isinstance(m, Quantizer) and m.active:
            raise QKDError(f"quantizer '{node.target}' is not the input or weight quantizer of a swapped Conv2d/Linear "
                           "(a layer quantized in place?): the executorch format takes QConv2d/QLinear layers; "
                           "export it as onnx or int")  # fmt: skip
        elif isinstance(m, nn.BatchNorm2d) and _folds_into(gm, node, layers) and calls[node.args[0].target] == 1:
            layers[node.args[0].target].fold(m)
            node.replace_all_uses_with(node.args[0])
            gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()  # the folded BatchNorms: their statistics stay out of the program
    return gm, layers


def _folds_into(gm: fx.GraphModule, bn: fx.Node, layers: dict[str, _QDQLayer]) -> bool:
    """Whether BatchNorm node ``bn`` (in eval mode, with running statistics) alone reads a swapped Conv."""
    x = bn.args[0] if bn.args else None
    m = gm.get_submodule(bn.target)
    reads_conv = isinstance(x, fx.Node) and x.op == "call_module" and x.target in layers and len(x.users) == 1
    return reads_conv and layers[x.target].conv is not None and m.running_mean is not None and m.running_var is not None


# ----- the exported graph: which layers XNNPACK runs in int8 ------------------------------------------------------
def _aten(name: str) -> Any:
    op, overload = name.split(".")
    return getattr(getattr(torch.ops.aten, op), overload)


def _merge_relu_into_clamp(graph: fx.Graph) -> None:
    """``relu`` (or ReLU6's hardtanh) read only by a quantizer's clamp becomes part of that clamp: one hardtanh,
    which XNNPACK fuses into the layer before (a ReLU followed by a clamp is not a pattern it fuses)."""
    hardtanh, clamps = _aten("hardtanh.default"), (_aten("hardtanh.default"), _aten("hardtanh_.default"))
    relus = (_aten("relu.default"), _aten("relu_.default"))  # in place: nn.ReLU(inplace=True), kept by torch.export
    for node in list(graph.nodes):
        if node.target != hardtanh or not isinstance(node.args[0], fx.Node):
            continue
        act = node.args[0]
        if len(act.users) != 1 or act.target not in (*relus, *clamps):
            continue
        if not isinstance(act.args[0], fx.Node) or len(act.args[0].users) != 1:  # an in-place op's input read elsewhere
            continue
        lo, hi = (node.args[1:3] + (-1.0, 1.0)[len(node.args) - 1 :])[:2]
        a_lo, a_hi = (0.0, float("inf")) if act.target in relus else act.args[1:3]
        if max(lo, a_lo) > min(hi, a_hi):  # disjoint ranges: the two clamps give a constant, not one clamp
            continue
        node.args = (act.args[0], max(lo, a_lo), min(hi, a_hi))
        graph.erase_node(act)


def _is(node: Any, name: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and "quantized_decomposed" in str(node.target) \
        and name in str(node.target)  # fmt: skip


def _int8_pattern(node: fx.Node) -> bool:
    """A convolution/linear XNNPACK runs in int8: a dequantized input (or a zero pad of one), dequantized weights,
    and an output read, through a ReLU/hardtanh alone or directly, by a quantize alone."""
    x = node.args[0]
    if isinstance(x, fx.Node) and x.target == _aten("constant_pad_nd.default"):
        x = x.args[0]
    if not (_is(x, "dequantize_per_tensor") and _is(node.args[1], "dequantize_per_channel")):
        return False
    out = node
    fused = ("relu.default", "relu_.default", "hardtanh.default", "hardtanh_.default")
    if len(out.users) == 1 and next(iter(out.users)).target in [_aten(n) for n in fused]:
        out = next(iter(out.users))
    return len(out.users) == 1 and _is(next(iter(out.users)), "quantize_per_tensor")


def _layer_of(node: fx.Node) -> str | None:
    stack = node.meta.get("nn_module_stack") or {}
    return list(stack.values())[-1][0] if stack else None


def _export(gm: fx.GraphModule, example: Tensor) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(gm, (example,), strict=False)
    _merge_relu_into_clamp(ep.graph)
    ep.graph.eliminate_dead_code()
    ep.graph_module.recompile()
    return ep


def _exported_program(model: nn.Module, example: Tensor) -> tuple[Any, dict[str, _QDQLayer]]:
    """``model`` exported (torch.export) in the reference representation; a layer XNNPACK cannot run in int8 (found
    in a first export) gets float32 weights."""
    gm, layers = _swap_and_fold(model)
    for layer in layers.values():
        layer.finalize(layer.int8)
    ep = _export(gm, example)
    gemms = (_aten("convolution.default"), _aten("conv2d.default"), _aten("linear.default"))
    int8 = {_layer_of(n) for n in ep.graph.nodes if n.target in gemms and _int8_pattern(n)}
    changed = False
    for name, layer in layers.items():
        if layer.int8 and name not in int8:
            layer.reasons.append("its output is not quantized alone by the next layer")
            layer.finalize(False)
            changed = True
    return (_export(gm, example) if changed else ep), layers


# ----- lowering, the file, the notice ------------------------------------------------------------------------------
def _portable_ops(lowered: Any) -> list[str]:
    """The ops of the lowered program not delegated to XNNPACK (left to ExecuTorch's portable kernels)."""
    skip = {"executorch_call_delegate", "getitem"}
    gm = lowered.exported_program().graph_module
    names = [str(getattr(n.target, "__name__", n.target)) for n in gm.graph.nodes if n.op == "call_function"]
    return sorted({n.split("::")[-1] for n in names if n not in skip})


def export_executorch(model: nn.Module, example: Tensor, path: str | Path, contract: dict | None = None) -> dict:
    """Write ``model`` (a quantized student) as an ExecuTorch program lowered to XNNPACK at ``path``; return what
    was written into its contract (``not_int8``: the layers running in float32 and why; ``portable_ops``;
    ``program_batch``).

    ``example``: one input batch; the program takes batches of its size (fixed: ExecuTorch 1.5 sized a bounded
    dynamic batch wrongly), and :func:`load_pte`'s runner pads and splits any other. The model is left untouched (a
    CPU copy is exported)."""
    require_executorch()
    from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
    from executorch.exir import to_edge_transform_and_lower

    check_quantized(model)
    clone = copy.deepcopy(model).float().cpu().eval()
    # standard strides: torch.export records the example's dim order (a loader's channels-last batch of one channel
    # passes is_contiguous(), and the program then refused every standard input)
    example = example.detach().float().cpu().clone(memory_format=torch.contiguous_format)
    with torch.no_grad(), _quiet():
        ep, layers = _exported_program(clone, example)
        found = {"not_int8": {n: "; ".join(layer.reasons) for n, layer in layers.items() if not layer.int8},
                 "int8_layers": sum(layer.int8 for layer in layers.values()), "layers": len(layers),
                 "program_batch": len(example)}  # fmt: skip
        lowered = to_edge_transform_and_lower(
            ep,
            partitioner=[XnnpackPartitioner()],
            constant_methods={CONTRACT_METHOD: torch.zeros(1, dtype=torch.uint8)},
        )
        found["portable_ops"] = _portable_ops(lowered)
        payload = json.dumps({**(contract or {}), **found}).encode()
        # the contract names what the lowering left undelegated, known only now: it replaces the placeholder (the
        # constant methods are kept as given until to_executorch writes them; lowering again would double the time)
        lowered._config_methods = {CONTRACT_METHOD: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}
        buffer = lowered.to_executorch().buffer
    write_export(path, buffer)
    _notice(path, found)
    return found


def _notice(path: str | Path, found: dict) -> None:
    """The one line saying which layers run in float32 and which ops XNNPACK does not run (nothing when none)."""
    if not found["not_int8"] and not found["portable_ops"]:
        return
    floats = ", ".join(f"{n} ({why})" for n, why in found["not_int8"].items())
    portable = f"; ops on ExecuTorch's portable kernels: {', '.join(found['portable_ops'])}" if found[
        "portable_ops"] else ""  # fmt: skip
    log.warning("%s: %d of %d layers run in float32 (exact, not int8): %s%s", path,
                len(found["not_int8"]), found["layers"], floats or "none", portable)  # fmt: skip


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """ExecuTorch's and torch.export's own logging below warnings while exporting."""
    loggers = [logging.getLogger(n) for n in ("executorch", "torch._export", "torch.export", "root")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


# ----- reading a .pte back --------------------------------------------------------------------------------------
def is_pte(path: Path) -> bool:
    """An ExecuTorch program: its flatbuffer identifier at bytes 4..8."""
    with open(path, "rb") as f:
        return f.read(8)[4:8] == PTE_MAGIC


def load_pte(path: str | Path) -> tuple[dict, Callable[[Tensor], Tensor]]:
    """An exported .pte's contract and a callable running its ``forward`` with ExecuTorch (any batch: split and
    padded to the program's); a damaged file or a program qkd did not write is a one-line :class:`QKDError`."""
    require_executorch()
    from executorch.runtime import Runtime

    path = Path(path)
    try:
        program = Runtime.get().load_program(path)
    except Exception as e:
        raise QKDError(f"ExecuTorch cannot load {path} (damaged, or not an ExecuTorch program): {first_line(e)}") \
            from None  # fmt: skip
    if CONTRACT_METHOD not in program.method_names:
        raise QKDError(f"{path} is an ExecuTorch program without qkd's contract (not exported by qkd): export it "
                       "with qkd export --format executorch")  # fmt: skip
    try:
        raw = program.load_method(CONTRACT_METHOD).execute([])[0]
        contract = json.loads(bytes(raw.numpy().astype(np.uint8)).decode())
        method = program.load_method("forward")
    except Exception as e:
        raise QKDError(f"{path}: its qkd contract or program is damaged ({first_line(e)}); export it again") from None
    return contract, _runner(method, int(contract.get("program_batch", 1)))


def _runner(method: Any, batch: int) -> Callable[[Tensor], Tensor]:
    """``f(x) -> logits`` for any number of images: chunks of the program's batch, the last one padded."""

    def run(x: Tensor) -> Tensor:
        outs = []
        for chunk in torch.as_tensor(x, dtype=torch.float32).split(batch):
            padded = F.pad(chunk, (0, 0) * (chunk.dim() - 1) + (0, batch - len(chunk)))
            outs.append(method.execute([padded.clone(memory_format=torch.contiguous_format)])[0][: len(chunk)])
        return torch.cat(outs)

    return run
