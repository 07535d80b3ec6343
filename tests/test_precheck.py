"""Before any training, one batch through the student and the teacher: what a new user gets wrong is one line
(issue 25), nothing is written, and the check changes neither the models nor any random state. Modules that
compute with weights of their own are listed float; a student with no Conv/Linear layer is refused."""

import copy
import logging
import random
import re

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

import qkd
from helpers import TINY, UserNet, digits_loaders, qkd_in_process, same_weights, user_models
from qkd.config import TrainConfig
from qkd.errors import QKDError
from qkd.quant import quantization_summary, quantize_model
from qkd.quant.convert import quantizers
from qkd.train.precheck import check_first_batch
from qkd.train.trainer import Trainer


def _digits() -> tuple[torch.Tensor, torch.Tensor]:
    x, y = digits_loaders()[0].dataset.tensors
    return x[:200].clone(), y[:200].clone()


def _two_batches(x: torch.Tensor, y: torch.Tensor) -> list:
    return [(x[:100], y[:100]), (x[100:], y[100:])]


class TupleNet(UserNet):
    def forward(self, x):
        return super().forward(x), x


class DictNet(UserNet):
    def forward(self, x):
        return {"logits": super().forward(x)}


class OwnConv(nn.Module):
    """Holds its own weight and convolves with it (no nn.Conv2d inside)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)

    def forward(self, x):
        return F.conv2d(x, self.weight, padding=1)


class OwnConvNet(nn.Module):
    """One own-weight conv, then real layers and normalisation layers (a LayerNorm with a 2-D weight)."""

    def __init__(self) -> None:
        super().__init__()
        self.own = OwnConv(1, 8)
        self.norm = nn.LayerNorm([8, 8])
        self.conv = nn.Conv2d(8, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 10)

    def forward(self, x):
        x = F.relu(self.bn(self.conv(self.norm(self.own(x)))))
        return self.head(x.mean((2, 3)))


class OwnLinearModel(nn.Module):
    """A model with no Conv/Linear layer: it computes its logits with F.linear on its own weight."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(10, 64) * 0.1)

    def forward(self, x):
        return F.linear(x.flatten(1), self.weight)


def _with(change):
    """qkd.fit arguments with ``change(x, y)`` applied to the images and labels (on copies)."""

    def make():
        x, y = _digits()
        change(x, y)
        return {"train": _two_batches(x, y)}

    return make


MISTAKES = {
    "student is a class": (lambda: {"student": UserNet}, r"the student is the class UserNet, not a model: pass an"),
    "teacher is a class": (lambda: {"teacher": UserNet}, r"the teacher is the class UserNet, not a model"),
    "forward returns a tuple": (lambda: {"student": TupleNet(8)}, r"student's forward returns a tuple; qkd needs"),
    "forward returns a dict": (lambda: {"student": DictNet(8)}, r"returns a dict \(keys \['logits'\]\)"),
    "float labels": (
        lambda: {"train": [(x, y.float()) for x, y in _two_batches(*_digits())]},
        r"labels must be class indices.* float32 labels of shape \(100,\): give them as y.long\(\)",
    ),
    "one-hot labels": (
        lambda: {"train": [(x, F.one_hot(y, 10).float()) for x, y in _two_batches(*_digits())]},
        r"shape \(100, 10\): take y.argmax\(1\)",
    ),
    "label = class count": (_with(lambda x, y: y.__setitem__(0, 10)), r"holds label 10, but the student has 10 outp"),
    "negative label": (_with(lambda x, y: y.__setitem__(0, -1)), r"holds label -1; labels are class indices 0..9"),
    "x and y lengths": (
        lambda: {"train": [(x, y[:-1]) for x, y in _two_batches(*_digits())]},
        r"has 100 images but 99 labels",
    ),
    "uint8 images": (
        lambda: {"train": [(((x + 1) * 8).to(torch.uint8), y) for x, y in _two_batches(*_digits())]},
        r"images of the first training batch are uint8, not floating point",
    ),
    "3 channels into 1": (
        lambda: {"train": [(x.expand(-1, 3, -1, -1), y) for x, y in _two_batches(*_digits())]},
        r"student cannot run on the first training batch, of shape \(100, 3, 8, 8\); its first layer 'stem.0' "
        r"takes 1 input channel\(s\), the batch has 3: ",
    ),
    "empty train": (lambda: {"train": []}, r"the train data gave no batch \(it is empty\)"),
    "pretrain as a string": (
        lambda: {"pretrain": {"teacher": "5"}},
        r"pretrain\['teacher'\] takes the epochs of float training, an int >= 0 or \(epochs, lr\), not '5'",
    ),
    "teacher over 12 classes": (
        lambda: {"teacher": UserNet(8, classes=12)},
        r"the teacher has 12 outputs and the student 10: .*same num_classes",
    ),
    "NaN in the images": (
        _with(lambda x, y: x[3].view(-1).__setitem__(5, float("nan"))),
        r"1 of the 100 images of the first training batch holds NaN or inf",
    ),
    "no Conv/Linear layer": (
        lambda: {"student": OwnLinearModel()},
        r"the student has no nn.Conv2d/nn.Linear layer .*nothing to quantize; it computes with weights it holds "
        r"itself \(\(the model itself\)\)",
    ),
}


