"""A stage's randomness follows its name and the run's seed, not its place in the plan (issue 25, item 3): one seed
gives ``method=qat`` and ``method=qkd`` the same float student. Runs begun under the older index seeding resume
under it, and every summary says which scheme made it."""

import pytest
import torch

from helpers import StopAfter, digits_loaders, same_weights, user_models
from qkd import pipeline
from qkd.checkpoint import load_checkpoint, save_checkpoint
from qkd.train import Trainer
from qkd.train.batches import CALIBRATION, INDEX_SEEDING, SEEDING, START, Batches, index_seed, run_seed
from qkd.train.stages import float_stage


def test_qat_and_qkd_with_one_seed_train_the_same_float_student(tiny_config, tmp_path):
    """qkd trains a float teacher first, qat does not: the float student comes out bit-identical all the same.
    Each run is stopped after its float student's epoch (the quantized phases are not the point)."""
    students = []
    for method, float_epochs in (("qat", 1), ("qkd", 2)):
        with pytest.raises(KeyboardInterrupt):
            pipeline.run(tiny_config(f"name={method}", f"method={method}", "seed=3"), tmp_path,
                         on_epoch_end=StopAfter(float_epochs))  # fmt: skip
        snapshot = load_checkpoint(tmp_path / method / "checkpoints" / "last.pt")
        assert snapshot["history"][-1]["stage"] == "fp_student" and snapshot["seeding"] == SEEDING == "stage-name"
        students.append(snapshot["student"])
    assert same_weights(*students)


def test_a_stage_seed_follows_its_name_the_run_seed_and_the_draw():
    teacher_first, alone = ["fp_teacher", "fp_student", "1_self_study"], ["fp_student", "1_self_study"]
    for draw in (0, 1, START):
        assert run_seed(SEEDING, 0, teacher_first, 1, draw) == run_seed(SEEDING, 0, alone, 0, draw)
    seeds = {run_seed(SEEDING, s, teacher_first, i, d) for s in (0, 1) for i in range(3) for d in (0, 1, START)}
    assert len(seeds) == 2 * 3 * 3  # every (run seed, stage, draw) its own
    # the calibration batch is the run's, whichever stage quantizes (qat's 1_self_study, kd's 1_tutor)
    assert run_seed(SEEDING, 0, ["1_tutor"], 0, CALIBRATION) == run_seed(SEEDING, 0, alone, 1, CALIBRATION)
    assert run_seed(SEEDING, 0, alone, 1, CALIBRATION) != run_seed(SEEDING, 1, alone, 1, CALIBRATION)
    # a name that comes back in a plan: each occurrence its own seeds
    twice = ["fp_student", "fp_student"]
    assert run_seed(SEEDING, 0, twice, 0, 0) == run_seed(SEEDING, 0, alone, 0, 0)
    assert run_seed(SEEDING, 0, twice, 1, 0) != run_seed(SEEDING, 0, twice, 0, 0)
    assert all(0 <= s < 2**31 for s in seeds)


def test_the_planned_float_stages_have_distinct_names(tiny_config):
    keys = [s.key for s in pipeline.run_plan(tiny_config())]
    assert keys[:2] == ["fp_teacher", "fp_student"] and len(set(keys)) == len(keys)


def _seeds_drawn(monkeypatch) -> list[int]:
    """The seeds the trainer hands its batches, in order (a list filled as it runs)."""
    drawn, epoch = [], Batches.epoch

    def recorded(self, seed):
        drawn.append(seed)
        return epoch(self, seed)

    monkeypatch.setattr(Batches, "epoch", recorded)
    return drawn


def test_a_stage_name_repeated_in_a_plan_gets_other_seeds(monkeypatch):
    train, val = digits_loaders()
    student, _ = user_models()
    drawn = _seeds_drawn(monkeypatch)
    Trainer(student, None, train, val, stages=[float_stage("student", 1, 0.1), float_stage("student", 1, 0.1)]).fit()
    keys = ["fp_student", "fp_student"]
    assert drawn == [run_seed(SEEDING, 0, keys, 0, 0), run_seed(SEEDING, 0, keys, 1, 0)] and drawn[0] != drawn[1]


def test_the_stage_start_is_seeded_from_the_stage_name(monkeypatch):
    """What a stage draws before its first epoch (here a dropout-like draw when its optimizer is built) is the same
    whatever ran before: the global RNG is set from the stage's name at its start."""
    train, val = digits_loaders()
    starts = []
    real = Trainer._run_stage

    def run_stage(self, i, stage, resume_optim):
        starts.append((stage.key, torch.rand(1).item()))
        return real(self, i, stage, resume_optim)

    monkeypatch.setattr(Trainer, "_run_stage", run_stage)
    for roles in (["teacher", "student"], ["student"]):
        student, teacher = user_models()
        Trainer(student, teacher, train, val, stages=[float_stage(r, 1, 0.1) for r in roles]).fit()
    assert starts[1] == starts[2] and starts[1][0] == "fp_student" and starts[0][1] != starts[1][1]


@pytest.mark.parametrize("stop_after", [1, 2])
def test_a_run_begun_under_index_seeding_resumes_under_it(tiny_config, tmp_path, monkeypatch, stop_after):
    """A snapshot without ``seeding`` (written before stage-name seeds) resumes with the seeds its run began
    with, and its summary says so; a new run's snapshots say which scheme they follow."""
    cfg = tiny_config("name=old", "method=qat", "student.train_epochs=2", "epochs=2")
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, tmp_path, on_epoch_end=StopAfter(stop_after))
    last = tmp_path / "old" / "checkpoints" / "last.pt"
    snapshot = load_checkpoint(last)
    assert snapshot["seeding"] == SEEDING
    del snapshot["seeding"]
    save_checkpoint(snapshot, last, keep_previous=None)
    drawn = _seeds_drawn(monkeypatch)
    _, summary = pipeline.resume(tmp_path / "old")
    assert summary["seeding"] == INDEX_SEEDING
    # fp_student has 2 epochs, then 1_self_study (calibration, then its 2 epochs): as the index scheme drew them
    left = [(0, 1), (1, CALIBRATION), (1, 0), (1, 1)][stop_after - 1 :]
    assert drawn == [index_seed(0, i, d) for i, d in left]
