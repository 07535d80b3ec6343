"""Each phase on tiny data: who trains, with which loss, and the teacher's state in each."""

import copy

import pytest
import torch

from qkd.losses import distillation_loss, kd_loss
from qkd.models import create_model
from qkd.phases import PHASES, CoStudy, SelfStudy, Tutor
from qkd.quant import QuantConfig, calibrate, quantize_model


def _params(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _changed(before, model):
    return any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.fixture
def setup():
    torch.manual_seed(0)
    teacher = create_model("tiny_cnn", width=8)
    student = quantize_model(create_model("tiny_cnn", width=4), QuantConfig(weight_bits=2, act_bits=2))
    x, y = torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))
    calibrate(student, x)
    opts = {
        "student": torch.optim.SGD(student.parameters(), lr=0.1),
        "teacher": torch.optim.SGD(teacher.parameters(), lr=0.1),
    }
    return student, teacher, opts, x, y


@pytest.mark.parametrize(("cls", "teacher_changes"), [(SelfStudy, False), (CoStudy, True), (Tutor, False)])
def test_teacher_changes_only_in_co_study(setup, cls, teacher_changes):
    student, teacher, opts, x, y = setup
    s0, t0 = _params(student), _params(teacher)  # teacher buffers (BN stats) included
    phase = cls(student, teacher, opts)
    phase.train_mode()
    assert teacher.training is teacher_changes
    phase.step(x, y)
    assert _changed(s0, student)
    assert _changed(t0, teacher) is teacher_changes


def test_tutor_loss_is_ce_plus_kd(setup):
    student, teacher, opts, x, y = setup
    phase = Tutor(student, teacher, opts)
    phase.train_mode()
    with torch.no_grad():  # same modes as in the step: student train, teacher eval
        expected = distillation_loss(student(x), teacher(x), y, 2.0, 1.0)
    loss, _ = phase.step(x, y)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_kd_loss_zero_for_identical_logits_and_temperature_scaling():
    z = torch.randn(8, 10)
    assert kd_loss(z, z, 4.0).item() == pytest.approx(0.0, abs=1e-6)
    other = torch.randn(8, 10)
    # T^2 scaling keeps gradients comparable across temperatures: the loss stays O(1)
    assert 0 < kd_loss(z, other, 1.0).item() and 0 < kd_loss(z, other, 4.0).item() < 100


def test_co_study_gradients_are_each_models_own_loss(setup):
    """Summing the two detached losses gives each model exactly its own gradient."""
    student, teacher, _, x, y = setup
    student.train(), teacher.train()
    z_s, z_t = student(x), teacher(x)
    loss_t = distillation_loss(z_t, z_s, y, 2.0, 1.0)
    (g_t,) = torch.autograd.grad(loss_t, [teacher.fc.weight], retain_graph=True)
    loss_s = distillation_loss(z_s, z_t, y, 2.0, 1.0)
    (g_sum,) = torch.autograd.grad(loss_s + loss_t, [teacher.fc.weight])
    assert torch.allclose(g_t, g_sum)


def test_registry_names():
    assert set(PHASES) == {"self_study", "co_study", "tutor", "ptq"}
    assert PHASES["co_study"].trains_teacher and not PHASES["tutor"].trains_teacher


def test_teacher_copy_unchanged_by_tutor_inference(setup):
    student, teacher, opts, x, y = setup
    frozen = copy.deepcopy(teacher)
    phase = Tutor(student, teacher, opts)
    phase.train_mode()
    for _ in range(3):
        phase.step(x, y)
    for a, b in zip(frozen.state_dict().values(), teacher.state_dict().values()):
        assert torch.equal(a, b)
