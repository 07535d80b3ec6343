"""Bring your own model and data: ``qkd.fit`` on a user-written network and a plain DataLoader."""

import json

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

import qkd
from conftest import StopAfter
from qkd.checkpoint import load_checkpoint
from qkd.errors import QKDError


class SamePadConv(nn.Conv2d):
    """A "same"-padding conv with its own forward (as Keras ports and timm's Conv2dSame have)."""

    def __init__(self, cin: int, cout: int, k: int) -> None:
        super().__init__(cin, cout, k, padding=0, bias=False)
        self.same = ((k - 1) // 2, k // 2) * 2

    def forward(self, x):
        return F.conv2d(F.pad(x, self.same), self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class SplitBlock(nn.Module):
    """Channel split (as in ShuffleNetV2): half the channels pass, half go through a conv branch."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(nn.Conv2d(c // 2, c // 2, 3, padding=1, bias=False), nn.BatchNorm2d(c // 2),
                                    nn.ReLU())  # fmt: skip

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return torch.cat([a, self.branch(b)], dim=1)


class UserNet(nn.Module):
    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(SamePadConv(1, width, 3), nn.BatchNorm2d(width), nn.ReLU())
        self.block = SplitBlock(width)
        self.down = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1, bias=False),
                                  nn.BatchNorm2d(2 * width), nn.ReLU())  # fmt: skip
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return self.head(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _loaders():
    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(digits.target)
    train = TensorDataset(x[:1400], y[:1400])
    val = TensorDataset(x[1400:], y[1400:])
    return DataLoader(train, batch_size=100, shuffle=True), DataLoader(val, batch_size=200)


def _models():
    torch.manual_seed(0)
    return UserNet(8), UserNet(16)


SETTINGS = dict(method="qkd", epochs=4, pretrain={"teacher": (3, 0.3), "student": (3, 0.3)},
                quant=qkd.QuantConfig(weight_bits=3, act_bits=3), optim={"lr": 0.1})  # fmt: skip


def test_fit_user_model_and_dataloader_end_to_end_and_exact_resume(tmp_path):
    train, val = _loaders()
    student, teacher = _models()
    result = qkd.fit(student, teacher, train, val, out=tmp_path / "full", **SETTINGS)
    summary = result.summary
    assert list(summary["stages"]) == ["fp_teacher", "fp_student", "1_self_study", "2_co_study", "3_tutor"]
    assert summary["layers"] == {"quantized": 4, "float": 0}  # the same-padding conv included
    assert summary["stages"]["3_tutor"]["val"] > 0.5  # learns (chance is 0.1)
    assert summary["student"] == "UserNet" and result.student is student
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert files >= {"config.yaml", "stages.json", "metrics.jsonl", "quantization.json", "summary.json", "checkpoints"}
    layers = json.loads((tmp_path / "full" / "quantization.json").read_text())["layers"]
    assert [row["name"] for row in layers] == ["stem.0", "block.branch.0", "down.0", "head"]

    student, teacher = _models()
    with pytest.raises(KeyboardInterrupt):  # stopped mid co-study; resumed with the same objects, as in a notebook
        qkd.fit(student, teacher, train, val, out=tmp_path / "part", on_epoch_end=StopAfter(6), **SETTINGS)
    resumed = qkd.fit(student, teacher, train, val, out=tmp_path / "part", resume=True, **SETTINGS)
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["student"]
    b = resumed.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["stages"]["3_tutor"]["val"] == summary["stages"]["3_tutor"]["val"]


def test_fit_exports_the_user_model_exactly(tmp_path):
    from qkd.export.deploy import compare, export_student

    train, val = _loaders()
    student, teacher = _models()
    result = qkd.fit(student, teacher, train, val, **{**SETTINGS, "epochs": 2, "method": "kd"})
    x = next(iter(val))[0][:2]
    for fmt, ext in (("int", "safetensors"), ("onnx-int", "onnx")):
        run = export_student(result.student, fmt, tmp_path / f"user.{ext}", x, {})
        check = compare(run, result.student, val, exact=True)
        assert check["agreement_f64"] == 1.0, (fmt, check)


def test_fit_without_a_run_folder_and_generator_factories():
    train, val = _loaders()
    batches = list(train)

    def stream():  # a generator function: every epoch calls it again
        yield from batches

    def val_stream():
        yield from val

    student = UserNet(8)
    result = qkd.fit(student, None, stream, val_stream, method="qat", epochs=1, steps_per_epoch=len(batches))
    assert result.run_dir is None and result.summary["stages"]["1_self_study"]["val"] > 0
    with pytest.raises(QKDError, match="one-pass iterator"):
        qkd.fit(UserNet(8), None, stream(), val, method="qat", epochs=1)
    with pytest.raises(QKDError, match="no len"):
        qkd.fit(UserNet(8), None, stream, val, method="qat", epochs=1)


def test_fit_bad_input_is_one_line(tmp_path):
    train, val = _loaders()
    with pytest.raises(QKDError, match="need a teacher"):
        qkd.fit(UserNet(8), None, train, val, method="kd", epochs=1)
    with pytest.raises(QKDError, match="method"):
        qkd.fit(UserNet(8), UserNet(8), train, val, method="qdk", epochs=1)
    with pytest.raises(QKDError, match="already quantized"):
        qkd.fit(qkd.quantize_model(UserNet(8)), None, train, val, method="qat", epochs=1)
    with pytest.raises(QKDError, match="override pattern 'haed'"):  # found before the float stages run
        qkd.fit(UserNet(8), None, train, val, method="qat", pretrain={"student": 1}, out=tmp_path / "typo",
                quant=qkd.QuantConfig(overrides={"haed": {"weight_bits": 8}}))  # fmt: skip
    assert not (tmp_path / "typo").exists()
    with pytest.raises(QKDError, match="optim.lr"):
        qkd.fit(UserNet(8), None, train, val, method="qat", optim={"lr": -1})


def test_resume_with_other_settings_is_refused(tmp_path):
    train, val = _loaders()
    qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r")
    with pytest.raises(QKDError, match="differ in epochs"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=2, out=tmp_path / "r", resume=True)
    with pytest.raises(QKDError, match="exists"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r")


def test_resume_starts_a_run_not_yet_there_and_refuses_other_stages(tmp_path):
    train, val = _loaders()
    first = qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r", resume=True)
    again = qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r", resume=True)
    assert again.summary == first.summary  # finished: only reports
    with pytest.raises(QKDError, match="differ in stages"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, pretrain={"student": 1}, out=tmp_path / "r",
                resume=True)  # fmt: skip
