"""The live view of a run: TensorBoard events (an optional extra), the start-up banner, the per-stage progress bar."""

import io
import json
import logging
import re
import signal
import sys

import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import qkd
from helpers import StopAfter
from qkd.errors import QKDError
from qkd.quant import calibrate, quantized_layers
from qkd.train import live
from qkd.train.stages import Stage
from qkd.train.state import RunState

PHASES = [{"name": "self_study", "epochs": 1}, {"name": "co_study", "epochs": 2}, {"name": "tutor", "epochs": 1}]
# fp_teacher 1 epoch (step 1), 1_self_study (2), 2_co_study (3, 4), 3_tutor (5); 4 training steps an epoch
SETTINGS = dict(pretrain={"teacher": (1, 0.2)}, phases=PHASES, quant=qkd.QuantConfig(weight_bits=3, act_bits=3),
                optim={"lr": 0.2}, device="cpu")  # fmt: skip
QAT = dict(method="qat", epochs=1, quant=qkd.QuantConfig(weight_bits=3, act_bits=3), device="cpu")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    pass


def _data():
    digits = load_digits()
    x = torch.tensor(digits.images[:600], dtype=torch.float32).unsqueeze(1) / 8 - 1
    y = torch.tensor(digits.target[:600])
    train = DataLoader(TensorDataset(x[:400], y[:400]), batch_size=100, shuffle=True)
    return train, DataLoader(TensorDataset(x[400:], y[400:]), batch_size=200)


def _net(width: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Conv2d(width, width, 3, stride=2, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))  # fmt: skip


def _models():
    torch.manual_seed(0)
    return _net(8), _net(16)


class Interrupt:
    """A train loader that, on its ``n``-th pass (each epoch, the calibration draw and the pre-check's batch are one),
    crashes or asks for a graceful stop (SIGINT, as Ctrl-C) at its second batch."""

    def __init__(self, loader, n: int, how: str) -> None:
        self.loader, self.n, self.how = loader, n, how

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        self.n -= 1
        for k, batch in enumerate(self.loader):
            if self.n == 0 and k == 1:
                if self.how == "crash":
                    raise RuntimeError("crash")
                signal.raise_signal(signal.SIGINT)
            yield batch


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _events(run_dir) -> dict[str, list[tuple[int, float | str]]]:
    """``{tag: [(step, value)]}`` as TensorBoard's loader reads them; texts under ``text``. (The plugin accumulator,
    as the server uses: the older ``event_accumulator`` does not purge text events on a restart.)"""
    from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
    from tensorboard.util.tensor_util import make_ndarray

    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    events = {t: [(e.step, make_ndarray(e.tensor_proto)) for e in acc.Tensors(t)] for t in acc.Tags()["tensors"]}
    text = [(step, value.item().decode()) for step, value in events.pop("stages/text_summary")]
    return {t: [(step, value.item()) for step, value in points] for t, points in events.items()} | {"text": text}


