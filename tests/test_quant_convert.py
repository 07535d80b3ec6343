"""qkd.quant.convert: every Conv/Linear-like layer is quantized (swapped or in place), refused, or listed as float."""

from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from qkd.errors import QKDError
from qkd.quant import (
    QConv2d,
    QLinear,
    QuantConfig,
    QuantizedLayer,
    QuantSpec,
    calibrate,
    dequantize_model,
    is_generic_quantized,
    quant_parameters,
    quantization_disabled,
    quantization_summary,
    quantize_model,
    quantized_layers,
    quantizers,
)

W3A3 = QuantConfig(weight_bits=3, act_bits=3, first_last_bits="same")


pytestmark = pytest.mark.usefixtures("one_thread")


class SameConv2d(nn.Conv2d):
    """timm's Conv2dSame, static form: "same" padding computed once, its own forward."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        total = [k - 1 for k in self.kernel_size]
        self.same_pad = (total[1] // 2, total[1] - total[1] // 2, total[0] // 2, total[0] - total[0] // 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.pad(x, self.same_pad), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SmallInitConv2d(nn.Conv2d):
    """A subclass that only changes the initialisation: swapped for QConv2d."""

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight, std=0.2)
        nn.init.zeros_(self.bias)


class MixedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.same = SameConv2d(3, 8, 4)
        self.init = SmallInitConv2d(8, 8, 3, padding=1)
        self.seq = nn.Conv1d(8, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.head = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.init(torch.relu(self.same(x))))
        n, c, h, w = x.shape
        x = torch.relu(self.seq(x.flatten(2)).view(n, c, h, w))
        return self.head(self.up(x, output_size=(2 * h, 2 * w)).mean(dim=(2, 3)))


IN_PLACE = {"same": SameConv2d, "seq": nn.Conv1d, "up": nn.ConvTranspose2d}
SWAPPED = {"init": QConv2d, "head": QLinear}


def _net(seed: int = 0) -> MixedNet:
    torch.manual_seed(seed)
    return MixedNet()


def _x(seed: int = 0) -> torch.Tensor:
    return torch.randn(4, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_every_layer_is_quantized_and_trains():
    model, x = _net(), _x()
    weights = {n: m.weight for n, m in model.named_children()}
    y_float = model(x).detach()
    assert quantize_model(model, W3A3) is model
    summary = quantization_summary(model)
    assert (summary.n_quantized, summary.n_float) == (5, 0), str(summary)
    assert {r["name"]: r["how"] for r in summary.rows} == {**dict.fromkeys(IN_PLACE, "in place"),
                                                           **dict.fromkeys(SWAPPED, "swapped")}  # fmt: skip
    for name, cls in IN_PLACE.items():
        layer = getattr(model, name)
        assert is_generic_quantized(layer) and isinstance(layer, cls) and type(layer).float_class is cls
        assert layer.parametrizations.weight.original is weights[name], "the float weight stays the parameter"
        assert layer.weight_quant is layer.parametrizations.weight[0] and layer.act_quant.bits == 3
    for name, cls in SWAPPED.items():
        assert type(getattr(model, name)) is cls and getattr(model, name).weight is weights[name]

    y = model(x)
    assert not torch.allclose(y, y_float, atol=1e-3)
    y.square().mean().backward()
    qparams = quant_parameters(model)
    assert len(qparams) == 2 * 5  # one step per weight and per input quantizer
    assert {id(model.same.weight_quant.step), id(model.up.act_quant.step)} <= {id(p) for p in qparams}
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in qparams)
    assert all(w.grad is not None for w in weights.values())


def test_conv_transpose_steps_per_output_channel():
    model = quantize_model(_net(), W3A3)
    wq = model.up.weight_quant
    assert wq.channel_dim == 1 and wq.step.shape == (4, 1, 1, 1)  # weight (in=8, out=4, 2, 2)
    codes = model.up.weight.detach().transpose(0, 1) / wq.step.detach().abs()
    torch.testing.assert_close(codes, codes.round(), atol=1e-4, rtol=0)
    assert quantization_summary(model).rows[3]["weight_grid"] == "per-channel (dim 1)"
    with pytest.raises(ValueError, match="channel_dim"):
        QuantSpec(4, channel_dim=2)


def test_state_dict_round_trip_into_a_fresh_copy():
    model, x = quantize_model(_net(0), W3A3), _x()
    calibrate(model, x)
    with torch.no_grad():
        for p in quant_parameters(model):
            p.mul_(1.1)
    fresh = quantize_model(_net(1), W3A3)
    fresh.load_state_dict(model.state_dict())
    assert "same.parametrizations.weight.original" in model.state_dict()
    with torch.no_grad():
        assert torch.equal(fresh(5 * x), model(5 * x))


def test_disable_calibrate_dequantize():
    model, x = _net(), _x()
    classes = {n: type(m) for n, m in model.named_children()}
    weights = {n: m.weight for n, m in model.named_children()}
    with torch.no_grad():
        y_float = model(x)
    quantize_model(model, W3A3)
    calibrate(model, x)
    assert all(bool(q.initialized) for _, q in quantizers(model))
    with torch.no_grad(), quantization_disabled(model):
        assert torch.equal(model(x), y_float)
    assert dequantize_model(model) is model
    assert {n: type(m) for n, m in model.named_children()} == classes
    assert all(m.weight is weights[n] for n, m in model.named_children())
    assert not hasattr(model.same, "parametrizations") and not list(quantizers(model))
    with torch.no_grad():
        assert torch.equal(model(x), y_float)
    assert quantize_model(model, W3A3) is model  # a float model again: quantizable again


def test_deepcopy_keeps_in_place_layers_and_float_reasons():
    model = quantize_model(_net(), QuantConfig(first_last_bits=None))
    twin = copy.deepcopy(model)
    assert isinstance(twin.same, QuantizedLayer) and twin.same.weight_quant is not model.same.weight_quant
    assert quantization_summary(twin).to_dict() == quantization_summary(model).to_dict()
    with torch.no_grad():
        assert torch.equal(twin(_x()), model(_x()))


def test_summary_float_reasons(caplog):
    with caplog.at_level(logging.WARNING, logger="qkd"):
        model = quantize_model(_net(), QuantConfig(first_last_bits=None))
    assert not caplog.records, "the configured first/last rule is not warned about"
    rows = {r["name"]: r for r in quantization_summary(model).rows}
    assert rows["same"]["how"] == rows["head"]["how"] == "float: first/last layer with first_last_bits=float"
    assert rows["same"]["weight_bits"] is None and rows["init"]["weight_bits"] == 4

    cfg = QuantConfig(overrides={"seq": {"weight_bits": None, "act_bits": "float"}})
    with caplog.at_level(logging.WARNING, logger="qkd"):
        model = quantize_model(_net(), cfg, filter_fn=lambda m, n: n != "init")
    summary = quantization_summary(model)
    rows = {r["name"]: r for r in summary.rows}
    assert type(model.init) is SmallInitConv2d and rows["init"]["how"] == "float: excluded by filter_fn"
    assert rows["seq"]["how"] == "float: override pattern 'seq' sets float"
    assert (summary.n_quantized, summary.n_float) == (3, 2)
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 2 and any("filter_fn): init" in w for w in warnings), warnings

    text = str(summary)
    lines = text.splitlines()
    assert lines[0].split() == ["layer", "type", "weight", "act", "weight", "grid", "how"]
    assert lines[-1] == "3 quantized, 2 float"
    column = lines[0].index("how")  # aligned: every row's "how" starts under the header
    assert [line[column:] for line in lines[1:-1]] == [r["how"] for r in summary.rows]
    assert json.loads(json.dumps(summary.to_dict()))["float"] == 2
    assert "float: not quantized" in str(quantization_summary(_net()))
    with caplog.at_level(logging.WARNING, logger="qkd"):
        model = quantize_model(_net(), QuantConfig(weight_bits=None, act_bits=None))
    assert {r["how"] for r in quantization_summary(model).rows} == {"float: weight_bits=float and act_bits=float"}
    assert "5 layer(s) left float" in caplog.records[-1].getMessage()


def test_override_typo_is_refused():
    cfg = QuantConfig(overrides={"haed*": {"weight_bits": 8}})
    model = _net()
    with pytest.raises(QKDError, match=r"override pattern 'haed\*' matches no .*head"):
        quantize_model(model, cfg)
    assert not list(quantized_layers(model)), "refused before any change"


def test_second_quantization_refused_reconfigure_changes_bits():
    model, x = _net(), _x()
    weights = {n: m.weight for n, m in model.named_children()}
    quantize_model(model, W3A3)
    with pytest.raises(QKDError, match="already quantized.*dequantize_model.*reconfigure=True"):
        quantize_model(model, QuantConfig(weight_bits=2, act_bits=2))
    quantize_model(model, QuantConfig(weight_bits=2, act_bits=5, first_last_bits="same"), reconfigure=True)
    layers = dict(quantized_layers(model))
    assert len(layers) == 5 and {(m.weight_quant.bits, m.act_quant.bits) for m in layers.values()} == {(2, 5)}
    assert type(model.same).float_class is SameConv2d, "not wrapped twice"
    assert model.same.parametrizations.weight.original is weights["same"] and model.head.weight is weights["head"]
    assert len(list(quantizers(model))) == 10
    assert not bool(model.same.act_quant.initialized)  # activations re-initialise on the next batch
    calibrate(model, x)
    assert torch.isfinite(model(x)).all()


class _KeywordOnly(nn.Linear):
    def forward(self, *, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x)


class _MaskedLinear(nn.Linear):
    """No forward of its own but state of its own: quantized in place, so the buffer stays."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", torch.ones_like(self.weight))


