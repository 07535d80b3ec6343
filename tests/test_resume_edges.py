"""Resuming at the edges (issue 25): damaged checkpoints on both sides of a resume, a checkpoint write that fails
(a full disk), and a finished run resumed with a changed setting."""

import errno
import os

import pytest
import torch

import qkd
from helpers import (
    FIT_SETTINGS,
    TINY,
    StopAfter,
    UserNet,
    copy_run,
    digits_loaders,
    qkd_in_process,
    same_weights,
    user_models,
)
from qkd import checkpoint
from qkd.checkpoint import load_checkpoint, save_checkpoint
from qkd.errors import QKDError

WRITER_FAILED = (
    "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write failed"
)


class FailingWriter:
    """In place of ``torch._C.PyTorchFileWriter``: the first ``ok`` checkpoint writes succeed, the next fail as
    torch's writer fails on a full disk (a ``RuntimeError``, not an ``OSError``)."""

    def __init__(self, monkeypatch, ok: int) -> None:
        self.real, self.ok = torch._C.PyTorchFileWriter, ok
        monkeypatch.setattr(torch._C, "PyTorchFileWriter", self)

    def __call__(self, *args):
        self.ok -= 1
        if self.ok < 0:
            raise RuntimeError(WRITER_FAILED)
        return self.real(*args)


def _two_saves(tmp_path, monkeypatch, fail) -> tuple:
    """A first checkpoint saved, a second one (the same path, keeping the first as previous.pt) failing through
    ``fail(monkeypatch)``: the error and the file's bytes before."""
    path = tmp_path / "last.pt"
    save_checkpoint({"w": torch.arange(4.0)}, path, keep_previous="previous.pt")
    before = path.read_bytes()
    fail(monkeypatch)
    with pytest.raises(QKDError) as e:
        save_checkpoint({"w": torch.zeros(1000)}, path, keep_previous="previous.pt")
    return str(e.value), before


