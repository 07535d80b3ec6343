"""qkd.quant: quantizer maths, STE gradients, data-driven initialisation, config validation and model conversion."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torchvision.models import mobilenet_v2, resnet18

from qkd.errors import QKDError
from qkd.models import create_model
from qkd.quant import (
    IntervalQuantizer,
    LSQQuantizer,
    QConv2d,
    QLinear,
    QuantConfig,
    QuantSpec,
    calibrate,
    dequantize_model,
    is_quantized,
    make_quantizer,
    quant_parameters,
    quantization_disabled,
    quantize_model,
    quantizers,
    recalibrate_bn,
    set_quantization,
    ste,
)
from qkd.quant.config import parse_bits
from qkd.quant.ste import (
    grad_scale,
    interval_fake_quant,
    interval_reference,
    lsq_fake_quant,
    lsq_reference,
    round_ste,
)

PLAIN = (nn.Conv2d, nn.Linear)
QUANT = (QConv2d, QLinear)


pytestmark = pytest.mark.usefixtures("one_thread")


def _randn(seed: int, *shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _qrange(bits: int, signed: bool) -> tuple[int, int]:
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def _levels_per_row(y: torch.Tensor, per_channel: bool) -> int:
    rows = y.reshape(y.shape[0], -1) if per_channel else y.reshape(1, -1)
    return max(len(torch.unique(r)) for r in rows)


# ----- 1. quantizer maths ----------------------------------------------------------------------------

quant_cases = dict(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    per_channel=st.booleans(),
    channels=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
    scale=st.floats(1e-3, 1e3),
    offset=st.floats(-1.5, 1.5),
)


def _make(method: str, bits: int, signed: bool, per_channel: bool, x: torch.Tensor):
    spec = QuantSpec(bits=bits, signed=signed, per_channel=per_channel, method=method)
    # Per-channel quantizers are weight quantizers: initialised at creation. Per-tensor ones learn from the first call.
    return make_quantizer(spec, init=x if per_channel else None)


@settings(max_examples=60, deadline=None)
@given(**quant_cases)
def test_lsq_values_on_integer_grid(bits, signed, per_channel, channels, seed, scale, offset):
    x = (_randn(seed, channels, 3, 3, 3) + offset) * scale
    q = _make("lsq", bits, signed, per_channel, x)
    assert isinstance(q, LSQQuantizer)
    with torch.no_grad():
        y = q(x)
    qn, qp = _qrange(bits, signed)
    assert (q.qn, q.qp) == (qn, qp)
    step = q.step.detach()
    assert step.shape == ((channels, 1, 1, 1) if per_channel else ())
    assert (step > 0).all()
    k = y / step
    assert torch.allclose(k, k.round(), atol=1e-3), "values are not integer multiples of the step"
    k = k.round()
    assert k.min() >= qn and k.max() <= qp
    # Clamp range, and rounding to the nearest level for values inside it.
    assert (y >= qn * step * (1 + 1e-6)).all() and (y <= qp * step * (1 + 1e-6)).all()
    inside = (x >= qn * step) & (x <= qp * step)
    assert ((y - x).abs() <= step / 2 * (1 + 1e-4) + 1e-30)[inside].all()
    assert _levels_per_row(y, per_channel) <= 2**bits
    # Idempotent: already quantized values are fixed points.
    with torch.no_grad():
        assert torch.equal(q(y), y)


@settings(max_examples=60, deadline=None)
@given(**quant_cases)
def test_interval_values_on_grid(bits, signed, per_channel, channels, seed, scale, offset):
    x = (_randn(seed, channels, 3, 3, 3) + offset) * scale
    q = _make("interval", bits, signed, per_channel, x)
    assert isinstance(q, IntervalQuantizer)
    with torch.no_grad():
        y = q(x)
    lower, upper = q.lower.detach(), q.upper.detach()
    assert (upper > lower).all()
    if not signed:
        assert (lower == 0).all(), "unsigned intervals keep zero exact"
    levels = 2**bits
    width = upper - lower
    k = (y - lower) / width * (levels - 1)
    assert torch.allclose(k, k.round(), atol=1e-2), "values are not on lower + k * (upper - lower) / (2^b - 1)"
    k = k.round()
    assert k.min() >= 0 and k.max() <= levels - 1
    tol = 1e-5 * (upper.abs() + lower.abs()) + 1e-12
    assert (y >= lower - tol).all() and (y <= upper + tol).all()
    assert _levels_per_row(y, per_channel) <= levels
    with torch.no_grad():
        assert torch.equal(q(y), y)


@pytest.mark.parametrize("method", ["lsq", "interval"])
def test_per_channel_parameters_are_independent(method):
    # Channel 1 is 100x larger: with per-channel steps channel 0 keeps its resolution.
    w = _randn(0, 2, 4, 3, 3)
    w[1] *= 100
    per_tensor = make_quantizer(QuantSpec(4, signed=True, method=method), init=w)
    per_channel = make_quantizer(QuantSpec(4, signed=True, per_channel=True, method=method), init=w)
    with torch.no_grad():
        err_t = _rel_err(per_tensor(w)[0], w[0])
        err_c = _rel_err(per_channel(w)[0], w[0])
    assert err_c < 0.3 < err_t


def test_single_value_per_channel_does_not_give_nan():
    # Linear(1, n): one weight per output channel (the sample std is undefined there).
    lin = nn.Linear(1, 4)
    for method in ("lsq", "interval"):
        q = QLinear.from_float(lin, QuantSpec(4, signed=True, per_channel=True, method=method), QuantSpec(4))
        assert all(torch.isfinite(p).all() for p in q.weight_quant.parameters())
        assert torch.isfinite(q(torch.randn(3, 1))).all()


# ----- 2. STE gradients ------------------------------------------------------------------------------


def test_round_has_no_true_gradient_so_we_use_ste():
    x = torch.linspace(-3, 3, 13, requires_grad=True)
    torch.round(x).sum().backward()
    assert (x.grad == 0).all()  # why gradcheck-style numerical checks are meaningless here
    x.grad = None
    y = round_ste(x)
    assert torch.equal(y, torch.round(x.detach()))
    y.sum().backward()
    assert (x.grad == 1).all()


def test_grad_scale_keeps_value_scales_gradient():
    x = torch.tensor([0.3, -2.0, 5.0], requires_grad=True)
    y = grad_scale(x, 0.25)
    assert torch.allclose(y, x.detach())
    y.sum().backward()
    assert torch.allclose(x.grad, torch.full_like(x, 0.25))


def _grads(fn, x, step, qn, qp, gscale, g):
    x = x.clone().requires_grad_(True)
    step = step.clone().requires_grad_(True)
    y = fn(x, step, qn, qp, gscale)
    y.backward(g)
    return y.detach(), x.grad, step.grad


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    signed=st.booleans(),
    per_channel=st.booleans(),
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    gscale=st.floats(1e-3, 2.0),
)
def test_fused_lsq_matches_reference_and_formula(bits, signed, per_channel, channels, seed, gscale):
    qn, qp = _qrange(bits, signed)
    # Float64 so the two formulations round identically; steps small enough that many values clip.
    x = _randn(seed, channels, 3, 2, 2, dtype=torch.float64) * 3
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 1e3, -1e3  # far beyond the clip range on both sides
    shape = (channels, 1, 1, 1) if per_channel else ()
    step = (_randn(seed + 1, *shape, dtype=torch.float64).abs() + 0.5) * 3 / max(qp, 1)
    g = _randn(seed + 2, *x.shape, dtype=torch.float64)

    y, gx, gs = _grads(lsq_fake_quant, x, step, qn, qp, gscale, g)
    y_ref, gx_ref, gs_ref = _grads(lsq_reference, x, step, qn, qp, gscale, g)
    assert gs.shape == step.shape
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gs, gs_ref, rtol=1e-9, atol=1e-12)

    # The hand-written LSQ formula (Esser et al., eq. 3 and 5).
    v = x / step
    below, above = v < qn, v > qp
    inside = ~(below | above)
    assert below.any() or above.any()
    assert torch.equal(gx, g * inside)  # straight-through inside, zero outside
    dstep = torch.where(inside, v.round() - v, torch.where(below, torch.full_like(v, qn), torch.full_like(v, qp)))
    expected = (g * dstep).sum(dim=(1, 2, 3), keepdim=True) if per_channel else (g * dstep).sum()
    torch.testing.assert_close(gs, expected * gscale, rtol=1e-9, atol=1e-12)


def _interval_grads(fn, x, lower, upper, levels, gscale, g):
    x, lower, upper = (t.clone().requires_grad_(True) for t in (x, lower, upper))
    y = fn(x, lower, upper, levels, gscale)
    y.backward(g)
    return y.detach(), x.grad, lower.grad, upper.grad


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(2, 8),
    per_channel=st.booleans(),
    channels=st.integers(1, 4),
    seed=st.integers(0, 2**31 - 1),
    gscale=st.floats(1e-3, 2.0),
)
def test_fused_interval_matches_reference(bits, per_channel, channels, seed, gscale):
    x = _randn(seed, channels, 3, 2, 2, dtype=torch.float64) * 3
    x[0, 0, 0, 0], x[-1, -1, -1, -1] = 1e3, -1e3
    shape = (channels, 1, 1, 1) if per_channel else ()
    lower = -(_randn(seed + 1, *shape, dtype=torch.float64).abs() + 0.5)
    upper = _randn(seed + 2, *shape, dtype=torch.float64).abs() + 0.5
    g = _randn(seed + 3, *x.shape, dtype=torch.float64)
    fused = _interval_grads(interval_fake_quant, x, lower, upper, 2**bits, gscale, g)
    ref = _interval_grads(interval_reference, x, lower, upper, 2**bits, gscale, g)
    for a, b in zip(fused, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("channels_last", [False, True])
def test_compiled_kernels_match_eager(channels_last):
    """torch.compile'd fused loops give the eager kernels' values and gradients, in either layout."""
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6) * 2
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    step, lower, upper = torch.tensor(0.3), torch.tensor(-1.0), torch.tensor(1.5)
    g = torch.randn_like(x)

    def both():
        return (
            _grads(lsq_fake_quant, x, step, -8, 7, 0.1, g),
            _interval_grads(interval_fake_quant, x, lower, upper, 16, 0.1, g),
        )

    eager = both()
    ste.set_kernel_backend("compiled")
    try:
        compiled = both()
        assert ste.kernel_backend() == "compiled"  # it compiled here rather than falling back
    finally:
        ste.set_kernel_backend("eager")
    for a_group, b_group in zip(eager, compiled):
        for a, b in zip(a_group, b_group):
            assert a.stride() == b.stride()
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert compiled[0][0].is_contiguous(memory_format=torch.channels_last) is channels_last


@pytest.mark.slow
def test_compiled_kernels_compile_once_for_training_and_evaluation():
    """Training and evaluation share the compiled graphs: no variant per requires_grad, view or inference
    tensor (they once made ResNet-20 compile ten graphs, and on CUDA hit dynamo's recompile limit)."""
    from torch._dynamo.utils import counters  # noqa: PLC2701  (torch has no public recompile counter)

    from qkd.train.loop import Runtime, evaluate

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = quantize_model(create_model("resnet20", num_classes=10), QuantConfig(weight_bits=2, act_bits=2))
    x, y = torch.randn(8, 3, 32, 32), torch.zeros(8, dtype=torch.long)
    calibrate(model, x)
    ste.set_kernel_backend("compiled")
    try:
        before = counters["stats"]["unique_graphs"]
        for _ in range(2):
            model(x).sum().backward()
            evaluate(model, [(x, y)], Runtime())
        assert ste.kernel_backend() == "compiled"
        assert counters["stats"]["unique_graphs"] - before <= 3  # LSQ forward, backward (+1 size specialisation)
    finally:
        ste.set_kernel_backend("eager")


def test_unknown_kernel_backend():
    with pytest.raises(ValueError, match="eager"):
        ste.set_kernel_backend("fast")


def test_quantizer_module_uses_lsq_gradient_scale():
    w = _randn(3, 4, 3, 3, 3)
    q = LSQQuantizer(QuantSpec(3, signed=True, per_channel=True), init=w)
    x = w.clone().requires_grad_(True)
    q(x).sum().backward()
    gscale = 1 / (27 * q.qp) ** 0.5  # 1 / sqrt(elements per step * qp)
    step = q.step.detach().clone().requires_grad_(True)
    x2 = w.clone().requires_grad_(True)
    lsq_reference(x2, step, q.qn, q.qp, gscale).sum().backward()
    torch.testing.assert_close(q.step.grad, step.grad)
    torch.testing.assert_close(x.grad, x2.grad)


# ----- 3. data-driven initialisation -----------------------------------------------------------------


@pytest.mark.parametrize("per_channel", [False, True])
def test_weight_quantizer_initialised_at_creation(per_channel):
    conv = nn.Conv2d(3, 6, 3)
    spec = QuantSpec(4, signed=True, per_channel=per_channel, step_init="lsq")
    q = QConv2d.from_float(conv, spec, QuantSpec(4, step_init="lsq"))
    wq, aq = q.weight_quant, q.act_quant
    assert bool(wq.initialized) and bool(wq.signed)
    w = conv.weight.detach()
    mean_abs = w.abs().mean(dim=(1, 2, 3), keepdim=True) if per_channel else w.abs().mean()
    torch.testing.assert_close(wq.step.detach(), 2 * mean_abs / 7**0.5)  # 4-bit signed: qp = 7
    assert not bool(aq.initialized)
    x = torch.relu(torch.randn(2, 3, 8, 8)) + 0.1
    q(x)
    assert bool(aq.initialized) and not bool(aq.signed)
    torch.testing.assert_close(aq.step.detach(), 2 * x.abs().mean() / 15**0.5)  # 4-bit unsigned: qp = 15
    # Later batches do not re-initialise.
    before = aq.step.detach().clone()
    q(10 * x)
    assert torch.equal(aq.step.detach(), before)


@pytest.mark.parametrize("method", ["lsq", "interval"])
@pytest.mark.parametrize(("data", "signed"), [("relu", False), ("randn", True), ("zeros", False)])
def test_activation_sign_is_automatic(method, data, signed):
    x = {"relu": torch.relu(torch.randn(4, 16)), "randn": torch.randn(4, 16), "zeros": torch.zeros(4, 16)}[data]
    q = make_quantizer(QuantSpec(3, signed=None, method=method))
    y = q(x)
    assert bool(q.signed) is signed
    assert torch.isfinite(y).all()
    if not signed:
        assert (y >= 0).all()


def test_explicit_sign_is_not_overridden_by_data():
    q = make_quantizer(QuantSpec(3, signed=False))
    y = q(torch.randn(100))
    assert not bool(q.signed) and (y >= 0).all()
    q = make_quantizer(QuantSpec(3, signed=True))
    q(torch.rand(100))
    assert bool(q.signed) and q.qn == -4


def _small_net() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, groups=8),  # depthwise
        nn.ReLU(),
        nn.Conv2d(8, 8, 1, groups=2),  # grouped
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 10),
    )