def _not_a_parameter() -> nn.Module:
    conv = nn.Conv2d(3, 3, 1)
    weight = conv.weight.detach()
    del conv.weight
    conv.weight = weight
    return conv


@pytest.mark.parametrize(
    ("layer", "why"),
    [
        (_KeywordOnly(4, 4), "does not take the input as its first positional argument"),
        (_not_a_parameter(), "its weight is not a Parameter"),
        (nn.utils.parametrizations.weight_norm(nn.Linear(4, 4)), "already has parametrizations"),
    ],
)
def test_unquantizable_layers_are_refused(layer, why):
    model = nn.Sequential(nn.Linear(4, 4), layer)
    with pytest.raises(QKDError, match=f"cannot quantize layer '1' .*{why}.*filter_fn"):
        quantize_model(model, W3A3)
    assert not list(quantized_layers(model))
    quantize_model(model, W3A3, filter_fn=lambda m, n: n != "1")
    assert quantization_summary(model).rows[1]["how"] == "float: excluded by filter_fn"


def test_subclass_with_own_state_is_quantized_in_place():
    model = quantize_model(nn.Sequential(_MaskedLinear(4, 4), nn.Linear(4, 2)), W3A3)
    assert is_generic_quantized(model[0]) and hasattr(model[0], "mask") and type(model[1]) is QLinear
    dequantize_model(model)
    assert type(model[0]) is _MaskedLinear


