import json

import pytest
import torch

from helpers import StopAfter, copy_run
from qkd import pipeline
from qkd.checkpoint import load_checkpoint
from qkd.errors import QKDError
from qkd.pipeline import run_plan as plan
from qkd.train.stages import METHODS, split_epochs


@pytest.mark.parametrize("total", [1, 7, 20, 200])
@pytest.mark.parametrize("method", [m for m in METHODS if m != "ptq"])  # ptq trains nothing (test_ptq.py)
def test_every_method_gets_the_same_budget(method, total):
    epochs = split_epochs(METHODS[method], (0.15, 0.5, 0.35), total)
    assert sum(epochs) == total and all(e >= 0 for e in epochs)


def test_paper_split():
    assert split_epochs(METHODS["qkd"], (0.15, 0.5, 0.35), 200) == [30, 100, 70]
    assert split_epochs(METHODS["ss+tu"], (0.15, 0.5, 0.35), 200) == [60, 140]


def test_plan_builds_teacher_only_when_a_phase_needs_it(tiny_config):
    assert [s.key for s in plan(tiny_config())] == ["fp_teacher", "fp_student", "1_self_study", "2_co_study", "3_tutor"]
    assert [s.key for s in plan(tiny_config("method=qat"))] == ["fp_student", "1_self_study"]
    assert [s.phase for s in plan(tiny_config("method=kd"))][-1] == "tutor"
    custom = plan(tiny_config("phases=[{name: tutor, epochs: 2, lr: 0.5}]"))
    assert custom[-1].epochs == 2 and custom[-1].lr == 0.5


def test_run_writes_everything(tiny_config, tmp_path):
    run_dir, summary = pipeline.run(tiny_config("name=r"), tmp_path)
    assert {p.name for p in run_dir.iterdir()} >= {"config.yaml", "metrics.jsonl", "summary.json", "checkpoints"}
    ckpts = {p.name for p in (run_dir / "checkpoints").iterdir()}
    assert ckpts == {
        "last.pt",
        "previous.pt",
        "fp_teacher.pt",
        "fp_student.pt",
        "1_self_study.pt",
        "2_co_study.pt",
        "3_tutor.pt",
    }
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(lines) == 1 + 1 + 4  # float teacher, float student, 4 quantized epochs
    assert json.loads((run_dir / "summary.json").read_text()) == summary
    assert summary["bits"]["weight"] == 2 and {f"{s}.pt" for s in summary["stages"]} == ckpts - {
        "last.pt",
        "previous.pt",
    }
    for key in ("teacher_fp", "student_fp"):
        assert 0 <= summary[key]["test"] <= 1
    assert summary["stages"]["2_co_study"]["teacher"]["test"] > 0.1  # the co-studied teacher is reported


def test_existing_run_folder_is_never_overwritten_silently(tiny_config, tmp_path):
    pipeline.run(tiny_config("name=r", "method=qat"), tmp_path)
    before = (tmp_path / "r" / "summary.json").read_text()
    with pytest.raises(QKDError, match="exists; resume it with --resume"):
        pipeline.run(tiny_config("name=r", "method=qat"), tmp_path)
    assert (tmp_path / "r" / "summary.json").read_text() == before
    pipeline.run(tiny_config("name=r", "method=qat", "seed=1"), tmp_path, overwrite=True)
    assert "seed: 1" in (tmp_path / "r" / "config.yaml").read_text()


# stopped inside the float stage, or mid co-study
@pytest.mark.parametrize("stop_after, schedule", [(1, "phase"), (4, "phase"), (4, "run")])
def test_resume_reaches_exactly_the_uninterrupted_result(tiny_config, tmp_path, stop_after, schedule):
    cfg = tiny_config("epochs=6", "quant.method=interval", f"optim.schedule={schedule}")
    _, full = pipeline.run(cfg.model_copy(update={"name": "full"}), tmp_path)
    part = cfg.model_copy(update={"name": "part"})
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(part, tmp_path, on_epoch_end=StopAfter(stop_after))
    assert not (tmp_path / "part" / "summary.json").exists()
    _, resumed = pipeline.resume(tmp_path / "part")

    def strip(s):
        return {k: v for k, v in s.items() if k not in ("name", "wall_s", "stages")}

    assert strip(resumed) == strip(full)
    for key, stage in full["stages"].items():
        assert {k: v for k, v in resumed["stages"][key].items() if k != "wall_s"} == {
            k: v for k, v in stage.items() if k != "wall_s"
        }
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "last.pt")["student"]
    b = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")["student"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    full_lines = (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()
    part_lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert len(full_lines) == len(part_lines)