@pytest.mark.parametrize("method", ["lsq", "interval"])
@pytest.mark.parametrize("per_channel", [False, True])
def test_state_dict_round_trip_needs_no_data(method, per_channel):
    cfg = QuantConfig(weight_bits=3, act_bits=3, method=method, per_channel=per_channel)
    torch.manual_seed(0)
    model = quantize_model(_small_net(), cfg)
    calibrate(model, torch.randn(8, 3, 8, 8))
    with torch.no_grad():  # move the learnt parameters away from their initial values
        for p in quant_parameters(model):
            p.mul_(1.1)
    torch.manual_seed(1)
    fresh = quantize_model(_small_net(), cfg)  # different weights, activation quantizers not initialised
    assert not all(bool(q.initialized) for _, q in quantizers(fresh))
    fresh.load_state_dict(model.state_dict())
    for (name, a), (_, b) in zip(quantizers(model), quantizers(fresh)):
        assert bool(b.initialized), name
        assert bool(a.signed) == bool(b.signed), name
        for pa, pb in zip(a.parameters(), b.parameters()):
            assert torch.equal(pa, pb), name
    assert any(bool(q.signed) for n, q in quantizers(fresh) if n.endswith("act_quant"))  # the raw input
    assert any(not bool(q.signed) for n, q in quantizers(fresh) if n.endswith("act_quant"))  # after ReLU
    model.eval()
    fresh.eval()
    x = 5 * torch.randn(2, 3, 8, 8)  # a different scale: a re-initialisation would show
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