def _untouched(tmp_path, before: bytes) -> None:
    assert (tmp_path / "last.pt").read_bytes() == before
    assert torch.equal(load_checkpoint(tmp_path / "last.pt")["w"], torch.arange(4.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]  # nothing rotated, no temporary file left


def test_a_failing_torch_writer_is_one_line_and_keeps_the_checkpoint(tmp_path, monkeypatch):
    message, before = _two_saves(tmp_path, monkeypatch, lambda mp: FailingWriter(mp, ok=0))
    assert message.startswith(f"cannot write {tmp_path / 'last.pt'}: PytorchStreamWriter failed writing file "
                              "data/0: file write failed (")  # fmt: skip
    assert "MiB free on its disk); the checkpoint before it is intact" in message and "\n" not in message
    _untouched(tmp_path, before)


class FullDisk:
    """A file whose writes fail as on a full disk, after the first two (the disk fills while torch writes)."""

    def __init__(self, f) -> None:
        self.f, self.ok = f, 2

    def write(self, data):
        self.ok -= 1
        if self.ok < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def test_a_full_disk_under_torch_save_names_its_cause(tmp_path, monkeypatch):
    """torch's writer turns the file's ``OSError`` into ``RuntimeError: unexpected pos 46 vs 0``: the cause is
    the file's error, not that."""
    fdopen = os.fdopen
    message, before = _two_saves(
        tmp_path, monkeypatch, lambda mp: mp.setattr(checkpoint.os, "fdopen", lambda *a: FullDisk(fdopen(*a)))
    )
    assert message == (f"cannot write {tmp_path / 'last.pt'}: No space left on device; the checkpoint before it is "
                       "intact: free space or fix the folder, then resume")  # fmt: skip
    _untouched(tmp_path, before)


def test_a_run_whose_disk_fills_stops_in_one_line_and_resumes(tmp_path, monkeypatch):
    args = ("run", *TINY, "method=qat", "epochs=1", "--name", "r", "--out", str(tmp_path))
    FailingWriter(monkeypatch, ok=3)  # last.pt and fp_student.pt of the float stage, last.pt at its end
    res = qkd_in_process(*args)
    assert res.returncode == 2, res.stderr
    assert "Traceback" not in res.stderr
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith(f"qkd: error: cannot write {tmp_path / 'r' / 'checkpoints' / 'last.pt'}: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")  # fmt: skip
    assert load_checkpoint(tmp_path / "r" / "checkpoints" / "last.pt")["qkd"]["position"] == "the start of 1_self_study"
    monkeypatch.undo()
    res = qkd_in_process("run", "--resume", str(tmp_path / "r"))
    assert res.returncode == 0, res.stderr


def _damage(path) -> bytes:
    """Cut ``path`` to half its length (a copy cut short); its bytes after."""
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path.read_bytes()


def test_a_damaged_last_checkpoint_is_never_kept_over_the_intact_previous_one(tmp_path, caplog):
    train, val = digits_loaders()
    ckpts = tmp_path / "r" / "checkpoints"

    def fit(stop_after: int, resume: bool = False):
        with pytest.raises(KeyboardInterrupt):
            qkd.fit(UserNet(8), None, train, val, method="qat", epochs=3, out=tmp_path / "r", resume=resume,
                    on_epoch_end=StopAfter(stop_after))  # fmt: skip

    fit(2)
    damaged, intact = _damage(ckpts / "last.pt"), (ckpts / "previous.pt").read_bytes()
    fit(1, resume=True)  # resumes from previous.pt, trains an epoch and saves it as last.pt
    assert (ckpts / "previous.pt").read_bytes() == intact  # not replaced by the damaged last.pt
    assert (ckpts / "last.pt.damaged").read_bytes() == damaged  # kept for a look, out of the rotation
    assert "resuming from previous.pt" in caplog.text and "kept as last.pt.damaged" in caplog.text
    assert load_checkpoint(ckpts / "last.pt")["epoch"] == 2


def test_with_last_and_previous_damaged_the_run_resumes_exactly_from_the_latest_stage(tmp_path, full_fit, caplog):
    train, val = digits_loaders()
    student, teacher = user_models()
    with pytest.raises(KeyboardInterrupt):  # 3 + 3 float epochs, 1_self_study's one, one into 2_co_study
        qkd.fit(student, teacher, train, val, out=tmp_path / "r", on_epoch_end=StopAfter(8), **FIT_SETTINGS)
    for name in ("last.pt", "previous.pt"):
        _damage(tmp_path / "r" / "checkpoints" / name)
    student, teacher = user_models()
    resumed = qkd.fit(student, teacher, train, val, out=tmp_path / "r", resume=True, **FIT_SETTINGS)
    assert "resuming from 1_self_study.pt (the start of 2_co_study) instead: the epochs trained after" in caplog.text
    assert same_weights(resumed.student.state_dict(), full_fit[0].student.state_dict())
    assert same_weights(resumed.teacher.state_dict(), full_fit[0].teacher.state_dict())
    assert _untimed(resumed.summary["stages"]) == _untimed(full_fit[0].summary["stages"])


def _untimed(stages: dict) -> dict:
    return {k: {f: v for f, v in s.items() if f != "wall_s"} for k, s in stages.items()}


def test_a_finished_run_resumed_with_a_changed_setting_is_refused_in_one_line(demo_run, tmp_path):
    """Printing the results as if it had trained with ``optim.lr=0.01`` would be silently wrong: refused (exit 2),
    the folder as it was; a setting that says where (``device``) changes nothing and is let through."""
    run_dir = copy_run(demo_run[1], tmp_path)
    before = {p.name: p.read_bytes() for p in (run_dir / "config.yaml", run_dir / "summary.json")}
    res = qkd_in_process("run", "--resume", str(run_dir), "optim.lr=0.01")
    assert res.returncode == 2, res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert lines[-1] == (f"qkd: error: cannot resume {run_dir} with optim.lr 0.05 -> "
                         "0.01: the run is finished, so the change would have no effect; qkd run --resume "
                         f"{run_dir} alone reports its results; to train with it, start a new run (another --name or "
                         "--out)")  # fmt: skip
    assert "Traceback" not in res.stderr
    assert {p: (run_dir / p).read_bytes() for p in before} == before
    res = qkd_in_process("run", "--resume", str(run_dir), "device=cpu")
    assert res.returncode == 0 and "after 1_self_study" in res.stdout, res.stderr


def test_a_finished_run_without_last_and_previous_resumes_from_its_last_stage(demo_run, tmp_path, caplog):
    """last.pt and previous.pt deleted to save space: a resume reads the run from its last stage checkpoint
    (it only reports), where it trained the whole run again over its stage checkpoints."""
    run_dir = copy_run(demo_run[1], tmp_path)
    for name in ("last.pt", "previous.pt"):
        (run_dir / "checkpoints" / name).unlink()
    before = {p: (run_dir / p).read_bytes() for p in ("metrics.jsonl", "summary.json")}
    res = qkd_in_process("run", "--resume", str(run_dir))
    assert res.returncode == 0 and "after 1_self_study" in res.stdout, res.stderr
    assert "holds neither last.pt nor previous.pt; resuming from 1_self_study.pt (the end of the run) instead\n" in (
        res.stderr
    )
    assert {p: (run_dir / p).read_bytes() for p in before} == before  # nothing trained again


def test_a_stage_checkpoint_of_another_run_is_not_resumed_from(demo_run, tmp_path):
    """A stage file copied in from a run with other settings (here another seed) holds that run's snapshot: the
    resume takes the stage before it, which is this run's."""
    run_dir = copy_run(demo_run[1], tmp_path)
    ckpts = run_dir / "checkpoints"
    for name in ("last.pt", "previous.pt"):
        _damage(ckpts / name)
    stage = load_checkpoint(ckpts / "1_self_study.pt")
    stage["snapshot"]["qkd"]["config"]["seed"] += 1
    save_checkpoint(stage, ckpts / "1_self_study.pt")
    res = qkd_in_process("run", "--resume", str(run_dir))
    assert res.returncode == 0, res.stderr
    assert "resuming from fp_student.pt (the start of 1_self_study) instead: the epochs trained after" in res.stderr
