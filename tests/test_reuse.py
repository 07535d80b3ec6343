import json

import pytest

from helpers import DEMO
from qkd import pipeline, reuse
from qkd.config import RunConfig, load_config
from qkd.errors import QKDError


def test_a_setting_added_later_is_no_difference_at_its_default():
    now = reuse.identity(RunConfig())
    stored = {k: v for k, v in now.items() if k != "data.val_from"}  # stored before data.val_from existed
    assert reuse.differences(stored, now) == []
    assert reuse.differences(stored, {**now, "data.val_from": "test"}) == ["data.val_from"]


def test_where_settings_are_no_part_of_a_runs_identity():
    a = load_config(None, ["name=a", "data.num_workers=0", "device=cpu", "student.checkpoint=/x.pt"])
    assert reuse.differences(a, RunConfig()) == []
    assert "data.num_workers" not in reuse.identity(a)
    assert reuse.differences({"data.num_workers": 4}, {}) == []  # kept in an identity stored before it was marked


def test_unused_settings_follow_the_stages():
    qat = pipeline.run_plan(load_config(None, ["method=qat", "teacher.train_epochs=0"]))
    assert {"teacher", "optim.teacher_lr", "optim.schedule"} <= reuse.unused(qat)
    assert reuse.unused(pipeline.run_plan(RunConfig())) == set()  # qkd: every phase, co-study included


def test_a_finished_run_is_read_not_trained(demo_run, monkeypatch):
    root, run_dir, _ = demo_run
    summary = (run_dir / "summary.json").read_text()
    monkeypatch.setattr(pipeline, "run", lambda *a, **k: pytest.fail("trained again"))
    monkeypatch.setattr(pipeline, "resume", lambda *a, **k: pytest.fail("resumed"))
    same = load_config(None, [*DEMO, "device=cpu", "data.num_workers=0", "optim.teacher_lr=0.5"])  # teacher_lr: qat
    assert reuse.run_or_reuse(same, root / "runs")["stages"] == json.loads(summary)["stages"]
    with pytest.raises(QKDError, match=r"other settings \(quant.weight_bits\)"):
        reuse.run_or_reuse(load_config(None, [*DEMO, "quant.weight_bits=3"]), root / "runs")
    assert {h["stage"] for h in reuse.read_history(run_dir)} == set(json.loads(summary)["stages"])


def test_history_of_a_run_that_trained_no_epoch_is_empty(tmp_path) -> None:
    """method=ptq writes no metrics.jsonl: the study stores such a run with an empty history, not a crash."""
    assert reuse.read_history(tmp_path) == []
    (tmp_path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    assert reuse.read_history(tmp_path) == [{"epoch": 1}]