# ----- 4. validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [1, 9, 0, -4, 2.5, "x", True, [4]])
def test_parse_bits_rejects(bad):
    with pytest.raises(ValueError, match="bits"):
        parse_bits(bad)
    with pytest.raises(ValueError, match="bits"):
        QuantSpec(bits=bad)
    for key in ("weight_bits", "act_bits", "first_last_bits"):
        with pytest.raises(ValueError, match="bits"):
            QuantConfig(**{key: bad})
    with pytest.raises(ValueError, match="bits"):
        QuantConfig(overrides={"layer1.*": {"weight_bits": bad}})


@pytest.mark.parametrize("value", [None, "float", "off", "FLOAT", "Off", False])
def test_parse_bits_float_spellings(value):
    assert parse_bits(value) is None
    assert QuantSpec(bits=value).bits is None
    cfg = QuantConfig(weight_bits=value, act_bits=value, first_last_bits=value, overrides={"a": {"act_bits": value}})
    assert cfg.weight_bits is cfg.act_bits is cfg.first_last_bits is cfg.overrides["a"]["act_bits"] is None


def test_parse_bits_accepts_2_to_8():
    assert [parse_bits(b) for b in range(2, 9)] == list(range(2, 9))
    assert QuantConfig(first_last_bits="same").first_last_bits == "same"


