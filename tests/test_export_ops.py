"""The ops between layers that torchvision's networks use, through the integer formats and onnx-int.

Each tiny model is quantized, calibrated, exported both ways and held to the float64 fake-quant
model: the same top-1 on every image and logits within the fixed point's (engine) or float64's
(onnx-int) rounding.
"""

from __future__ import annotations

import copy
import operator

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F
from torchvision.models.shufflenetv2 import InvertedResidual, channel_shuffle
from torchvision.ops import SqueezeExcitation

from helpers import one_grid_per_model
from qkd.errors import QKDError
from qkd.export import IntRuntime, compare, export_onnx_int, onnx_runner, to_int_program
from qkd.export.fixedpoint import mul_round
from qkd.quant import QuantConfig, calibrate, quantize_model


def _cbr(cin: int, cout: int, act: type[nn.Module] = nn.ReLU, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), act())


class Head(nn.Module):
    def __init__(self, ch: int) -> None:
        super().__init__()
        self.fc = nn.Linear(ch, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.mean((2, 3)))


class ActNet(nn.Module):
    """One activation after each conv, and one as a function: Hardswish, Hardsigmoid, SiLU, Sigmoid."""

    def __init__(self, act: type[nn.Module]) -> None:
        super().__init__()
        self.body = nn.Sequential(_cbr(3, 8, act), _cbr(8, 8, act, stride=2))
        self.fn = {nn.Hardswish: F.hardswish, nn.Hardsigmoid: F.hardsigmoid, nn.SiLU: F.silu,
                   nn.Sigmoid: torch.sigmoid}[act]  # fmt: skip
        self.conv = nn.Conv2d(8, 8, 1)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.fn(self.conv(self.body(x))))


class SENet(nn.Module):
    """MobileNetV3 / EfficientNet style: a conv, torchvision's squeeze-excitation (``scale * input``), a residual."""

    def __init__(self, act: type[nn.Module], gate: type[nn.Module]) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, act)
        self.se = SqueezeExcitation(8, 4, activation=act, scale_activation=gate)
        self.conv = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1, groups=8, bias=False), nn.BatchNorm2d(8))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.conv(self.se(x))
        return self.fc(torch.flatten(self.pool(x), 1))


