"""Transformer-style torchvision families (ViT, Swin, ConvNeXt, MaxViT) through quantization and QDQ ONNX.

Tiny configurations of torchvision's own classes: their attention projections are quantized (nn.MultiheadAttention
and Swin's window attention call their Linear layers once swapped), the QDQ ONNX keeps every quantized layer as
``DequantizeLinear(integer initializer) -> Conv/MatMul/Gemm`` with LayerNorm, GELU, softmax and the attention
matmuls as float islands between, and onnxruntime agrees with the fake-quant model. The integer formats refuse them,
naming the op.
"""

from __future__ import annotations

import copy

import onnx
import pytest
import torch
from onnx import TensorProto, numpy_helper
from torch import nn
from torchvision.models import VisionTransformer
from torchvision.models.convnext import CNBlockConfig, ConvNeXt
from torchvision.models.maxvit import MaxVit
from torchvision.models.swin_transformer import (
    ShiftedWindowAttention,
    ShiftedWindowAttentionV2,
    SwinTransformer,
    SwinTransformerBlockV2,
)

from qkd.errors import QKDError
from qkd.export import compare, export_onnx_int, onnx_runner, to_int_program
from qkd.export.api import export_student
from qkd.export.onnx_qdq import export_onnx
from qkd.quant import (
    QLinear,
    QuantConfig,
    calibrate,
    dequantize_model,
    quantization_disabled,
    quantization_summary,
    quantize_model,
    quantized_layers,
)
from qkd.quant.attention import LinearMultiheadAttention, swap_attention

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 32


def _vit() -> nn.Module:
    return VisionTransformer(image_size=SIZE, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                             num_classes=10)  # fmt: skip


def _swin() -> nn.Module:  # two stages: windows shifted, a patch merging, a window larger than the last map
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=10)  # fmt: skip


def _swin_v2() -> nn.Module:
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2], num_heads=[2], window_size=[4, 4],
                           num_classes=10, block=SwinTransformerBlockV2)  # fmt: skip


def _convnext() -> nn.Module:
    return ConvNeXt([CNBlockConfig(8, 16, 1), CNBlockConfig(16, None, 1)], num_classes=10)


def _maxvit() -> nn.Module:
    return MaxVit(input_size=(SIZE, SIZE), stem_channels=8, partition_size=2, block_channels=[8, 16],
                  block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.1, num_classes=10)  # fmt: skip


FAMILIES = {"vit": _vit, "swin": _swin, "swin_v2": _swin_v2, "convnext": _convnext, "maxvit": _maxvit}


def _spread(model: nn.Module) -> nn.Module:
    """Weights that give distinct logits: torchvision zeroes ViT's head and starts ConvNeXt's layer scale at 1e-6,
    so at initialisation every image would get the same top-1 and any export would "agree"."""
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2 and "relative_position" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "layer_scale" in name:
                p.fill_(0.5)
    return model


