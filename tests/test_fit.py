"""Bring your own model and data: ``qkd.fit`` on a user-written network and a plain DataLoader."""

import json
import logging

import pytest
import torch
from torch.nn import functional as F

import qkd
from helpers import FIT_SETTINGS, StopAfter, UserNet, digits_loaders, user_models
from qkd.checkpoint import load_checkpoint
from qkd.errors import QKDError


def test_fit_user_model_and_dataloader_end_to_end_and_exact_resume(tmp_path, full_fit):
    train, val = digits_loaders()
    result, student = full_fit
    summary = result.summary
    assert list(summary["stages"]) == ["fp_teacher", "fp_student", "1_self_study", "2_co_study", "3_tutor"]
    assert summary["layers"] == {"quantized": 4, "float": 0}  # the same-padding conv included
    assert summary["stages"]["3_tutor"]["val"] > 0.5  # learns (chance is 0.1)
    assert summary["student"] == "UserNet" and result.student is student
    files = {p.name for p in result.run_dir.iterdir()}
    assert files >= {"config.yaml", "stages.json", "metrics.jsonl", "quantization.json", "summary.json", "checkpoints"}
    layers = json.loads((result.run_dir / "quantization.json").read_text())["layers"]
    assert [row["name"] for row in layers] == ["stem.0", "block.branch.0", "down.0", "head"]

    student, teacher = user_models()
    with pytest.raises(KeyboardInterrupt):  # stopped mid co-study; resumed with the same objects, as in a notebook
        qkd.fit(student, teacher, train, val, out=tmp_path / "part", on_epoch_end=StopAfter(6), **FIT_SETTINGS)
    resumed = qkd.fit(student, teacher, train, val, out=tmp_path / "part", resume=True, **FIT_SETTINGS)
    a = load_checkpoint(result.run_dir / "checkpoints" / "last.pt")["student"]
    b = resumed.student.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.summary["stages"]["3_tutor"]["val"] == summary["stages"]["3_tutor"]["val"]


def test_fit_exports_the_user_model_exactly(tmp_path):
    from qkd.export import compare, export_student

    train, val = digits_loaders()
    student, teacher = user_models()
    result = qkd.fit(student, teacher, train, val, **{**FIT_SETTINGS, "epochs": 2, "method": "kd"})
    x = next(iter(val))[0][:2]
    for fmt, ext in (("int", "safetensors"), ("onnx-int", "onnx")):
        run = export_student(result.student, fmt, tmp_path / f"user.{ext}", x, {})
        check = compare(run, result.student, val, exact=True)
        assert check["agreement_f64"] == 1.0, (fmt, check)


def test_fit_without_a_run_folder_and_generator_factories():
    train, val = digits_loaders()
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
    train, val = digits_loaders()
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
    train, val = digits_loaders()
    qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r")
    with pytest.raises(QKDError, match="differ in epochs"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=2, out=tmp_path / "r", resume=True)
    with pytest.raises(QKDError, match="exists"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r")


def test_resume_starts_a_run_not_yet_there_and_refuses_other_stages(tmp_path):
    train, val = digits_loaders()
    first = qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r", resume=True)
    again = qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, out=tmp_path / "r", resume=True)
    assert again.summary == first.summary  # finished: only reports
    with pytest.raises(QKDError, match="differ in stages"):
        qkd.fit(UserNet(8), None, train, val, method="qat", epochs=1, pretrain={"student": 1}, out=tmp_path / "r",
                resume=True)  # fmt: skip


def test_teacher_student_agreement_is_measured_and_survives_a_stop_in_co_study(tmp_path, full_fit):
    """The mechanism QKD claims: each distillation stage records, on the validation split, the teacher's top-1
    and KL(teacher || student) at its start and end; co-study also the KL from the teacher it started from. A
    run stopped inside co-study and resumed records the same figures as an uninterrupted run."""
    train, val = digits_loaders()
    full = full_fit[0].summary["teacher_student"]
    assert list(full) == ["2_co_study", "3_tutor"]
    co, tu = full["2_co_study"], full["3_tutor"]
    assert set(co["start"]) == {"teacher_acc", "student_acc", "kl"} and "kl_reference" in co["end"]
    assert co["end"]["kl"] == tu["start"]["kl"] and co["end"]["teacher_acc"] == tu["start"]["teacher_acc"]
    assert co["start"]["kl"] > 0 and co["start"]["teacher_acc"] > 0.5
    student, teacher = user_models()
    with pytest.raises(KeyboardInterrupt):  # fp stages 3 + 3 epochs, self-study 1, then 1 of co-study's 2
        qkd.fit(student, teacher, train, val, out=tmp_path / "part", on_epoch_end=StopAfter(8), **FIT_SETTINGS)
    resumed = qkd.fit(student, teacher, train, val, out=tmp_path / "part", resume=True, **FIT_SETTINGS)
    assert resumed.summary["teacher_student"] == full