class ShuffleNet(nn.Module):
    """torchvision's ShuffleNetV2 blocks: chunk, concatenation, channel shuffle (view, transpose, view)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.pool = nn.MaxPool2d(3, 2, 1, ceil_mode=True)
        self.blocks = nn.Sequential(InvertedResidual(8, 16, 2), InvertedResidual(16, 16, 1))
        self.head = Head(16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.pool(self.stem(x))))


class SplitCatNet(nn.Module):
    """torch.split / torch.chunk / Tensor.split, slicing, concatenation, a user channel shuffle by reshape."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 12)
        self.a, self.b = _cbr(4, 4), _cbr(6, 6)
        self.head = nn.Linear(12 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        p, q, r = torch.split(x, [4, 2, 6], dim=1)
        s, t = torch.chunk(r, 2, 1)
        y = torch.cat([self.a(p), q, self.b(torch.cat((t, s), 1))], dim=1)
        n, c, h, w = y.shape
        y = y.reshape(n, 3, c // 3, h, w).permute(0, 2, 1, 3, 4).flatten(1, 2)  # channel shuffle, user style
        y = channel_shuffle(y, 2)
        y = F.adaptive_avg_pool2d(y, 2)
        return self.head(y.view(y.size(0), -1))


class PoolNet(nn.Module):
    """Average pooling in its forms (ceil mode, count_include_pad off, functional), adaptive pooling to
    uneven windows and upwards (AlexNet/VGG at small inputs), a BatchNorm on a concatenation (DenseNet)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.pool = nn.AvgPool2d(3, stride=2, padding=1, ceil_mode=True, count_include_pad=False)
        self.dense = nn.Sequential(nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 8, 1, bias=False))
        self.adaptive = nn.AdaptiveAvgPool2d((3, 5))
        self.fc = nn.Linear(8 * 3 * 5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stem(x))  # 16 -> 9 (ceil mode)
        x = self.dense(torch.cat([x, F.avg_pool2d(x, 3, 1, 1)], 1))
        x = F.avg_pool2d(x, 2)  # 9 -> 4, then adaptive 4 -> (3, 5): overlapping and repeated windows
        return self.fc(torch.flatten(self.adaptive(x), 1))


class ArithmeticNet(nn.Module):
    """Activations written out by hand: sums and products with constants, a product of two activations."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8, nn.Identity)
        self.conv = nn.Conv2d(8, 8, 1)
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x * F.relu6(x + 3) / 6  # hardswish
        x = self.conv(x) - 0.5
        return self.head(torch.sigmoid(x) * 2.0)


MODELS = {
    "hardswish": lambda: ActNet(nn.Hardswish),
    "hardsigmoid": lambda: ActNet(nn.Hardsigmoid),
    "silu": lambda: ActNet(nn.SiLU),
    "sigmoid": lambda: ActNet(nn.Sigmoid),
    "se-sigmoid": lambda: SENet(nn.SiLU, nn.Sigmoid),
    "se-hardsigmoid": lambda: SENet(nn.Hardswish, nn.Hardsigmoid),
    "shufflenet": ShuffleNet,
    "split-cat": SplitCatNet,
    "pools": PoolNet,
    "arithmetic": ArithmeticNet,
}
CASES = [(4, "lsq"), (2, "interval")]


def _quantized(model: nn.Module, bits: int, method: str, x: torch.Tensor) -> nn.Module:
    """Realistic BatchNorm statistics (one pass over ``x``), then quantized and calibrated."""
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.momentum = None
    model.train()
    with torch.no_grad():
        model(x)
    quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits, method=method))
    calibrate(model, x)
    return model.eval()


def _inputs(n: int = 16, size: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _check_exports(model: nn.Module, x: torch.Tensor, tmp_path) -> None:
    y = torch.zeros(len(x), dtype=torch.long)
    engine = IntRuntime(*to_int_program(model, x[:2]))
    got = compare(engine, model, [(x, y)], exact=True)
    assert got["agreement_f64"] == 1.0 and got["max_logit_diff_f64"] < 1e-6, got
    run = onnx_runner(export_onnx_int(model, x[:2], tmp_path / "m.onnx"))
    got = compare(lambda t: torch.from_numpy(run(t.numpy())), model, [(x, y)], exact=True)
    assert got["agreement_f64"] == 1.0 and got["max_logit_diff_f64"] < 1e-9, got


@pytest.mark.parametrize(("name", "bits", "method"), one_grid_per_model(list(MODELS), CASES))
def test_ops_export_exactly(tmp_path, name, bits, method):
    torch.manual_seed(0)
    x = _inputs()
    _check_exports(_quantized(MODELS[name](), bits, method, x), x, tmp_path)


def test_batch_size_stays_free(tmp_path):
    """Reshapes keep the batch dimension free: the program runs at any batch size, not only the example's."""
    torch.manual_seed(0)
    x = _inputs(8)
    model = _quantized(SplitCatNet(), 4, "lsq", x)
    ops, tensors = to_int_program(model, x[:2])
    assert [op["shape"][0] for op in ops if op["op"] == "reshape"] == [-1] * 5  # 2 by the user, 2 shuffle, 1 view
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double())
    assert (IntRuntime(ops, tensors)(x[:5]) - ref[:5]).abs().max() < 1e-6


