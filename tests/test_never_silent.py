"""Never silently wrong: divergence, graceful stops, damaged checkpoints, unfinished runs, chance-level results."""

import json
import os
import signal

import pytest
import torch

import qkd
from helpers import FIT_SETTINGS, TINY, StopAfter, UserNet, digits_loaders, same_weights, user_models
from helpers import qkd_in_process as cli
from qkd.checkpoint import load_checkpoint, save_checkpoint
from qkd.errors import QKDError
from qkd.train.loop import DivergenceGuard


class SignalAt:
    """The batches of ``loader``; sends this process ``signum`` while yielding the ``n``-th batch of the run."""

    def __init__(self, loader, n: int, signum: int) -> None:
        self.loader, self.n, self.signum = loader, n, signum

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            self.n -= 1
            if self.n == 0:
                os.kill(os.getpid(), self.signum)
            yield batch


def test_sigterm_saves_mid_epoch_and_the_resumed_run_is_bit_identical(tmp_path, full_fit):
    train, val = digits_loaders()
    student, teacher = user_models()
    # 14 batches per epoch: 6 float epochs, the calibration batches, then a few steps into a quantized epoch
    stopping = SignalAt(train, 14 * 6 + 25, signal.SIGTERM)
    with pytest.raises(qkd.Stopped, match=r"stopped by SIGTERM in .* after step \d+; saved") as stop:
        qkd.fit(student, teacher, stopping, val, out=tmp_path / "r", **FIT_SETTINGS)
    assert stop.value.exit_code == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handler is gone after fit
    ckpt = load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")
    assert ckpt["partial"]["step"] > 0 and not ckpt["qkd"]["finished"]
    student, teacher = user_models()
    resumed = qkd.fit(student, teacher, train, val, out=tmp_path / "r", resume=True, **FIT_SETTINGS)
    assert same_weights(resumed.student.state_dict(), full_fit[0].student.state_dict())
    assert same_weights(resumed.teacher.state_dict(), full_fit[0].teacher.state_dict())


@pytest.mark.parametrize("damage", ["truncated", "changed bytes"])
def test_a_damaged_last_checkpoint_falls_back_to_the_previous_one(tmp_path, full_fit, caplog, damage):
    train, val = digits_loaders()
    student, teacher = user_models()
    with pytest.raises(KeyboardInterrupt):
        qkd.fit(student, teacher, train, val, out=tmp_path / "r", on_epoch_end=StopAfter(8), **FIT_SETTINGS)
    last = tmp_path / "r" / "checkpoints" / "last.pt"
    data = bytearray(last.read_bytes())
    if damage == "truncated":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2 : len(data) // 2 + 64] = bytes(64)
    last.write_bytes(bytes(data))
    student, teacher = user_models()
    resumed = qkd.fit(student, teacher, train, val, out=tmp_path / "r", resume=True, **FIT_SETTINGS)
    assert "resuming from previous.pt" in caplog.text
    assert same_weights(resumed.student.state_dict(), full_fit[0].student.state_dict())


def test_no_intact_checkpoint_is_one_line(tmp_path):
    train, val = digits_loaders()
    with pytest.raises(KeyboardInterrupt):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=3, out=tmp_path / "r", on_epoch_end=StopAfter(2))
    for name in ("last.pt", "previous.pt"):
        (tmp_path / "r" / "checkpoints" / name).write_bytes(b"not a checkpoint")
    with pytest.raises(QKDError, match="no intact checkpoint is left"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=3, out=tmp_path / "r", resume=True)


def test_a_disk_without_room_for_the_checkpoints_is_refused_before_training(tmp_path, monkeypatch):
    import shutil

    from qkd.train import rundir

    monkeypatch.setattr(rundir.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 1000, 1000))
    train, val = digits_loaders()
    with pytest.raises(QKDError, match=r"has 0 MiB free; the run's checkpoints need about .* choose another --out"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_second_ctrl_c_stops_at_once():
    from qkd.train.stop import StopRequest

    request, before = StopRequest(), signal.getsignal(signal.SIGINT)  # SIG_IGN in a job started with `&`
    with request.installed():
        assert signal.getsignal(signal.SIGINT) == request._handle
        request._handle(signal.SIGINT, None)  # the first: stop at the next step
        assert request and request.exit_code == 130
        with pytest.raises(KeyboardInterrupt):
            request._handle(signal.SIGINT, None)
    assert signal.getsignal(signal.SIGINT) is before  # the handler in place before training, restored


def test_the_checksum_finds_a_changed_tensor(tmp_path):
    path = tmp_path / "c.pt"
    save_checkpoint({"w": torch.arange(6.0), "meta": {"bits": 3}}, path)
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(6.0))
    raw = torch.load(path, weights_only=True)
    raw["w"][2] = 7.0  # a readable file with other numbers: only the checksum can tell
    torch.save(raw, path)
    with pytest.raises(QKDError, match="does not match its checksum"):
        load_checkpoint(path)