def _quantized(make, bits: int = 4) -> tuple[nn.Module, torch.Tensor]:
    torch.manual_seed(0)
    model, x = _spread(make()), torch.randn(64, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    quantize_model(model, QuantConfig(weight_bits=bits, act_bits=bits))
    calibrate(model, x[:16])
    return model.eval(), x


def _weight_layer_inputs(path) -> list[tuple[str, int | None]]:
    """For each Conv/MatMul/Gemm: (op, the data type of the initializer its weight is dequantized from; None where
    the weight is no DequantizeLinear of an initializer: an activation, or a float weight)."""
    graph = onnx.load(str(path)).graph
    inits, producers = {t.name: t for t in graph.initializer}, {o: n for n in graph.node for o in n.output}
    found = []
    for node in graph.node:
        if node.op_type in ("Conv", "MatMul", "Gemm"):
            dq = producers.get(node.input[1])
            source = inits.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
            found.append((node.op_type, source.data_type if source is not None else None))
            assert node.input[1] not in inits or numpy_helper.to_array(inits[node.input[1]]).ndim < 2, node.name
    return found


@pytest.mark.parametrize("family", FAMILIES)
def test_qdq_export_agrees_and_weights_are_integer(family, tmp_path):
    model, x = _quantized(FAMILIES[family])
    summary = quantization_summary(model)
    assert summary.n_float == 0 and summary.n_quantized == len(list(quantized_layers(model)))
    path = export_onnx(model, x[:2], tmp_path / "m.onnx")
    run = onnx_runner(path)
    result = compare(lambda t: torch.from_numpy(run(t.numpy())), model, [(x, torch.zeros(len(x)))])
    with torch.no_grad():
        assert model(x).argmax(1).unique().numel() > 3  # the agreement means something
    assert result["agreement"] >= 0.99 and result["max_logit_diff"] < 0.5, result
    layers = _weight_layer_inputs(path)
    integer = [op for op, dtype in layers if dtype in (TensorProto.INT8, TensorProto.UINT8)]
    assert len(integer) == summary.n_quantized  # every quantized layer: DQ(int8 codes) -> Conv/MatMul/Gemm
    assert all(dtype is None or dtype in (TensorProto.INT8, TensorProto.UINT8) for _, dtype in layers)


def test_islands_stay_float(tmp_path):
    """LayerNorm, GELU, softmax and the attention matmuls run in float between the quantized layers."""
    model, x = _quantized(_vit)
    graph = onnx.load(str(export_onnx(model, x[:2], tmp_path / "m.onnx"))).graph
    ops = {n.op_type for n in graph.node}
    assert {"LayerNormalization", "Gelu", "Softmax"} <= ops
    layers = _weight_layer_inputs(tmp_path / "m.onnx")
    assert [op for op, dtype in layers if dtype is None] == ["MatMul"] * 4  # q @ k^T and weights @ v, two blocks


def test_export_student_writes_qdq_onnx_of_a_vit(tmp_path):
    """What ``qkd export --format onnx`` runs on a loaded student."""
    model, x = _quantized(_vit, bits=8)
    run = export_student(model, "onnx", tmp_path / "vit.onnx", x[:2], {})
    assert compare(run, model, [(x[:16], torch.zeros(16))])["agreement"] == 1.0


@pytest.mark.parametrize("family", ["vit", "swin", "convnext"])
def test_integer_formats_refuse_by_name(family, tmp_path):
    model, x = _quantized(FAMILIES[family])
    pattern = r"is not supported by the integer formats; the onnx \(QDQ\) format keeps such ops float"
    with pytest.raises(QKDError, match=pattern):
        to_int_program(model, x[:2])
    with pytest.raises(QKDError, match=pattern):
        export_onnx_int(model, x[:2], tmp_path / "m.onnx")


class SelfAttention(nn.Module):
    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.fc, self.attn = nn.Linear(dim, dim), nn.MultiheadAttention(dim, 2, batch_first=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc(x)
        return self.attn(x, x, x)[0]


def test_attention_module_is_refused_as_one():
    model = quantize_model(SelfAttention(), QuantConfig(weight_bits=8, act_bits=8, first_last_bits="same"))
    calibrate(model, torch.randn(2, 3, 16))
    with pytest.raises(QKDError, match=r"module 'attn' \(LinearMultiheadAttention\) is not supported by the integer"):
        to_int_program(model, torch.randn(2, 3, 16))


# ----- nn.MultiheadAttention ------------------------------------------------------------------------------
CALLS = [
    {},
    {"need_weights": False},
    {"average_attn_weights": False},
    {"attn_mask": "float"},
    {"attn_mask": "bool", "key_padding_mask": True},
    {"cross": True},
]


def _call(mha: nn.Module, x: torch.Tensor, kv: torch.Tensor, batch_first: bool, kwargs: dict) -> tuple:
    kwargs = dict(kwargs)
    gen = torch.Generator().manual_seed(2)
    if kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(5, 5, generator=gen)
    elif kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.triu(torch.ones(5, 5, dtype=torch.bool), 1)
    if kwargs.pop("key_padding_mask", False):
        kwargs["key_padding_mask"] = torch.tensor([[False] * 4 + [True]] * 3)
    q, k = (x, kv) if kwargs.pop("cross", False) else (x, x)
    if not batch_first:
        q, k = q.transpose(0, 1), k.transpose(0, 1)
    return mha(q, k, k, **kwargs) if k is not q else mha(q, q, q, **kwargs)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("kwargs", CALLS)
def test_linear_mha_is_torch_mha_in_float(batch_first, bias, kwargs):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, bias=bias, batch_first=batch_first).eval()
    ours = LinearMultiheadAttention.from_float(mha).eval()
    x, kv = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    (want, want_w), (got, got_w) = (_call(m, x, kv, batch_first, kwargs) for m in (mha, ours))
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # torch's fused kernel (need_weights=False) rounds apart
    assert (got_w is None) == (want_w is None)
    if want_w is not None:
        torch.testing.assert_close(got_w, want_w, rtol=0, atol=1e-6)
    got1, _ = ours(x[0], x[0], x[0])  # unbatched
    torch.testing.assert_close(got1, mha(x[0], x[0], x[0])[0], rtol=0, atol=1e-6)


def test_quantized_mha_state_dict_and_float_round_trip():
    """Same keys as torch's (plus the quantizers'), exact with quantizers off, quantized layers when on, and
    nn.MultiheadAttention back from dequantize_model."""
    torch.manual_seed(0)
    model = SelfAttention()
    original = copy.deepcopy(model)
    quantize_model(model, QuantConfig(weight_bits=4, act_bits=4, first_last_bits="same"))
    attn = model.attn
    assert isinstance(attn, LinearMultiheadAttention)
    assert isinstance(attn.in_proj, QLinear) and isinstance(attn.out_proj, QLinear)
    rows = {r["name"]: r["how"] for r in quantization_summary(model).rows}
    assert rows == {"fc": "swapped", "attn.in_proj": "swapped", "attn.out_proj": "swapped"}
    keys = set(model.state_dict())
    assert set(original.state_dict()) <= keys and all("quant" in k for k in keys - set(original.state_dict()))
    loaded = model.load_state_dict(original.state_dict(), strict=False)  # torch's keys load into the swapped form
    assert not loaded.unexpected_keys and all("quant" in k for k in loaded.missing_keys)
    x = torch.randn(2, 5, 16)
    calibrate(model, x)
    with torch.no_grad(), quantization_disabled(model):
        torch.testing.assert_close(model(x), original(x), rtol=0, atol=1e-6)
    with torch.no_grad():
        assert (model(x) - original(x)).abs().max() > 1e-3  # quantized when on
    fresh = SelfAttention()
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if "quant" not in k})
    dequantize_model(model)
    assert type(model.attn) is nn.MultiheadAttention
    assert torch.equal(fresh.attn.in_proj_weight, model.attn.in_proj_weight)