def test_attention_projections_are_quantized_and_single_layer_refused():
    """nn.MultiheadAttention is swapped for LinearMultiheadAttention: both projections become quantized layers;
    one qkd cannot swap (add_bias_kv) keeps its projections float, listed with the reason."""
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2), "fc": nn.Linear(8, 8)})
    quantize_model(model, W3A3)
    rows = {r["name"]: r["how"] for r in quantization_summary(model).rows}
    assert rows == {"attn.in_proj": "swapped", "attn.out_proj": "swapped", "fc": "swapped"}
    model = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, add_bias_kv=True), "fc": nn.Linear(8, 8)})
    quantize_model(model, W3A3)
    rows = {r["name"]: r["how"] for r in quantization_summary(model).rows}
    assert rows == {"attn": "float: uses its own parameter 'in_proj_weight' directly; qkd quantizes "
                            "nn.Conv2d/nn.Linear modules",  # the input projection: F.linear on its own weight
                    "attn.out_proj": "float: nn.MultiheadAttention reads its weight directly, not through its forward",
                    "fc": "swapped"}  # fmt: skip
    with pytest.raises(QKDError, match="not one Linear"):
        quantize_model(nn.Linear(2, 2))


class _ReadsChildWeight(nn.Module):
    """torchvision's Swin attention style: the forward passes a child layer's weight to F.linear itself."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.fc = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(F.linear(x, self.qkv.weight, self.qkv.bias))


def test_layer_whose_weight_its_parent_reads_is_left_float(caplog):
    """Quantized, such a layer would never run (its quantizers never see a tensor): it is left float and said so."""
    with caplog.at_level(logging.WARNING, logger="qkd"):
        model = quantize_model(_ReadsChildWeight(), W3A3)
    rows = {r["name"]: r["how"] for r in quantization_summary(model).rows}
    assert rows == {"qkv": "float: _ReadsChildWeight.forward reads self.qkv.weight directly, not through its "
                           "forward", "fc": "swapped"}  # fmt: skip
    assert "1 layer(s) left float (_ReadsChildWeight.forward reads self.qkv.weight" in caplog.text