@pytest.mark.parametrize("case", list(MISTAKES))
def test_a_new_users_mistake_is_one_line_before_training(tmp_path, case):
    make, needle = MISTAKES[case]
    x, y = _digits()
    args = {"student": UserNet(8), "teacher": UserNet(8), "train": _two_batches(x, y), **make()}
    with pytest.raises(QKDError) as err:
        qkd.fit(args.pop("student"), args.pop("teacher"), args.pop("train"), [(x, y)], method="kd", epochs=1,
                out=tmp_path / "r", **args)  # fmt: skip
    message = str(err.value)
    assert "\n" not in message and re.search(needle, message), message
    assert type(err.value) is QKDError  # not a divergence, found after training began
    assert not (tmp_path / "r").exists()


def test_the_check_leaves_the_models_and_every_random_state_as_they_were():
    student, teacher = user_models()
    student = quantize_model(student)  # a student quantized by an interrupted fit, resumed in a notebook
    student.stem.eval()  # a submodule the user keeps in eval mode
    train, _ = digits_loaders()  # shuffled: its first batch draws from the global generator
    trainer = Trainer(student, teacher, train, config=TrainConfig(method="kd", epochs=1))
    weights = copy.deepcopy(student.state_dict()), copy.deepcopy(teacher.state_dict())
    flags = [m.training for m in (*student.modules(), *teacher.modules())]
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy()
    check_first_batch(trainer)
    assert torch.equal(torch.get_rng_state(), states[0]) and random.getstate() == states[1]
    assert np.array_equal(np.random.get_state()[1], states[2])
    assert same_weights(student.state_dict(), weights[0]) and same_weights(teacher.state_dict(), weights[1])
    assert [m.training for m in (*student.modules(), *teacher.modules())] == flags
    assert not any(bool(q.initialized) for n, q in quantizers(student) if n.endswith("act_quant"))  # ran in float


def test_a_module_computing_with_its_own_weight_is_listed_float(caplog):
    """A module that calls F.conv2d on its own parameter trains in float: the table says so, and counts it."""
    with caplog.at_level(logging.WARNING, logger="qkd"):
        summary = quantization_summary(quantize_model(OwnConvNet(), qkd.QuantConfig(first_last_bits="same")))
    why = "float: computes with F.conv2d on its own parameters; qkd quantizes nn.Conv2d/nn.Linear modules"
    assert [(r["name"], r["type"], r["how"]) for r in summary.rows] == [
        ("own", "OwnConv", why),
        ("conv", "Conv2d", "swapped"),
        ("head", "Linear", "swapped"),
    ]  # the LayerNorm's 2-D weight and the BatchNorm are no layers
    assert str(summary).splitlines()[-1] == "2 quantized, 1 float"
    assert any("own" in r.getMessage() and "F.conv2d" in r.getMessage() for r in caplog.records)
    row = quantization_summary(OwnLinearModel()).rows
    assert row == [{"name": "(the model itself)", "type": "OwnLinearModel", "weight_bits": None, "act_bits": None,
                    "weight_grid": "", "how": why.replace("F.conv2d", "F.linear")}]  # fmt: skip


def test_fit_counts_an_own_weight_module_as_float():
    x, y = _digits()
    result = qkd.fit(OwnConvNet(), None, _two_batches(x, y), [(x, y)], method="qat", epochs=1,
                     quant=qkd.QuantConfig(bn_batches=1), runtime={"kernels": "eager"})  # fmt: skip
    assert result.summary["layers"] == {"quantized": 2, "float": 1}


def test_cli_run_with_a_teacher_over_other_classes_is_one_line(tmp_path):
    res = qkd_in_process("run", *TINY, "teacher.kwargs={width: 8, num_classes: 12}", "--name", "r",
                         "--out", str(tmp_path))  # fmt: skip
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2 and len(lines) == 1, res.stderr
    assert lines[0].startswith("qkd: error: the teacher has 12 outputs and the student 10"), lines[0]
    assert not (tmp_path / "r").exists()


def test_a_divergence_on_non_finite_images_says_so():
    """NaN images after the checked first batch still end in a divergence; its message names them as the cause."""
    x, y = _digits()
    x[150, 0, 4, 4] = float("nan")  # in the second batch
    with pytest.raises(qkd.Diverged, match=r"loss nan at step 2 \(the training images held NaN or inf values: clean"):
        qkd.fit(UserNet(8), None, _two_batches(x, y), [(x[:100], y[:100])], method="qat", epochs=1,
                quant=qkd.QuantConfig(bn_batches=0), runtime={"kernels": "eager"})  # fmt: skip