def test_events_follow_the_run_and_a_resumed_run_continues_them_without_duplicates(tmp_path, caplog, monkeypatch):
    """Every scalar of an uninterrupted run, then the same run cut four ways (a crash right after quantizing, a
    graceful stop inside an epoch, a stop between epochs of a stage, a stop at a stage's end) and resumed each time:
    the same tags at the same steps with the same values."""
    pytest.importorskip("tensorboard")
    train, val = _data()
    full = _events(qkd.fit(*_models(), train, val, val, out=tmp_path / "full", **SETTINGS).run_dir)
    steps = {tag: [s for s, _ in points] for tag, points in full.items()}
    for tag in ("train/loss", "train/acc", "train/lr", "val/acc", "time/epoch_s", "run/stage"):
        assert steps[tag] == [1, 2, 3, 4, 5], tag
    assert [v for _, v in full["run/stage"]] == [0, 1, 2, 2, 3]  # the phase boundaries
    assert steps["val/teacher_acc"] == [3, 4]  # co-study
    assert steps["stage_end/teacher_val"] == steps["stage_end/teacher_test"] == [1, 4]  # fp_teacher, co-study
    assert steps["stage_end/student_val"] == steps["stage_end/student_test"] == [2, 4, 5]
    quant = sorted(t for t in steps if t.startswith("quant/"))
    assert quant == [f"quant/{layer}/{kind}_step" for layer in ("0", "3", "8") for kind in ("a", "w")]
    assert all(steps[t] == [1, 2, 3, 4, 5] for t in quant)  # as calibrated (step 1), then after every epoch
    assert [s for s, _ in full["text"]] == [0, 1, 2, 4] and "2_co_study" in full["text"][2][1]
    metrics = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert [v for _, v in full["train/loss"]] == pytest.approx([r["train_loss"] for r in metrics])

    run = tmp_path / "cut"
    with pytest.raises(RuntimeError, match="crash"):  # in 1_self_study's first epoch: after the calibration
        qkd.fit(*_models(), Interrupt(train, 4, "crash"), val, val, out=run, **SETTINGS)
    with pytest.raises(KeyboardInterrupt):  # a graceful stop in 2_co_study's first epoch, after its 2nd step
        qkd.fit(*_models(), Interrupt(train, 4, "stop"), val, val, out=run, resume=True, **SETTINGS)
    terminal = _Terminal()
    with monkeypatch.context() as m, pytest.raises(KeyboardInterrupt):  # between co-study's epochs
        m.setattr(sys, "stderr", terminal)
        qkd.fit(*_models(), train, val, val, out=run, resume=True, on_epoch_end=StopAfter(1), **SETTINGS)
    assert re.search(r"2_co_study.* 2/8 ", terminal.getvalue())  # the resumed stage's bar starts at its 2nd step
    with pytest.raises(KeyboardInterrupt):  # after co-study's last epoch, before the stage's end
        qkd.fit(*_models(), train, val, val, out=run, resume=True, on_epoch_end=StopAfter(1), **SETTINGS)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="qkd"):
        qkd.fit(*_models(), train, val, val, out=run, resume=True, **SETTINGS)
    assert "resuming from 2_co_study after epoch 2 of 2" in caplog.text
    cut = _events(run)
    assert cut.keys() == full.keys()
    for tag, points in full.items():
        assert [s for s, _ in cut[tag]] == [s for s, _ in points], tag  # no step twice, none missing
        if tag == "text":
            assert cut[tag] == points
        elif tag != "time/epoch_s":
            assert [v for _, v in cut[tag]] == pytest.approx([v for _, v in points], rel=1e-5), tag


