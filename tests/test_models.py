"""Model zoo: every registered model builds and runs, checkpoints load, and bad input fails clearly."""

from __future__ import annotations

import subprocess
import sys
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from helpers import SHARED_DATA
from qkd.errors import QKDError
from qkd.models import create_model, list_models, load_pretrained

RESNET20_CKPT = SHARED_DATA / "weights" / "resnet20-12fca82f.th"
CIFAR_TEST = SHARED_DATA / "cifar10-jpeg-test.npz"
AKAMASTER = {
    "resnet20": "resnet20-12fca82f.th",
    "resnet32": "resnet32-d509ac18.th",
    "resnet44": "resnet44-014dd654.th",
    "resnet56": "resnet56-4bfd9763.th",
}
SKIP_FORWARD = {"tv_resnet50"}  # the slowest to build; the other torchvision models cover the wrapper


def _input_shape(name: str) -> tuple[int, int, int]:
    if name.startswith("tiny_"):
        return (1, 8, 8)
    if name.startswith("tv_"):
        return (3, 64, 64)
    return (3, 32, 32)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.mark.parametrize("name", [n for n in list_models() if n not in SKIP_FORWARD])
def test_every_model_forward_shape(name: str) -> None:
    model = create_model(name, num_classes=7).eval()
    with torch.no_grad():
        out = model(torch.randn(2, *_input_shape(name)))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()