def test_unknown_method_and_override_key_rejected():
    with pytest.raises(ValueError, match="unknown quantizer 'nope'.*interval.*lsq"):
        QuantSpec(method="nope")
    with pytest.raises(ValueError, match="unknown quantizer"):
        QuantConfig(method="nope")
    with pytest.raises(ValueError, match="unknown keys.*'bits'"):
        QuantConfig(overrides={"layer1.*": {"bits": 4}})


def test_float_quantizer_is_identity():
    q = make_quantizer(QuantSpec(bits=None))
    x = torch.randn(5)
    assert q(x) is x and not q.active and not bool(q.initialized)


# ----- 5. quantize_model -----------------------------------------------------------------------------


class _Inner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.proj(x))


class _UserNet(nn.Module):
    """A user model: a stem, a Linear two levels down inside a ModuleDict, and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.blocks = nn.ModuleDict({"a": _Inner()})
        self.head = nn.Linear(16, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = nn.functional.adaptive_avg_pool2d(torch.relu(self.stem(x)), 2).flatten(1)
        return self.head(self.blocks["a"](x))


MODELS = {
    "grouped_seq": (_small_net, "0", "9"),
    "resnet20": (lambda: create_model("resnet20"), "conv1", "linear"),
    "tv_resnet18": (lambda: resnet18(weights=None, num_classes=10), "conv1", "fc"),
    "tv_mobilenet_v2": (lambda: mobilenet_v2(weights=None, num_classes=10), "features.0.0", "classifier.1"),
    "user_net": (_UserNet, "stem", "head"),
}


@pytest.fixture(scope="module", params=list(MODELS))
def float_model(request):
    """(name, float model in eval mode, input, float output, first, last); built once per model."""
    factory, first, last = MODELS[request.param]
    torch.manual_seed(0)
    model = factory().eval()
    x = _randn(0, 2, 3, 32, 32)
    with torch.no_grad():
        y = model(x)
    return request.param, model, x, y, first, last


def _layers(model: nn.Module, types) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, types)}


def test_quantize_model_swaps_every_layer(float_model):
    name, base, x, y_float, first, last = float_model
    model = copy.deepcopy(base)
    before = _layers(model, PLAIN)
    weights = {n: m.weight for n, m in before.items()}
    biases = {n: m.bias for n, m in before.items()}
    groups = {n: m.groups for n, m in before.items() if isinstance(m, nn.Conv2d)}

    assert quantize_model(model, QuantConfig(weight_bits=3, act_bits=4)) is model
    assert not [n for n, m in model.named_modules() if type(m) in PLAIN], "a plain layer was left"
    after = _layers(model, QUANT)
    assert set(after) == set(before)
    for n, m in after.items():
        assert m.weight is weights[n] and m.bias is biases[n], "parameters must be shared, not copied"
        assert isinstance(m, QConv2d) == isinstance(before[n], nn.Conv2d)
        if n in groups:
            assert m.groups == groups[n]
        edge = n in (first, last)
        assert m.weight_quant.bits == (8 if edge else 3), n
        assert m.act_quant.bits == (8 if edge else 4), n
        assert bool(m.weight_quant.initialized) and bool(m.weight_quant.signed)
    if name == "grouped_seq":
        assert after["3"].groups == 8 and after["5"].groups == 2
    assert {id(p) for p in model.parameters()} >= {id(w) for w in weights.values()}

    with torch.no_grad():
        y = model(x)
    assert y.shape == y_float.shape and torch.isfinite(y).all()
    assert is_quantized(model)

    # quantization_disabled: exactly the float network; switches come back as they were.
    wq = after[first].weight_quant
    wq.enabled = False
    with torch.no_grad(), quantization_disabled(model):
        assert not any(q.enabled for _, q in quantizers(model))
        assert torch.equal(model(x), y_float)
    assert wq.enabled is False
    assert all(q.enabled for n, q in quantizers(model) if q is not wq)
    wq.enabled = True
    with pytest.raises(RuntimeError), quantization_disabled(model):
        raise RuntimeError("boom")
    assert all(q.enabled for _, q in quantizers(model))
    with torch.no_grad():
        assert torch.equal(model(x), y)

    # Quantizing twice is refused and leaves the model as it was.
    mods = dict(model.named_modules())
    with pytest.raises(QKDError, match="already quantized.*reconfigure=True"):
        quantize_model(model, QuantConfig(weight_bits=2, act_bits=2))
    assert dict(model.named_modules()) == mods
    for n, m in after.items():
        assert {c for c, _ in m.named_children()} == {"weight_quant", "act_quant"}
        assert m.weight_quant.bits == (8 if n in (first, last) else 3)

    # quant_parameters: every step, nothing else.
    qp = quant_parameters(model)
    assert len(qp) == 2 * len(after)
    assert {id(p) for p in qp} == {id(q.step) for _, q in quantizers(model)}
    assert not {id(p) for p in qp} & {id(w) for w in weights.values()}

    # dequantize_model: the plain layers back, same parameters, same float outputs.
    assert dequantize_model(model) is model
    assert not list(quantizers(model)) and not _layers(model, QUANT)
    plain = _layers(model, PLAIN)
    assert set(plain) == set(before)
    assert all(plain[n].weight is weights[n] and plain[n].bias is biases[n] for n in plain)
    assert all(type(plain[n]) is type(before[n]) for n in plain)
    with torch.no_grad():
        assert torch.equal(model(x), y_float)


def test_first_last_bits_options(float_model):
    _, base, x, _, first, last = float_model
    same = quantize_model(copy.deepcopy(base), QuantConfig(weight_bits=3, act_bits=5, first_last_bits="same"))
    assert {(m.weight_quant.bits, m.act_quant.bits) for m in _layers(same, QUANT).values()} == {(3, 5)}

    floats = quantize_model(copy.deepcopy(base), QuantConfig(weight_bits=3, act_bits=5, first_last_bits=None))
    for n, m in _layers(floats, QUANT).items():
        expected = (None, None) if n in (first, last) else (3, 5)
        assert (m.weight_quant.bits, m.act_quant.bits) == expected, n
    with torch.no_grad():
        assert torch.isfinite(floats(x)).all()


def test_float_side_stays_float_at_the_edges():
    model = quantize_model(_small_net(), QuantConfig(weight_bits=4, act_bits="float"))
    layers = _layers(model, QUANT)
    assert [m.weight_quant.bits for m in layers.values()] == [8, 4, 4, 8]
    assert all(m.act_quant.bits is None for m in layers.values())
    model = quantize_model(_small_net(), QuantConfig(weight_bits=None, act_bits=None))
    assert not is_quantized(model)


def test_overrides_by_pattern_later_wins():
    cfg = QuantConfig(
        weight_bits=4,
        act_bits=4,
        overrides={
            "layer1.*": {"weight_bits": 2},
            "layer1.0.*": {"weight_bits": 3, "act_bits": 6},
            "conv1": {"weight_bits": 5},  # an edge layer can be overridden too
            "layer3.*.conv2": {"act_bits": "float"},
        },
    )
    model = quantize_model(create_model("resnet20"), cfg)
    layers = _layers(model, QUANT)

    def bits(n):
        return layers[n].weight_quant.bits, layers[n].act_quant.bits

    assert bits("layer1.0.conv1") == bits("layer1.0.conv2") == (3, 6)
    assert bits("layer1.1.conv1") == bits("layer1.2.conv2") == (2, 4)
    assert bits("layer2.0.conv1") == (4, 4)
    assert bits("layer3.1.conv2") == (4, None) and bits("layer3.1.conv1") == (4, 4)
    assert bits("conv1") == (5, 8) and bits("linear") == (8, 8)
    assert cfg.bits_for("layer1.0.conv1", is_edge=False) == (3, 6)


def test_filter_fn_and_edges_among_selected():
    model = quantize_model(_UserNet(), QuantConfig(weight_bits=2, act_bits=2), filter_fn=lambda m, n: n != "head")
    assert type(model.head) is nn.Linear
    assert isinstance(model.blocks["a"].proj, QLinear) and isinstance(model.stem, QConv2d)
    # The last *quantized* layer is now the inner Linear: it gets the edge bits.
    assert model.blocks["a"].proj.weight_quant.bits == 8 and model.stem.weight_quant.bits == 8


@pytest.mark.parametrize("method", ["lsq", "interval"])
def test_interval_and_lsq_quant_parameters(method):
    model = quantize_model(_small_net(), QuantConfig(method=method))
    per_quantizer = {"lsq": ["step"], "interval": ["lower", "upper"]}[method]
    names = {n for n, _ in model.named_parameters() if "_quant." in n}
    expected = {f"{q}.{p}" for q, _ in quantizers(model) for p in per_quantizer}
    assert names == expected
    assert len(quant_parameters(model)) == len(expected)


def test_single_layer_w8a8_close_w2a2_far():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    x = _randn(1, 4, 16, 8, 8)
    y = conv(x).detach()
    errs = {}
    for bits in (8, 4, 2):
        q = QConv2d.from_float(conv, QuantSpec(bits, signed=True, per_channel=True), QuantSpec(bits))
        errs[bits] = _rel_err(q(x).detach(), y)
    assert errs[8] < 0.1 < errs[4] < errs[2]


@pytest.mark.parametrize("method", ["lsq", "interval"])
def test_model_w8a8_close_w2a2_far(method):
    # Train-mode BN keeps a randomly initialised network's activations well scaled.
    torch.manual_seed(0)
    base = create_model("resnet20").train()
    x = _randn(2, 8, 3, 32, 32)
    with torch.no_grad():
        y = base(x)
    errs = {}
    for bits in (8, 2):
        model = quantize_model(copy.deepcopy(base), QuantConfig(bits, bits, method=method, first_last_bits="same"))
        with torch.no_grad():
            errs[bits] = _rel_err(model(x), y)
    assert errs[8] < 0.15 and errs[2] > 2 * errs[8], errs


def test_calibrate_initialises_activations_and_keeps_bn_state():
    model = quantize_model(_small_net(), QuantConfig()).train()
    bn = model[1]
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    calibrate(model, torch.randn(4, 3, 8, 8))
    assert model.training
    assert all(bool(q.initialized) for _, q in quantizers(model))
    assert torch.equal(bn.running_mean, stats[0]) and torch.equal(bn.running_var, stats[1])
    assert torch.equal(bn.num_batches_tracked, stats[2])


def test_set_quantization_switches_all():
    model = quantize_model(_small_net(), QuantConfig())
    set_quantization(model, False)
    assert not any(q.enabled for _, q in quantizers(model))
    set_quantization(model, True)
    assert all(q.enabled for _, q in quantizers(model))


# ----- 6. training sanity ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["lsq", "interval"])
def test_sgd_reduces_loss_and_learns_quantizer_parameters(method):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
        nn.Linear(8 * 6 * 6, 4),
    )  # fmt: skip
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, method=method))
    x = _randn(5, 32, 1, 6, 6)
    target = torch.arange(32) % 4
    calibrate(model, x)
    qparams = quant_parameters(model)
    start = [p.detach().clone() for p in qparams]
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(30):
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(x), target)
        loss.backward()
        losses.append(loss.item())
        opt.step()
    assert losses[-1] < 0.7 * losses[0], losses
    learnable = [(p, s) for p, s in zip(qparams, start) if p.grad is not None]
    # LSQ: every step learns. Interval: every upper bound and the signed lower bounds (unsigned keep lower = 0).
    assert len(learnable) == (len(qparams) if method == "lsq" else len(qparams) - 2)
    assert all(torch.isfinite(p.grad).all() for p, _ in learnable)
    assert all(not torch.equal(p.detach(), s) for p, s in learnable)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("per_channel", [False, True])
def test_mse_step_init_minimises_the_quantization_error(bits, per_channel):
    torch.manual_seed(0)
    w = torch.randn(6, 8, 3, 3) * torch.linspace(0.1, 2, 6).view(-1, 1, 1, 1)
    w[0, 0, 0, 0] = 8.0  # an outlier: the best clip is far below the largest value

    def error(q: LSQQuantizer, step: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            q.step.copy_(step)
            dims = (1, 2, 3) if per_channel else (0, 1, 2, 3)
            return ((q(w) - w) ** 2).mean(dim=dims)

    mse = LSQQuantizer(QuantSpec(bits, signed=True, per_channel=per_channel), init=w)
    lsq = LSQQuantizer(QuantSpec(bits, signed=True, per_channel=per_channel, step_init="lsq"), init=w)
    best = mse.step.detach().clone()
    assert best.shape == ((6, 1, 1, 1) if per_channel else ())
    assert (error(mse, best) <= error(mse, lsq.step.detach())).all()
    for factor in (0.9, 1.1):  # a local minimum of the error, up to the search grid
        assert (error(mse, best) <= error(mse, best * factor) + 1e-7).all()
    with pytest.raises(ValueError, match="unknown step_init 'max'"):
        QuantSpec(4, step_init="max")


def test_recalibrate_bn_sets_the_exact_statistics_of_the_quantized_network():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1))
    quantize_model(model, QuantConfig(weight_bits=2, act_bits=2, first_last_bits="same"))
    batches = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    calibrate(model, batches[0])
    before = model[1].running_mean.clone()
    assert recalibrate_bn(model, iter([])) == 0  # no data: statistics unchanged
    torch.testing.assert_close(model[1].running_mean, before)
    model.eval()
    assert recalibrate_bn(model, batches) == 3
    assert not model.training and model[1].momentum == 0.1
    with torch.no_grad():
        conv_out = torch.cat([model[0](x) for x in batches])  # the quantized conv's outputs
    torch.testing.assert_close(model[1].running_mean, conv_out.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-5)


def test_lsq_step_pushed_through_zero_acts_as_its_magnitude():
    q = LSQQuantizer(QuantSpec(4, signed=True), init=torch.randn(64))
    with torch.no_grad():
        q.step.fill_(-0.5)  # what one too-large optimizer step can do
    x = torch.randn(64, requires_grad=True)
    y = q(x)
    y.sum().backward()
    assert torch.isfinite(y).all() and float(q.scale()) == 0.5
    assert torch.isfinite(q.step.grad).all()
    with torch.no_grad():
        q.step.fill_(0.5)
        torch.testing.assert_close(q(x), y)  # the magnitude is the step in use


def test_the_quantizer_names_a_config_accepts_are_the_quantizers_there_are():
    """qkd.quant.config names them without importing torch; the registry of qkd.quant.quantizer fills itself."""
    from qkd.quant.config import QUANTIZER_NAMES
    from qkd.quant.quantizer import QUANTIZERS

    assert sorted(QUANTIZERS) == sorted(QUANTIZER_NAMES)


# ----- integer zero point (interval) -----------------------------------------------------------------
def _trained_interval(integer_zero_point: bool) -> nn.Module:
    """A W2A2 interval model with a signed input (its first quantizer learns its lower bound), after SGD steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4))
    config = QuantConfig(weight_bits=2, act_bits=2, method="interval", first_last_bits="same",
                         integer_zero_point=integer_zero_point)  # fmt: skip
    quantize_model(model, config)
    x = _randn(7, 32, 1, 6, 6)
    calibrate(model, x)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(5):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), torch.arange(32) % 4).backward()
        opt.step()
    return model