def test_integer_only_activations_round_once():
    """Hardsigmoid and Hardswish in the fixed point: the exact value, rounded half up once."""
    one = 2**32
    v = torch.tensor([-4 * one, -3 * one, -one - 12345, -1, 0, 7, one // 3, 2 * one + 99, 3 * one, 2**50])
    engine = IntRuntime([], {})
    for fn, exact in ((engine._hardsigmoid, lambda a: (min(max(a + 3 * one, 0), 6 * one) * 2 + 6) // 12),
                      (engine._hardswish, lambda a: a if a >= 3 * one else
                       (2 * a * min(max(a + 3 * one, 0), 6 * one) + 6 * one) // (12 * one))):  # fmt: skip
        assert fn({}, v).tolist() == [exact(int(a)) for a in v]


@settings(max_examples=300, deadline=None)
@given(a=st.integers(-(2**61), 2**61), b=st.integers(-(2**40), 2**40), div=st.integers(1, 6))
def test_mul_round_is_exact(a, b, div):
    """The 64 x 64-bit product rounded once (half up), as Python's unbounded integers give it."""
    want = (2 * a * b + div * 2**32) // (2 * div * 2**32)
    if abs(want) < 2**62:
        assert int(mul_round(torch.tensor([a]), torch.tensor([b]), div)[0]) == want


class LayerNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.norm = nn.LayerNorm([8, 16, 16])
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.stem(x)))


class GeluNet(LayerNormNet):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.gelu(self.stem(x)))


class ParameterNet(LayerNormNet):
    """A learned tensor used directly (a ViT class token, a ConvNeXt layer scale)."""

    def __init__(self) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.ones(8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stem(x) * self.gamma)


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (LayerNormNet, r"module 'norm' \(LayerNorm\) is not supported"),
        (GeluNet, r"function gelu \(node 'gelu' in the model forward\) is not supported"),
        (ParameterNet, r"uses parameter or buffer 'gamma' directly"),
    ],
)
def test_unsupported_ops_are_refused_by_name(model, message):
    x = _inputs(4)
    model = _quantized(model(), 4, "lsq", x)
    with pytest.raises(QKDError, match=message):
        to_int_program(model, x[:2])
    with pytest.raises(QKDError, match=message):
        export_onnx_int(model, x[:2], "unused.onnx")


def test_reshape_needs_an_example():
    x = _inputs(4)
    model = _quantized(ShuffleNet(), 4, "lsq", x)
    with pytest.raises(QKDError, match="pass an example input"):
        to_int_program(model)


def test_onnx_int_graph_has_no_float32_activation_ops(tmp_path):
    """HardSwish, HardSigmoid and AveragePool have no float64 kernel in onnxruntime: composed instead."""
    import onnx

    x = _inputs(4)
    ops = set()
    for make in (lambda: SENet(nn.Hardswish, nn.Hardsigmoid), PoolNet):
        path = export_onnx_int(_quantized(make(), 4, "lsq", x), x[:2], tmp_path / "m.onnx")
        ops |= {n.op_type for n in onnx.load(str(path)).graph.node}
    assert not ops & {"HardSwish", "HardSigmoid", "AveragePool", "GlobalAveragePool"}
    assert {"MatMul", "Clip", "Concat"} <= ops


def test_elementwise_product_matches_numpy():
    """The squeeze-excitation gate as the engine computes it: rounded products of fixed-point values."""
    rng = np.random.default_rng(0)
    a = torch.from_numpy(rng.integers(-(2**45), 2**45, 1000))
    b = torch.from_numpy(rng.integers(0, 2**32 + 1, 1000))
    want = [operator.floordiv(2 * int(p) * int(q) + 2**32, 2**33) for p, q in zip(a, b)]
    assert mul_round(a, b).tolist() == want


