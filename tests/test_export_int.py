"""The packed integer checkpoint and the integer runtime: exact packing, same answers, bad input."""

import copy

import numpy as np
import onnx
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import numpy_helper
from safetensors import safe_open
from torch import nn

from helpers import one_grid_per_model
from qkd.errors import QKDError
from qkd.export import (
    IntRuntime,
    compare,
    export_onnx_int,
    export_student,
    float_checkpoint_bytes,
    load_int,
    onnx_runner,
    save_int,
    to_int_program,
    to_real_program,
)
from qkd.export.fixedpoint import fixed_multiplier, shift_round, thresholds
from qkd.export.packing import pack_bits, unpack_bits
from qkd.models import create_model
from qkd.quant import QuantConfig, calibrate, quantize_model


@settings(max_examples=60, deadline=None)
@given(bits=st.integers(2, 8), signed=st.booleans(), n=st.integers(1, 50), seed=st.integers(0, 2**31 - 1))
def test_pack_round_trip_and_size(bits, signed, n, seed):
    lo = -(2 ** (bits - 1)) if signed else 0
    values = np.random.default_rng(seed).integers(lo, lo + 2**bits, n)
    packed = pack_bits(values, bits, lo)
    assert packed.dtype == np.uint8 and len(packed) == -(-n * bits // 8)  # two 4-bit / four 2-bit per byte
    assert np.array_equal(unpack_bits(packed, bits, lo, n), values)


def test_pack_rejects_out_of_range():
    with pytest.raises(ValueError, match="outside"):
        pack_bits(np.array([8]), 4, -8)


@settings(max_examples=60, deadline=None)
@given(m=st.floats(1e-18, 1e3), v=st.integers(-(2**40), 2**40))
def test_fixed_point_multiplier(m, v):
    m0, shift = fixed_multiplier(torch.tensor([m, -m], dtype=torch.float64))
    assert (m0.abs() < 2**31).all()
    got = shift_round(torch.tensor([v, v]), m0, shift)
    assert abs(int(got[0]) - v * m) <= 1 + abs(v * m) * 2**-30
    assert abs(int(got[1]) + v * m) <= 1 + abs(v * m) * 2**-30


@settings(max_examples=300, deadline=None)
@given(v=st.integers(-(2**61), 2**61), m=st.integers(-(2**31) + 1, 2**31 - 1), shift=st.integers(-30, 93))
def test_shift_round_is_exact_in_int64(v, m, shift):
    """The 64-bit multiply-shift equals Python's unbounded integer arithmetic (round half up)."""
    want = (v * m + 2 ** (shift - 1)) >> shift if shift >= 1 else (v * m) << -shift
    if abs(want) < 2**62:
        assert int(shift_round(torch.tensor([v]), torch.tensor([m]), torch.tensor([shift]))[0]) == want


@settings(max_examples=200, deadline=None)
@given(m=st.floats(1e-12, 1e2), bits=st.integers(2, 8), signed=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_threshold_requantization_equals_multiply_shift(m, bits, signed, seed):
    m0, shift = fixed_multiplier(torch.tensor([m], dtype=torch.float64))
    lo = -(2 ** (bits - 1)) if signed else 0
    hi = lo + 2**bits - 1
    t = thresholds(int(m0), int(shift), lo, hi)
    # values around every threshold, and far outside the range
    v = torch.tensor(t + [x + d for x in t for d in (-1, 1)] + [-(2**44), 2**44], dtype=torch.long)
    v = torch.cat([v, torch.randint(-(2**40), 2**40, (50,), generator=torch.Generator().manual_seed(seed))])
    want = torch.clamp(shift_round(v, m0, shift), lo, hi)
    assert torch.equal(lo + torch.bucketize(v, torch.tensor(t), right=True), want)


class ResidualNet(nn.Module):
    """A user-style model: stem, a depthwise/pointwise residual block, an option-A style pad shortcut."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.dw = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8), nn.ReLU6())
        self.pw = nn.Sequential(nn.Conv2d(8, 16, 1, stride=2, bias=False), nn.BatchNorm2d(16))
        self.head = nn.Linear(16, 10)

    def forward(self, x):
        x = self.stem(x)
        x = self.dw(x) + x
        short = nn.functional.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 4, 4))
        x = nn.functional.relu(self.pw(x) + short)
        return self.head(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def _trained(model: nn.Module, bits: int, per_channel: bool, x: torch.Tensor, method: str = "lsq") -> nn.Module:
    """A model with realistic BatchNorm statistics and quantizers calibrated on data."""
    torch.manual_seed(0)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average: the exact statistics of x after one pass
    model.train()
    with torch.no_grad():
        model(x)
    quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, per_channel=per_channel, method=method))
    calibrate(model, x)
    return model.eval()


MODELS = {
    "tiny_cnn": lambda: create_model("tiny_cnn", in_channels=3, width=8),
    "resnet20": lambda: create_model("resnet20"),
    "mobilenetv2": lambda: create_model("mobilenetv2_cifar", width_mult=0.25),
    "user residual": ResidualNet,
}


# interval grids have offsets: signed weights and the image input (off zero), MobileNetV2's linear bottlenecks
GRIDS = [(4, True, "lsq"), (2, False, "lsq"), (2, True, "interval"), (4, False, "interval")]


@pytest.mark.parametrize(("name", "bits", "per_channel", "method"), one_grid_per_model(list(MODELS), GRIDS))
def test_integer_engine_gives_the_fake_quant_answers(name, bits, per_channel, method):
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16)
    model = _trained(MODELS[name](), bits, per_channel, x, method)
    out = IntRuntime(*to_int_program(model))(x)
    with torch.no_grad():
        ref = model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    # The integer program is the fake-quant network computed exactly: it matches the float64
    # evaluation up to the 2^-32 fixed point. Against float32, only where float32 rounding tips a
    # value across a quantization boundary do the numbers move, by whole input steps.
    tol = 1e-6 * max(1.0, ref64.abs().max().item())
    assert (out - ref64).abs().max() <= tol
    # every image on which the engine and the float32 model part is one where float32 departs from float64
    moved = (out.float() - ref).abs().amax(1) > 100 * tol
    assert ((ref.double() - ref64).abs().amax(1)[moved] > 50 * tol).all()


@pytest.mark.parametrize(("name", "bits", "per_channel", "method"), one_grid_per_model(list(MODELS), GRIDS, 2))
def test_integer_onnx_gives_the_exact_fake_quant_answers(tmp_path, name, bits, per_channel, method):
    """ConvInteger/MatMulInteger accumulate the integer codes, float64 requantizes: the float64 model's logits."""
    torch.manual_seed(1)
    x = torch.randn(16, 3, 16, 16)
    model = _trained(MODELS[name](), bits, per_channel, x, method)
    path = export_onnx_int(model, x[:2], tmp_path / "m.onnx")
    out = onnx_runner(path)(x.numpy())
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double()).numpy()
    assert out.dtype == np.float64 and np.abs(out - ref64).max() <= 1e-10 * max(1.0, np.abs(ref64).max())
    graph = onnx.load(str(path)).graph
    ops = {n.op_type for n in graph.node}
    assert not ops & {"Conv", "Gemm", "MatMul", "QuantizeLinear"}, "every layer must run as an integer op"
    layers = [n for n in graph.node if n.op_type in ("ConvInteger", "MatMulInteger") and n.name.endswith("Integer")]
    assert len(layers) == sum(isinstance(m, nn.Conv2d | nn.Linear) for m in model.modules())
    stored = {t.name: numpy_helper.to_array(t) for t in graph.initializer if t.name.endswith(".weight")}
    _, program = to_real_program(model)
    for key, w in stored.items():  # the integer codes themselves, in 8-bit types (linear: transposed)
        want = program[key].numpy()
        assert w.dtype in (np.int8, np.uint8) and np.array_equal(w if w.shape == want.shape else w.T, want)


def test_file_round_trip_sizes_and_manifest(tmp_path):
    x = torch.randn(16, 3, 16, 16)
    model = _trained(create_model("resnet20"), 2, True, x)
    path = tmp_path / "r20.safetensors"
    export_student(model, "int", path, x[:2], {"model": "resnet20"})
    engine, manifest = load_int(tmp_path / "r20.safetensors")
    direct = IntRuntime(*to_int_program(model))
    assert torch.equal(engine(x), direct(x))  # export, reload: the same numbers
    assert manifest["model"] == "resnet20" and (tmp_path / "r20.safetensors.json").is_file()
    # 2-bit middle layers packed four per byte: far below the float checkpoint and below int8 storage
    n_weights = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))
    assert path.stat().st_size < n_weights * 0.5 < float_checkpoint_bytes(model) / 8
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("layer2_0_conv1.weight").dtype == torch.uint8
        assert f.get_tensor("layer2_0_conv1.weight").numel() == 32 * 16 * 9 * 2 // 8