def test_without_the_package_the_run_goes_on_and_true_says_how_to_install(tmp_path, caplog, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed (import raises ImportError)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    train, val = _data()
    with caplog.at_level(logging.INFO, logger="qkd"):
        result = qkd.fit(_net(8), None, train, val, out=tmp_path / "auto", **QAT)
    assert result.summary["stages"]["1_self_study"]["val"] > 0
    assert not (tmp_path / "auto" / "tensorboard").exists()
    said = [r for r in caplog.records if "TensorBoard" in r.getMessage()]
    assert len(said) == 1 and said[0].levelname == "INFO" and "pip install tensorboard" in said[0].getMessage()
    with pytest.raises(QKDError, match=r"^runtime.tensorboard=true needs the tensorboard package: pip install"):
        qkd.fit(_net(8), None, train, val, out=tmp_path / "true", runtime={"tensorboard": True}, **QAT)
    assert not (tmp_path / "true").exists()  # refused before anything is written


def test_tensorboard_off_and_without_a_run_folder(tmp_path, caplog):
    train, val = _data()
    with caplog.at_level(logging.INFO, logger="qkd"):
        qkd.fit(_net(8), None, train, val, out=tmp_path / "off", runtime={"tensorboard": False}, **QAT)
        qkd.fit(_net(8), None, train, val, **QAT)  # auto, no run folder: nothing written, nothing said
    assert not (tmp_path / "off" / "tensorboard").exists() and "TensorBoard events are off" not in caplog.text
    with pytest.raises(QKDError, match="pass out="):
        qkd.fit(_net(8), None, train, val, runtime={"tensorboard": True}, **QAT)


def test_banner_says_what_the_run_will_do(tmp_path, caplog):
    train, val = _data()
    with caplog.at_level(logging.INFO, logger="qkd"):
        qkd.fit(*_models(), train, val, out=tmp_path / "r", method="qkd", epochs=3, split=(0.34, 0.33, 0.33),
                runtime={"tensorboard": False}, device="cpu")  # fmt: skip
    banner = next(r.getMessage() for r in caplog.records if r.getMessage().startswith("qkd "))
    lines = banner.splitlines()
    assert lines[0].startswith("qkd ") and "qkd at W4A4 (lsq) on cpu in float32, 1 process" in lines[0]
    assert lines[1] == f"run folder {tmp_path / 'r'}"
    assert lines[2] == "data: train 4 batches (400 images), val 1 batch (200 images)"
    assert [ln.split()[0] for ln in lines[3:]] == ["1_self_study", "2_co_study", "3_tutor"]
    assert "1 epoch x 4 steps, lr 0.01, quantized student, with the teacher (trained too, lr 0.001)" in lines[4]
    assert len(lines) == 6


def test_the_bar_covers_a_stage_and_shows_on_a_terminal_only(monkeypatch):
    stage = Stage("2_co_study", "co_study", epochs=4, lr=0.1, teacher_lr=0.01, quantized=True)
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # a log file, a pipe
    assert live.stage_bar(stage, 10).disable
    monkeypatch.setattr(sys, "stderr", _Terminal())
    with live.stage_bar(stage, 10, done=25) as bar:  # resumed in the third epoch
        assert not bar.disable and bar.total == 40 and bar.n == 25
    assert "25/40" in sys.stderr.getvalue()


def test_quantizer_tags_of_both_quantizers_weights_and_inputs():
    class Writer:  # what Events asks of a SummaryWriter
        def __init__(self, folder, purge_step):
            self.scalars = {}

        def add_scalar(self, tag, value, step):
            self.scalars[tag] = (step, value)

    for method, names in (("lsq", ["step"]), ("interval", ["lower", "upper"])):
        model = qkd.quantize_model(_net(8), qkd.QuantConfig(method=method, weight_bits=3, act_bits=3))
        calibrate(model, torch.randn(16, 1, 8, 8))
        events = live.Events(Writer, None, [], 4, state=RunState(), inside_epoch=False,
                             student=model)  # fmt: skip
        events.quantizers(model, 7)
        layers = dict(quantized_layers(model))
        assert sorted(events.writer.scalars) == sorted(f"quant/{layer}/{kind}_{name}" for layer in layers
                                                  for kind in ("a", "w") for name in names)  # fmt: skip
        q = layers["3"].weight_quant  # per-channel: the mean over the channels, of the value in use
        want = q.step.abs().mean() if method == "lsq" else q.upper.mean()
        assert events.writer.scalars[f"quant/3/w_{names[-1]}"] == (7, pytest.approx(want.item()))


def test_each_new_event_file_sorts_after_the_earlier_ones(tmp_path):
    """TensorBoard reads a folder's event files in name order; within one second the names of one process's
    writers differ only in a counter (their last field), and counter 10 sorts before 9. A run resumed again and
    again within a second (here, writers made in a row until the counter gains a digit) keeps its files in order."""
    writer = live.tensorboard_writer(True, tmp_path)
    made = []
    while len(made) < 2 or len(made[-1].split(".")[-1]) == len(made[0].split(".")[-1]):
        before = {p.name for p in tmp_path.glob("events.out.tfevents.*")}
        live.event_writer(writer, tmp_path).close()
        (name,) = {p.name for p in tmp_path.glob("events.out.tfevents.*")} - before
        made.append(name)
    assert sorted(made) == made