def test_integer_zero_point_keeps_the_grid_offset_a_whole_number_of_steps():
    model = _trained_interval(integer_zero_point=True)
    grids = [q.affine() for _, q in quantizers(model)]
    ratios = torch.cat([(offset / scale).reshape(-1) for scale, offset, _, _ in grids])
    assert torch.allclose(ratios, ratios.round(), atol=1e-6), ratios
    assert (ratios != 0).any()  # signed grids learned a non-zero lower bound, now an integer zero point
    # the forward uses that grid: every output is offset + scale * an integer code
    q = model[0].weight_quant
    scale, offset, qn, qp = q.affine()
    codes = (q(model[0].weight.detach()).double() - offset) / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and qn <= codes.round().min() and codes.round().max() <= qp
    without = _trained_interval(integer_zero_point=False)
    free = torch.cat([(o / s).reshape(-1) for s, o, _, _ in (q.affine() for _, q in quantizers(without))])
    assert not torch.allclose(free, free.round(), atol=1e-3)  # the test can fail: free bounds are not integral


def test_integer_zero_point_off_is_the_interval_kernel_unchanged():
    """Off (the default), the quantizer is the interval kernel on its learned bounds, bit for bit, forward and
    backward."""
    torch.manual_seed(0)
    spec = QuantSpec(bits=2, signed=True, per_channel=True, method="interval")
    w = torch.randn(8, 3, 3, 3)
    q = make_quantizer(spec, init=w)
    with torch.no_grad():
        q.lower.sub_(0.0123)  # a lower bound that is no multiple of the step
    x = torch.randn(8, 3, 3, 3, requires_grad=True)
    y = q(x)
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    lower, upper = q.lower.detach().clone().requires_grad_(True), q.upper.detach().clone().requires_grad_(True)
    y2 = interval_fake_quant(x2, lower, upper, 4, q._grad_scale(x2))
    y2.sum().backward()
    assert torch.equal(y, y2) and torch.equal(x.grad, x2.grad)
    assert torch.equal(q.lower.grad, lower.grad) and torch.equal(q.upper.grad, upper.grad)
    snapped = make_quantizer(QuantSpec(bits=2, signed=True, per_channel=True, method="interval",
                                       integer_zero_point=True), init=w)  # fmt: skip
    snapped.load_state_dict(q.state_dict())
    assert not torch.equal(snapped(x.detach()), y.detach())  # on, the same bounds give another grid


def test_integer_zero_point_is_for_interval_only():
    with pytest.raises(ValueError, match="integer_zero_point applies to method interval"):
        QuantConfig(method="lsq", integer_zero_point=True)