def test_file_round_trip_of_an_interval_model(tmp_path):
    """Unsigned codes counted from the lower bound, offsets and the extra terms survive the file."""
    x = torch.randn(8, 3, 16, 16)
    model = _trained(create_model("mobilenetv2_cifar", width_mult=0.25), 2, True, x, "interval")
    save_int(tmp_path / "m.safetensors", *to_int_program(model), {})
    engine, _ = load_int(tmp_path / "m.safetensors")
    assert torch.equal(engine(x), IntRuntime(*to_int_program(model))(x))


def test_compare_reports_agreement():
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    model = _trained(create_model("tiny_cnn", in_channels=3, width=8), 4, True, x)
    result = compare(IntRuntime(*to_int_program(model)), model, [(x, y)], exact=True)
    assert result["images"] == 8 and result["agreement"] == result["agreement_f64"] == 1.0
    assert result["max_logit_diff_f64"] < 1e-6
    with torch.no_grad():
        reversed_ = compare(lambda t: -model(t), model, [(x, y)], exact=True)
    assert reversed_["agreement"] < 1 and reversed_["agreement_f64"] < 1 and reversed_["max_logit_diff_f64"] > 0.1


def test_bad_inputs(tmp_path):
    x = torch.randn(4, 3, 16, 16)
    with pytest.raises(QKDError, match="no quantized layers"):
        export_student(create_model("tiny_cnn", in_channels=3), "int", tmp_path / "f.safetensors", x, {})
    model = _trained(create_model("tiny_cnn", in_channels=3, width=8), 4, True, x)
    with pytest.raises(QKDError, match="unknown export format 'tflite'; valid formats: int, onnx, onnx-int"):
        export_student(model, "tflite", tmp_path / "f.bin", x, {})
    float_edges = quantize_model(create_model("tiny_cnn", in_channels=3), QuantConfig(first_last_bits=None))
    with pytest.raises(QKDError, match="not quantized on both"):
        to_int_program(float_edges)
    (tmp_path / "junk.safetensors").write_bytes(b"not a checkpoint")
    with pytest.raises(QKDError, match="not a qkd integer checkpoint"):
        load_int(tmp_path / "junk.safetensors")
    with pytest.raises(QKDError, match="not found"):
        load_int(tmp_path / "missing.safetensors")
    save_int(tmp_path / "ok.safetensors", *to_int_program(model), {})
    assert load_int(tmp_path / "ok.safetensors")[1]["format"] == "qkd-int/4"


def test_exact_reference_keeps_the_float32_input_codes():
    """An input pixel whose float32 division by the step rounds the other way in float64: every export
    quantizes the float32 input as the model does, and so does the float64 reference compare holds them to."""
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    model = _trained(create_model("tiny_cnn", in_channels=3, width=8), 4, True, x)
    step = model.features[0][0].act_quant.scale()
    cand = torch.rand(2**22, generator=torch.Generator().manual_seed(1)) * 100 * step
    ties = cand[torch.round(cand / step) != torch.round(cand.double() / step.double())]
    n = min(len(ties), 8)
    assert n > 0
    x[:n, 0, 0, 0] = ties[:n]  # a pixel of each image: codes one step apart in float32 and float64
    with torch.no_grad():
        naive = copy.deepcopy(model).double()(x.double())
    engine = IntRuntime(*to_int_program(model))
    result = compare(engine, model, [(x, torch.zeros(8, dtype=torch.long))], exact=True)
    assert result["max_logit_diff_f64"] < 1e-6 < float((engine(x) - naive).abs().max())