def test_divergence_stops_and_resume_with_a_lower_rate_is_recorded(tmp_path):
    train, val = digits_loaders()
    with pytest.raises(qkd.Diverged, match=r"training diverged in 1_self_study epoch 1: loss .* at step \d+"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=2, optim={"lr": 1e4}, out=tmp_path / "r")
    assert not (tmp_path / "r" / "summary.json").exists()
    result = qkd.fit(UserNet(8), None, train, val, method="qat", epochs=2, optim={"lr": 0.05}, out=tmp_path / "r",
                     resume=True)  # fmt: skip
    assert result.summary["changes"] == [{"from": "the start of 1_self_study", "changed": {"optim.lr": [1e4, 0.05]}}]
    assert "lr: 0.05" in (tmp_path / "r" / "config.yaml").read_text()
    with pytest.raises(QKDError, match="differ in quant.weight_bits"):  # what changes the model stays refused
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=2, optim={"lr": 0.05}, out=tmp_path / "r",
                resume=True, quant=qkd.QuantConfig(weight_bits=2))  # fmt: skip


def test_the_divergence_guard():
    def run(losses, ratio=100.0):
        guard = DivergenceGuard(ratio, every=3)
        for step, loss in enumerate(losses):
            guard.observe(step, torch.tensor(loss))
        guard.flush()

    run([2.3, 1.0, 0.01, 0.005, 0.005, 1.5, 0.01])  # a loss that fell near zero may bounce below its start
    run([2.3, 2.0, 1e6], ratio=None)  # the ratio check off: only non-finite losses stop
    with pytest.raises(qkd.Diverged, match=r"loss 1e\+06 at step 3, over 100x its level so far \(2.3\)"):
        run([2.3, 2.0, 1e6, 1.0])
    with pytest.raises(qkd.Diverged, match="loss nan at step 2"):
        run([2.3, float("nan")], ratio=None)


def test_a_stage_at_chance_accuracy_is_flagged(tmp_path):
    train, val = digits_loaders()
    result = qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, optim={"lr": 1e-6})
    assert result.summary["at_chance"] == ["1_self_study"]
    assert result.summary["stages"]["1_self_study"]["at_chance"] is True


def test_cli_divergence_unfinished_export_and_resume(tmp_path):
    res = cli("run", *TINY, "method=qat", "optim.lr=1000", "--name", "r", "--out", str(tmp_path))
    assert res.returncode == 3, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("qkd: error: training diverged in 1_self_study epoch 1: loss ")
    assert f"continue with a lower learning rate: qkd run --resume {tmp_path / 'r'} optim.lr=100" in last
    res = cli("export", str(tmp_path / "r"))
    assert res.returncode == 2 and "unfinished run (stopped at the start of 1_self_study)" in res.stderr
    res = cli("eval", str(tmp_path / "r"), "--unfinished")
    assert res.returncode == 0
    assert "the student tiny_cnn, float, UNFINISHED, stopped at the start of 1_self_study" in res.stdout
    (tmp_path / "r" / "export").mkdir()
    (tmp_path / "r" / "export" / "student-int.safetensors").write_bytes(b"made from the diverged state")
    res = cli("run", "--resume", str(tmp_path / "r"), "optim.lr=0.01")
    assert res.returncode == 0, res.stderr
    assert not any((tmp_path / "r" / "export").iterdir())  # stale: removed when training went on
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert summary["changes"][0]["changed"] == {"optim.lr": [1000.0, 0.01]}
    res = cli("run", "--resume", str(tmp_path / "r"), "quant.weight_bits=3")
    assert res.returncode == 2 and "differ in quant.weight_bits" in res.stderr


def test_cli_train_fp_reports_its_row_and_eval_reads_that_model(tmp_path):
    res = cli("train-fp", *TINY, "epochs=2", "--role", "teacher", "--name", "fp", "--out", str(tmp_path))
    assert res.returncode == 0, res.stderr
    summary = json.loads((tmp_path / "fp" / "summary.json").read_text())
    assert summary["stages"]["fp_teacher"]["epochs"] == 2
    row = next(ln for ln in res.stdout.splitlines() if ln.startswith("teacher FP (tiny_cnn_wide)"))
    assert row.split()[3:6] == ["2", f"{100 * summary['teacher_fp']['val']:.2f}",
                                f"{100 * summary['teacher_fp']['test']:.2f}"]  # fmt: skip
    res = cli("eval", str(tmp_path / "fp"))
    assert res.returncode == 0 and "the teacher tiny_cnn_wide, float, at the end of the run" in res.stdout
    test = f"{100 * summary['teacher_fp']['test']:.2f}"
    assert _row(res.stdout, "test top-1 %") == ["test", "top-1", "%", test]
    res = cli("eval", str(tmp_path / "fp" / "checkpoints" / "fp_teacher.pt"))
    assert res.returncode == 0 and _row(res.stdout, "test top-1 %") == ["test", "top-1", "%", test]


def _row(text: str, label: str) -> list[str]:
    return next(ln.split() for ln in text.splitlines() if ln.strip().startswith(label))