def test_expected_models_registered() -> None:
    expected = {"resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "mobilenetv2_cifar"}
    expected |= {"tiny_cnn", "tiny_cnn_wide", "tiny_mlp", "tv_resnet18", "tv_resnet34", "tv_resnet50"}
    expected |= {"tv_mobilenet_v2"}
    assert expected <= set(list_models())
    assert list_models() == sorted(list_models())


@pytest.mark.parametrize(
    ("name", "params"),
    [("resnet20", 269_722), ("resnet32", 464_154), ("resnet44", 658_586), ("resnet56", 853_018)],
)
def test_cifar_resnet_parameter_counts(name: str, params: int) -> None:
    model = create_model(name, num_classes=10)
    assert sum(p.numel() for p in model.parameters()) == params


def test_cifar_resnet_shortcut_has_no_parameters() -> None:
    model = create_model("resnet20")
    assert not any("shortcut" in k for k in model.state_dict())


def test_mobilenetv2_has_depthwise_convs() -> None:
    model = create_model("mobilenetv2_cifar")
    depthwise = [
        m
        for m in model.modules()
        if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels == m.out_channels
    ]
    assert len(depthwise) == 17  # one per inverted residual block


def test_mobilenetv2_width_mult_shrinks_model() -> None:
    full = sum(p.numel() for p in create_model("mobilenetv2_cifar").parameters())
    half = sum(p.numel() for p in create_model("mobilenetv2_cifar", width_mult=0.5).parameters())
    assert half < full


def test_unknown_model_lists_valid_names() -> None:
    with pytest.raises(QKDError, match="unknown model 'resnet9000'") as info:
        create_model("resnet9000")
    assert "resnet20" in str(info.value) and "tiny_cnn" in str(info.value)


def test_bad_model_argument_is_user_error() -> None:
    with pytest.raises(QKDError, match="tiny_cnn"):
        create_model("tiny_cnn", depth=3)


def test_tv_pretrained_needs_imagenet_classes() -> None:
    with pytest.raises(QKDError, match="num_classes=1000"):
        create_model("tv_resnet18", num_classes=10, pretrained=True)


def test_tv_pretrained_download_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    def offline(*args: object, **kwargs: object) -> nn.Module:
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(torchvision.models, "get_model", offline)
    with pytest.raises(QKDError, match="could not download.*local checkpoint"):
        create_model("tv_resnet18", num_classes=1000, pretrained=True)


def _trained_like_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state dict that differs from a fresh model's, so a successful load is observable."""
    return {k: v + 1 if v.is_floating_point() else v for k, v in model.state_dict().items()}


def test_load_pretrained_round_trip_with_wrappers(tmp_path: Path) -> None:
    source = create_model("tiny_cnn")
    state = _trained_like_state(source)
    wrapped = {f"module.{k}": v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": wrapped, "epoch": 3}, path)

    target = create_model("tiny_cnn")
    load_pretrained(target, path)
    for key, value in target.state_dict().items():
        if not key.endswith("num_batches_tracked"):
            torch.testing.assert_close(value, state[key])


@pytest.mark.parametrize("wrapper", ["raw", "model"])
def test_load_pretrained_other_layouts(tmp_path: Path, wrapper: str) -> None:
    state = _trained_like_state(create_model("tiny_mlp"))
    path = tmp_path / "ckpt.pt"
    torch.save(state if wrapper == "raw" else {"model": state}, path)
    target = create_model("tiny_mlp")
    load_pretrained(target, str(path))
    torch.testing.assert_close(target.state_dict()["1.weight"], state["1.weight"])


def test_load_pretrained_shape_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "ten.pt"
    torch.save(create_model("tiny_cnn", num_classes=10).state_dict(), path)
    with pytest.raises(QKDError, match=r"does not fit the model: fc.weight has shape \(10, 32\)"):
        load_pretrained(create_model("tiny_cnn", num_classes=5), path)


def test_load_pretrained_wrong_architecture(tmp_path: Path) -> None:
    path = tmp_path / "mlp.pt"
    torch.save(create_model("tiny_mlp").state_dict(), path)
    with pytest.raises(QKDError, match="missing keys .*unexpected keys"):
        load_pretrained(create_model("tiny_cnn"), path)


def test_load_pretrained_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QKDError, match="checkpoint not found"):
        load_pretrained(create_model("tiny_cnn"), tmp_path / "nope.pt")


def test_load_pretrained_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "garbage.pt"
    path.write_bytes(b"this is not a checkpoint")
    with pytest.raises(QKDError, match="garbage.pt"):
        load_pretrained(create_model("tiny_cnn"), path)


@pytest.mark.parametrize("name", sorted(AKAMASTER))
def test_akamaster_checkpoints_load(name: str) -> None:
    path = SHARED_DATA / "weights" / AKAMASTER[name]
    if not path.is_file():
        pytest.skip(f"{path} not available")
    load_pretrained(create_model(name), path)


@pytest.mark.skipif(not (RESNET20_CKPT.is_file() and CIFAR_TEST.is_file()), reason="shared CIFAR data absent")
def test_resnet20_checkpoint_accuracy() -> None:
    with np.load(CIFAR_TEST) as data:
        x, y = data["x"][::10], data["y"][::10]  # sorted by class: every 10th gives 100 per class
    model = create_model("resnet20")
    load_pretrained(model, RESNET20_CKPT)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    images = (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - mean) / std
    with torch.no_grad():
        preds = model.eval()(images).argmax(1)
    accuracy = (preds == torch.from_numpy(y)).float().mean().item()
    assert accuracy > 0.75


def test_models_by_import_path_and_timm_name():
    model = create_model("torchvision.models:squeezenet1_0", num_classes=7)  # a factory by import path
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 7)
    with pytest.raises(QKDError, match="has no attribute 'nope'"):
        create_model("torchvision.models:nope")
    try:
        import timm  # noqa: F401
    except ImportError:
        with pytest.raises(QKDError, match="pip install timm"):
            create_model("timm:resnet18")
        return
    assert create_model("timm:resnet18", num_classes=3)(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    with pytest.raises(QKDError, match="timm has no model"):
        create_model("timm:no_such_net")


def test_a_factory_beside_you_is_found_as_the_installed_qkd_script_runs(tmp_path: Path) -> None:
    """The installed ``qkd`` script's sys.path holds its bin folder, not the working directory (``python -m qkd``'s
    does): ``student.name=mynets:build`` was "cannot import mynets" there."""
    (tmp_path / "mynets.py").write_text("def build(num_classes=10):\n    return num_classes\n")
    code = ("import os, sys\nsys.path[:] = [p for p in sys.path if p not in ('', os.getcwd())]\n"
            "from qkd.plugins import load_object\nprint(load_object('mynets:build', 'student.name')())")  # fmt: skip
    res = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "10", res.stderr[-1500:]