@pytest.mark.parametrize("schedule", ["phase", "run"])
def test_learning_rate_schedule(tiny_config, tmp_path, schedule):
    run_dir, _ = pipeline.run(tiny_config("name=r", "epochs=6", f"optim.schedule={schedule}"), tmp_path)
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    quantized = [r for r in records if not r["stage"].startswith("fp_")]
    ends = [r["lr"] for r, nxt in zip(quantized, quantized[1:] + [None]) if nxt is None or nxt["stage"] != r["stage"]]
    assert len(ends) == 3 and ends[-1] == pytest.approx(0, abs=1e-12)
    if schedule == "phase":  # every phase decays to zero and the next restarts
        assert ends == pytest.approx([0, 0, 0], abs=1e-12)
    else:  # one decay: the rate only falls, and no phase but the last ends at zero
        lrs = [r["lr"] for r in quantized]
        assert all(a >= b for a, b in zip(lrs, lrs[1:])) and min(ends[:2]) > 0


def test_resume_of_a_finished_run_only_reports(demo_run, tmp_path):
    run_dir = copy_run(demo_run[1], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    _, again = pipeline.resume(run_dir)
    assert again == summary


def test_resume_needs_a_run_folder(tmp_path):
    with pytest.raises(QKDError, match="not a run folder"):
        pipeline.resume(tmp_path)


def test_pretrained_checkpoint_feeds_a_run(tiny_config, tmp_path, demo_run):
    """A float stage's boundary checkpoint is a valid ``*.checkpoint`` for a later run."""
    ckpt = demo_run[1] / "checkpoints" / "fp_student.pt"
    _, summary = pipeline.run(
        tiny_config("name=q", "method=qat", "student.train_epochs=0", f"student.checkpoint={ckpt}"), tmp_path
    )
    assert summary["student_fp"]["test"] == pytest.approx(load_checkpoint(ckpt)["result"]["test"])


def test_checkpoint_that_does_not_fit_the_model(tiny_config, tmp_path, demo_run):
    ckpt = demo_run[1] / "checkpoints" / "fp_student.pt"
    with pytest.raises(QKDError, match="does not fit the model"):
        pipeline.run(tiny_config("name=q", "student.kwargs={width: 5}", f"student.checkpoint={ckpt}"), tmp_path)


def test_evaluate_checkpoint_reports_quantized_and_float(demo_run, tmp_path):
    run_dir = copy_run(demo_run[1], tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    result = pipeline.evaluate_checkpoint(pipeline.load_run_config(run_dir), run_dir)
    assert result["quantized"] is True
    assert result["test"] == pytest.approx(summary["stages"]["1_self_study"]["test"])
    assert 0 <= result["test_fp"] <= 1
    (run_dir / "checkpoints" / "last.pt").unlink()  # deleted to save space: the last stage's checkpoint serves
    again = pipeline.evaluate_checkpoint(pipeline.load_run_config(run_dir), run_dir)
    assert again["test"] == result["test"] and again["quantized"] is True
    (run_dir / "checkpoints" / "1_self_study.pt").unlink()
    with pytest.raises(QKDError, match="no student checkpoint"):
        pipeline.evaluate_checkpoint(pipeline.load_run_config(run_dir), run_dir)


def test_resume_of_a_float_only_run_keeps_its_stages(tiny_config, tmp_path):
    cfg = tiny_config("name=fp", "student.train_epochs=3")
    stages = [pipeline.model_float_stage(cfg, "student")]
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, stages=stages, on_epoch_end=StopAfter(1))
    _, summary = pipeline.resume(tmp_path / "fp")
    assert list(summary["stages"]) == ["fp_student"]
