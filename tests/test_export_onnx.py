"""ONNX export: explicit QDQ nodes and integer weights, run by onnxruntime, agreeing with fake quantization."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

import onnx  # noqa: E402
from onnx import TensorProto  # noqa: E402

from helpers import UserNet  # noqa: E402
from qkd.errors import QKDError  # noqa: E402
from qkd.export import export_onnx, run_onnx  # noqa: E402
from qkd.export.api import code_storage  # noqa: E402
from qkd.models import create_model  # noqa: E402
from qkd.quant import IntervalQuantizer, QConv2d, QLinear, QuantConfig, calibrate, quantize_model, set_quantization  # noqa: E402

# (bits, method, per_channel): 4-bit codes, 2-bit ones (in 8-bit types, clipped), 8-bit, interval bounds.
CASES = [(4, "lsq", True), (2, "lsq", False), (8, "lsq", True), (4, "interval", True)]
MODELS = {"tiny_cnn": (1, 8), "residual_dw": (3, 8)}  # input channels, image size
FOUR_BIT = {TensorProto.INT4, TensorProto.UINT4}
EIGHT_BIT = {TensorProto.INT8, TensorProto.UINT8}


class ResidualDW(nn.Module):
    """A 3-channel CNN with a depthwise conv (ReLU6, as in MobileNetV2) and a residual add: grouped
    weights, a Clip before a 4-bit QuantizeLinear, and a join in the graph."""

    def __init__(self, width: int = 8, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, groups=width), nn.BatchNorm2d(width), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(width, width, 1, bias=False), nn.BatchNorm2d(width))
        self.fc = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = F.relu(x + self.pw(self.dw(x)))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _inputs(model_name: str, n: int, seed: int) -> torch.Tensor:
    channels, size = MODELS[model_name]
    return torch.randn(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


def _quantized(model_name: str, bits: int, method: str, per_channel: bool) -> nn.Module:
    """Quantize, calibrate and take a few SGD steps, so that steps and bounds are no longer their initial values."""
    torch.manual_seed(0)
    model = create_model("tiny_cnn", width=8) if model_name == "tiny_cnn" else ResidualDW()
    quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, method=method, per_channel=per_channel))
    calibrate(model, _inputs(model_name, 32, seed=1))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for step in range(3):
        x = _inputs(model_name, 32, seed=10 + step)
        loss = F.cross_entropy(model(x), torch.randint(0, 10, (32,)))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module", params=[(m, *c) for m in MODELS for c in CASES], ids=lambda p: "-".join(map(str, p)))
def exported(request, tmp_path_factory):
    model_name, bits, method, per_channel = request.param
    model = _quantized(model_name, bits, method, per_channel)
    path = export_onnx(model, _inputs(model_name, 2, seed=2), tmp_path_factory.mktemp("onnx") / "student.onnx")
    return model_name, model, path


def test_onnxruntime_agrees_with_pytorch(exported):
    model_name, model, path = exported
    x = _inputs(model_name, 64, seed=3)  # a batch size other than the example's: the batch axis is dynamic
    with torch.no_grad():
        expected = model(x).numpy()
    got = run_onnx(path, x.numpy())
    assert got.shape == expected.shape
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


def test_graph_is_explicit_qdq(exported):
    _, model, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    proto = onnx.load(str(path))
    ops = [n.op_type for n in proto.graph.node]
    active = sum(m.act_quant.bits is not None for m in model.modules() if isinstance(m, (QConv2d, QLinear)))
    assert ops.count("QuantizeLinear") == active  # one per activation quantizer; weights are quantized already
    assert ops.count("DequantizeLinear") == 2 * active
    assert all(n.domain in ("", "ai.onnx") for n in proto.graph.node)
    assert {o.domain: o.version for o in proto.opset_import}.get("", None) == 21
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"


def _expected_code_type(layer: nn.Module, four_bit_storage: bool = False) -> int:
    """8-bit types (4-bit ones up to 4 bits with ``four_bit_storage``); unsigned for interval codes (they count up
    from the lower bound)."""
    q = layer.weight_quant
    unsigned = isinstance(q, IntervalQuantizer)
    if q.bits <= 4 and four_bit_storage:
        return TensorProto.UINT4 if unsigned else TensorProto.INT4
    return TensorProto.UINT8 if unsigned else TensorProto.INT8


def test_weights_are_integer_initializers(exported):
    _, model, path = exported
    inits = onnx.load(str(path)).graph.initializer
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    # integer tensors of rank >= 2 are weight codes (zero points are scalars or one per channel)
    codes = sorted(
        (tuple(t.dims), t.data_type) for t in inits if t.data_type in FOUR_BIT | EIGHT_BIT and len(t.dims) > 1
    )
    expected = sorted((tuple(m.weight.shape), _expected_code_type(m)) for m in layers)
    assert codes == expected
    weight_shapes = {tuple(m.weight.shape) for m in layers}
    floats = [t for t in inits if t.data_type == TensorProto.FLOAT and tuple(t.dims) in weight_shapes]
    assert not floats, f"float weights left in the file: {[t.name for t in floats]}"


def _optimized_ops(path, tmp_path) -> list[str]:
    """The node types of the graph onnxruntime runs (all optimizations, as a deployment would), from the file it
    writes with ``optimized_model_filepath``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    with warnings.catch_warnings():
        ort.set_default_logger_severity(3)  # the "hardware specific optimizations" notice of a level-3 graph
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node]


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_onnxruntime_fuses_integer_convs(bits, tmp_path):
    """The file is the standard QDQ pattern (BN folded, integer zero points, 8-bit codes, a narrower range clipped
    on the codes between Q and DQ): onnxruntime turns every conv whose output goes only to a quantizer into
    QLinearConv. tiny_cnn has three conv-BN-ReLU: the first two feed a quantizer, the last one the float pooling
    (qkd quantizes layer inputs, not that output), so it stays a float conv. Before (BN between Conv and Q, a float
    Clip, INT4 codes) onnxruntime ran all three in float."""
    model = _quantized("tiny_cnn", bits, "lsq", True)
    path = export_onnx(model, _inputs("tiny_cnn", 2, seed=2), tmp_path / "m.onnx")
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 2
    assert ops.count("Conv") + ops.count("FusedConv") == 1
    assert "BatchNormalization" not in ops
    x = _inputs("tiny_cnn", 64, seed=3)
    with torch.no_grad():
        expected = model(x).numpy()
    exact, fused = run_onnx(path, x.numpy()), run_onnx(path, x.numpy(), fused=True)
    assert np.abs(exact - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    # integer kernels: the same grids, but an int32 bias and their own requantization, so a code may land one step
    # off near a rounding boundary (measured: at most 2% of the largest logit here, top-1 unchanged)
    assert (fused.argmax(1) == expected.argmax(1)).mean() >= 0.95
    assert np.abs(fused - expected).max() <= 0.05 * float(np.abs(expected).max())


@pytest.mark.parametrize("bits", [4, 2])
def test_relu6_before_a_narrower_grid_does_not_block_fusion(bits, tmp_path):
    """residual_dw's depthwise conv: BN, ReLU6, then the pointwise conv's quantizer, whose grid tops out below 6.
    The ReLU6 (a float Clip between Conv and QuantizeLinear) is then exported as ReLU, exact (the quantizer clamps
    at its top code anyway), and onnxruntime fuses that conv. The stem (read also by the residual add) and the
    pointwise conv (its output goes to the add) stay float: their outputs are not quantized."""
    model = _quantized("residual_dw", bits, "lsq", True)
    path = export_onnx(model, _inputs("residual_dw", 2, seed=2), tmp_path / "m.onnx")
    graph = onnx.load(str(path)).graph
    codes = {n.output[0] for n in graph.node if n.op_type == "QuantizeLinear"}
    assert all(n.input[0] in codes for n in graph.node if n.op_type == "Clip")  # Clips only on integer codes
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("QLinearConv") == 1
    assert ops.count("Conv") + ops.count("FusedConv") == 2
    x = _inputs("residual_dw", 64, seed=3)
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(run_onnx(path, x.numpy()) - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("bits", [4, 8, 2])
def test_unfusable_convs_run_on_integer_codes(bits, tmp_path, monkeypatch):
    """A conv whose output is not requantized (residual_dw: the stem, read also by the add, and the pointwise conv,
    whose output goes to the add) and the head's Gemm become MatMulInteger on the codes (im2col, int32, then one
    multiply by the scale product): no float conv left in what onnxruntime runs, the same numbers as the fake-quant
    model. The stem's input codes are signed (shifted to uint8). The channel threshold is lowered to reach these
    8-channel convs; before this rewrite the file had 2 float convs and a float Gemm."""
    import qkd.export.onnx_intconv as intconv

    monkeypatch.setattr(intconv, "MIN_CHANNELS", 1)
    model = _quantized("residual_dw", bits, "lsq", True)
    path = export_onnx(model, _inputs("residual_dw", 2, seed=2), tmp_path / "m.onnx", integer_matmul=True)
    ops = _optimized_ops(path, tmp_path)
    assert ops.count("MatMulInteger") == 3
    assert ops.count("QLinearConv") == 1
    assert ops.count("Conv") + ops.count("FusedConv") + ops.count("Gemm") == 0
    x = _inputs("residual_dw", 64, seed=3)
    with torch.no_grad():
        expected = model(x).numpy()
    for fused in (False, True):  # the integer form is no QDQ fusion: the same numbers either way (but QLinearConv's)
        got = run_onnx(path, x.numpy(), fused=fused)
        assert np.abs(got - expected).max() <= (0.05 if fused else 1e-4) * max(1.0, float(np.abs(expected).max()))


def test_wide_convs_run_on_integer_codes_when_asked(tmp_path):
    """``integer_matmul`` (off by default) with the default threshold: a 128-channel conv whose output goes to a
    residual add is rewritten, exact."""
    torch.manual_seed(0)

    class Wide(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 128, 3, padding=1), nn.Conv2d(128, 128, 3, padding=1, stride=2)
            self.skip = nn.Conv2d(128, 128, 1, stride=2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = F.relu(self.a(x))
            return F.relu(self.b(y) + self.skip(y)).mean((2, 3))

    model = quantize_model(Wide(), QuantConfig(weight_bits=4, act_bits=4, method="lsq", per_channel=True))
    x = torch.randn(4, 3, 9, 9)
    calibrate(model, x)
    model.eval()
    assert _optimized_ops(export_onnx(model, x[:1], tmp_path / "off.onnx"), tmp_path).count("MatMulInteger") == 0
    path = export_onnx(model, x[:1], tmp_path / "m.onnx", integer_matmul=True)
    assert _optimized_ops(path, tmp_path).count("MatMulInteger") == 2  # b and skip; a has 3 input channels
    with torch.no_grad():
        expected = model(x).numpy()
    assert np.abs(run_onnx(path, x.numpy()) - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))


@pytest.mark.parametrize("method", ["lsq", "interval"])
def test_four_bit_storage(method, tmp_path):
    """``four_bit_storage``: codes of 4 bits or fewer in INT4/UINT4 (half the weight bytes), same numbers."""
    model = _quantized("residual_dw", 4, method, True)
    path = export_onnx(model, _inputs("residual_dw", 2, seed=2), tmp_path / "m.onnx", four_bit_storage=True)
    inits = onnx.load(str(path)).graph.initializer
    codes = [(tuple(t.dims), t.data_type) for t in inits if t.data_type in FOUR_BIT | EIGHT_BIT and len(t.dims) > 1]
    layers = [m for m in model.modules() if isinstance(m, (QConv2d, QLinear))]
    # a BN folded with a negative factor negates its channel's codes: [-7, 8] no longer fits INT4
    assert {t for _, t in codes} & FOUR_BIT
    assert sorted(s for s, _ in codes) == sorted(tuple(m.weight.shape) for m in layers)
    x = _inputs("residual_dw", 16, seed=3)
    with torch.no_grad():
        assert np.abs(run_onnx(path, x.numpy()) - model(x).numpy()).max() <= 1e-4


def test_opset_below_21_stores_eight_bit_codes(tmp_path):
    model = _quantized("residual_dw", 4, "lsq", True)
    path = export_onnx(model, _inputs("residual_dw", 2, seed=2), tmp_path / "m.onnx", opset=17)
    types = {t.data_type for t in onnx.load(str(path)).graph.initializer}
    assert types & EIGHT_BIT and not types & FOUR_BIT
    assert "(opset 17 has no 4-bit types; export at opset 21 or later)" in code_storage(path)
    x = _inputs("residual_dw", 16, seed=3)
    with torch.no_grad():
        assert np.abs(run_onnx(path, x.numpy()) - model(x).numpy()).max() <= 1e-4


def test_code_storage_says_why_no_code_is_four_bit(tmp_path):
    """An 8-bit model asked for 4-bit storage: the line names the bits, not the opset."""
    model = _quantized("residual_dw", 8, "lsq", True)
    path = export_onnx(model, _inputs("residual_dw", 2, seed=2), tmp_path / "m.onnx", four_bit_storage=True)
    assert code_storage(path).endswith("8-bit types (no layer's weight codes fit 4 bits)")


def test_export_leaves_the_model_untouched(tmp_path):
    model = _quantized("tiny_cnn", 4, "lsq", True)
    x = _inputs("tiny_cnn", 8, seed=3)
    with torch.no_grad():
        before = model(x)
        export_onnx(model, x, tmp_path / "m.onnx")
        assert torch.equal(model(x), before)


def test_model_without_active_quantizer_is_refused(tmp_path):
    switched_off = _quantized("tiny_cnn", 4, "lsq", True)
    set_quantization(switched_off, False)
    for model in (create_model("tiny_cnn", width=8), switched_off):
        with pytest.raises(QKDError, match="has no quantized layers; export the student of a quantized run"):
            export_onnx(model, _inputs("tiny_cnn", 2, seed=0), tmp_path / "m.onnx")


def test_uncalibrated_model_is_refused(tmp_path):
    model = quantize_model(create_model("tiny_cnn", width=8), QuantConfig(weight_bits=4, act_bits=4)).eval()
    with pytest.raises(QKDError, match="never initialised"):
        export_onnx(model, _inputs("tiny_cnn", 2, seed=0), tmp_path / "m.onnx")


def test_export_warns_nothing(tmp_path):
    """A "same"-padding conv (F.pad, a Slice of step -1) made torch.onnx warn three times of constant folding it
    skipped, which a user can do nothing about (issue 25)."""
    model = quantize_model(UserNet(8), QuantConfig(weight_bits=4, act_bits=4))
    calibrate(model, _inputs("tiny_cnn", 32, seed=1))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        export_onnx(model.eval(), _inputs("tiny_cnn", 2, seed=2), tmp_path / "m.onnx")
    assert [str(w.message) for w in caught] == []


@pytest.mark.parametrize("four_bit_storage", [False, True])
def test_interval_offsets_are_named_or_become_integer_zero_points(four_bit_storage, tmp_path):
    """Interval grids: a free lower bound keeps a float Sub/Add around its QDQ, which the export says (one warning
    line, and the count in the file's metadata); trained with ``integer_zero_point`` the same layers store an
    integer zero point instead (no Sub/Add), with the same numbers as the fake-quant model."""
    counts = {}
    for integer in (False, True):
        torch.manual_seed(0)
        model = create_model("tiny_cnn", width=8)
        config = QuantConfig(weight_bits=4, act_bits=4, method="interval", integer_zero_point=integer)
        quantize_model(model, config)
        calibrate(model, _inputs("tiny_cnn", 32, seed=1))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            path = export_onnx(model.eval(), _inputs("tiny_cnn", 2, seed=2), tmp_path / f"m{integer}.onnx",
                               four_bit_storage=four_bit_storage)  # fmt: skip
        proto = onnx.load(str(path))
        counts[integer] = int({p.key: p.value for p in proto.metadata_props}["qdq_float_offset_quantizers"])
        subs = [n for n in proto.graph.node if n.op_type == "Sub"]
        assert len(subs) <= counts[integer]  # one Sub per float-offset activation (weights: an Add only)
        messages = [str(w.message) for w in caught]
        assert len(messages) == (1 if counts[integer] else 0)
        x = _inputs("tiny_cnn", 32, seed=3)
        with torch.no_grad():
            expected = model(x).numpy()
        assert np.abs(run_onnx(path, x.numpy()) - expected).max() <= 1e-4 * max(1.0, float(np.abs(expected).max()))
    assert counts[False] > 0 and counts[True] == 0