class SamePadConv2d(nn.Conv2d):
    """A user's Conv2d with TensorFlow's static "same" padding in its own forward (as in EfficientNet ports):
    quantized in place, its pad is traced between its input quantizer and its convolution."""

    def __init__(self, *args, image_size: int = 16, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        pads = []
        for k, s, d in zip(self.kernel_size, self.stride, self.dilation):
            total = max((-(-image_size // s) - 1) * s + (k - 1) * d + 1 - image_size, 0)
            pads.append((total // 2, total - total // 2))
        self.same = (*pads[1], *pads[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.same), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SamePadNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(SamePadConv2d(3, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.SiLU())
        self.dw = nn.Sequential(SamePadConv2d(8, 8, 4, groups=8, image_size=8), nn.BatchNorm2d(8), nn.ReLU())
        self.head = Head(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dw(self.stem(x)) + self.stem(x)[:, :, :, :])


@pytest.mark.parametrize(("bits", "method"), [(4, "lsq"), (2, "lsq")])
def test_in_place_same_padding_conv_exports_exactly(tmp_path, bits, method):
    """Asymmetric pads (stride 2, even kernel) are ops of the program; the layer quantizes after them."""
    torch.manual_seed(0)
    x = _inputs()
    model = _quantized(SamePadNet(), bits, method, x)
    assert type(model.stem[0]).__name__.endswith("QSamePadConv2d")  # quantized in place, not swapped
    ops, _ = to_int_program(model, x[:2])
    pads = [op["pad"] for op in ops if op["op"] == "pad"]
    assert [0, 1, 0, 1] in pads and [1, 2, 1, 2] in pads
    assert [op["module"] for op in ops if op["op"] == "qconv2d"] == ["stem.0", "dw.0", "stem.0"]
    _check_exports(model, x, tmp_path)


def test_in_place_pad_needs_zero_on_the_grid():
    """A signed interval grid need not hold 0: padding before quantizing would then differ from after."""
    x = _inputs(4)
    model = _quantized(SamePadNet(), 4, "interval", x)
    with pytest.raises(QKDError, match="layer 'stem.0' pads its quantized input, but 0 is not on its input grid"):
        to_int_program(model, x[:2])


class Conv1dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(3, 8)
        self.seq = nn.Conv1d(8, 8, 3)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.seq(self.stem(x).flatten(2)).mean(2))


def test_in_place_conv1d_is_refused_by_name():
    x = _inputs(4)
    model = _quantized(Conv1dNet(), 4, "lsq", x)
    with pytest.raises(QKDError, match="node 'conv1d' in module 'seq': conv1d is not supported by the integer formats"):
        to_int_program(model, x[:2])


@pytest.mark.parametrize("name", ["se-hardsigmoid", "shufflenet", "same-pad"])
def test_qdq_onnx_exports_the_new_ops(tmp_path, name):
    """The QDQ form (torch.onnx): float32 arithmetic in the runtime, so compared with the float32 model."""
    from qkd.export import export_onnx

    torch.manual_seed(0)
    x = _inputs(8)
    model = _quantized(SamePadNet() if name == "same-pad" else MODELS[name](), 4, "lsq", x)
    run = onnx_runner(export_onnx(model, x[:2], tmp_path / "m.onnx"))
    got = compare(lambda t: torch.from_numpy(run(t.numpy())), model, [(x, torch.zeros(8, dtype=torch.long))])
    assert got["agreement"] == 1.0 and got["max_logit_diff"] < 1e-4, got


def test_qdq_onnx_refuses_what_torch_onnx_cannot_write(tmp_path):
    from qkd.export import export_onnx

    x = _inputs(4)
    model = _quantized(PoolNet(), 4, "lsq", x)
    with pytest.raises(QKDError, match="torch.onnx cannot export this model in QDQ form .*adaptive_avg_pool2d"):
        export_onnx(model, x[:2], tmp_path / "m.onnx")


def test_file_round_trip_of_the_new_ops(tmp_path):
    """The packed file keeps the standalone BatchNorm's multipliers and every op's attributes."""
    from qkd.export import load_int, save_int

    x = _inputs(4)
    for make in (PoolNet, SplitCatNet, lambda: SENet(nn.SiLU, nn.Sigmoid)):
        model = _quantized(make(), 4, "lsq", x)
        program = to_int_program(model, x[:2])
        engine, manifest = load_int(save_int(tmp_path / "m.safetensors", *program, {}))
        assert manifest["format"] == "qkd-int/4" and torch.equal(engine(x), IntRuntime(*program)(x))