def test_vit_b16_layout_all_quantized():
    """ViT-B/16's layout (12 blocks; narrow, so it is quick): 50 quantized layers, none float (before, its 12 input
    projections were float and its 12 output projections listed float too)."""
    model = VisionTransformer(image_size=SIZE, patch_size=16, num_layers=12, num_heads=2, hidden_dim=8, mlp_dim=16,
                              num_classes=10)  # fmt: skip
    summary = quantization_summary(quantize_model(model, QuantConfig(weight_bits=4, act_bits=4)))
    assert (summary.n_quantized, summary.n_float) == (50, 0)


# ----- Swin ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", [ShiftedWindowAttention, ShiftedWindowAttentionV2])
@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
@pytest.mark.parametrize("side", [8, 6])  # 6: padded to whole windows
def test_swin_attention_calls_its_layers_exactly(cls, shift, side):
    torch.manual_seed(0)
    attn = cls(16, [4, 4], shift, 2).eval()
    model = swap_attention_copy(attn)
    x = torch.randn(2, side, side, 16)
    with torch.no_grad():
        assert torch.equal(model[0](x), attn(x))


def swap_attention_copy(attn: nn.Module) -> nn.Sequential:
    model = nn.Sequential(copy.deepcopy(attn))
    swap_attention(model)
    assert type(model[0]) is not type(attn) and isinstance(model[0], type(attn))
    return model


def test_swin_projections_are_quantized_and_calibrated():
    """Before: Swin's qkv/proj were swapped but never ran (torchvision passes their weights to F.linear)."""
    model, _ = _quantized(_swin)
    for name, layer in quantized_layers(model):
        assert bool(layer.act_quant.initialized), name
    assert any(name.endswith("attn.qkv") for name, _ in quantized_layers(model))