def test_agreement_matches_its_definition():
    from qkd.train.loop import Runtime, agreement

    _, val = digits_loaders()
    student, teacher = user_models()
    got = agreement(teacher, student, val, Runtime(), reference=student)
    x, y = val.dataset.tensors
    with torch.no_grad():
        zt, zs = teacher.eval()(x), student.eval()(x)
    kl = F.kl_div(F.log_softmax(zs, 1), F.log_softmax(zt, 1), reduction="batchmean", log_target=True).item()
    assert got["kl"] == pytest.approx(kl, rel=1e-5) and got["kl_reference"] == pytest.approx(0.0, abs=1e-6)
    assert got["teacher_acc"] == pytest.approx((zt.argmax(1) == y).double().mean().item())
    assert got["student_acc"] == pytest.approx((zs.argmax(1) == y).double().mean().item())


def test_amp_on_a_cpu_without_native_bf16_says_so_and_trains_in_float32(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr("qkd.train.loop.cpu_has_native_bf16", lambda: False)
    caplog.set_level(logging.INFO, "qkd")
    train, val = digits_loaders()
    result = qkd.fit(*user_models(), train, val, method="qat", epochs=1, runtime={"amp": True},
                     quant=qkd.QuantConfig(weight_bits=4, act_bits=4))  # fmt: skip
    assert result.summary["precision"] == "float32" and "no native bf16" in caplog.text


def test_cpu_bf16_autocast_keeps_fake_quantization_on_its_float32_grid(monkeypatch):
    """Where the CPU has bf16, training steps run under autocast; the quantizers round in float32 (their
    outputs are exact grid values) and the losses are float32; evaluation on the CPU stays float32."""
    from qkd.phases import SelfStudy
    from qkd.quant import calibrate, quantize_model
    from qkd.train.loop import Runtime

    monkeypatch.setattr("qkd.train.loop.cpu_has_native_bf16", lambda: True)
    rt = Runtime(amp=True)
    assert rt.precision == "bfloat16" and not rt.autocast(training=False)._enabled
    student, _ = user_models()
    quantize_model(student, qkd.QuantConfig(weight_bits=3, act_bits=3))
    train, _ = digits_loaders()
    x, y = next(iter(train))
    calibrate(student, x)
    seen = []
    student.down[0].act_quant.register_forward_hook(lambda m, i, o: seen.append((i[0].dtype, o)))
    phase = SelfStudy(student, None, {"student": torch.optim.SGD(student.parameters(), lr=0.01)})
    with rt.autocast():
        loss, logits = phase.step(x, y)
    (in_dtype, out), q = seen[0], student.down[0].act_quant
    assert in_dtype == torch.bfloat16 and out.dtype == torch.float32 and loss.dtype == torch.float32
    scale, offset, qn, qp = q.affine()
    codes = (out - offset) / scale
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.min() >= qn and codes.max() <= qp
    assert torch.isfinite(loss) and logits.dtype == torch.bfloat16


def test_lean_evaluation_measures_less_and_trains_the_same(tmp_path):
    """runtime.eval=lean (for studies of many runs): no float evaluation, validation at stage ends only, the test
    split at the end only; the training and the final figures are those of a full run."""
    train, val = digits_loaders()
    settings = dict(FIT_SETTINGS, pretrain=None)
    full = qkd.fit(*user_models(), train, val, val, **settings).summary
    lean = qkd.fit(*user_models(), train, val, val, runtime={"eval": "lean"}, **settings).summary
    assert "student_fp" in full and "student_fp" not in lean and "teacher_fp" not in lean
    assert [set(r) & {"val", "test"} for r in lean["stages"].values()] == [{"val"}, {"val"}, {"val", "test"}]
    assert lean["stages"]["3_tutor"]["test"] == full["stages"]["3_tutor"]["test"]
    assert lean["teacher_student"] == full["teacher_student"]
