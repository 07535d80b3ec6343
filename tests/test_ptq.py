"""Post-training quantization (``method=ptq``): AdaRound on a layer and a model, a whole ptq run, the refusals."""

import copy
import json

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from helpers import UserNet, qkd_in_process
from qkd.config import load_config, with_overrides
from qkd.errors import ConfigError, QKDError
from qkd.export import IntRuntime, compare, to_int_program
from qkd.models import create_model
from qkd.pipeline import run_plan
from qkd.quant import QuantConfig, calibrate, quantize_model
from qkd.quant.adaround import adaround, rectified_sigmoid, round_layer
from qkd.reuse import run_or_reuse

pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(n: int, c: int, size: int) -> torch.Tensor:
    """Inputs whose pixels and channels are correlated, as images are (with independent inputs the output error's
    Hessian is diagonal and rounding to nearest is already optimal: nothing to gain)."""
    x = F.avg_pool2d(torch.randn(n, c, size + 2, size + 2), 3, 1)
    return x + torch.randn(n, 1, size, size)


@pytest.mark.parametrize("method", ["lsq", "interval"])
def test_adaround_beats_nearest_rounding_on_a_layer(method):
    torch.manual_seed(0)
    float_layer = nn.Conv2d(8, 16, 3, padding=1)
    x = _correlated(256, 8, 8)
    model = quantize_model(nn.Sequential(copy.deepcopy(float_layer)),
                           QuantConfig(weight_bits=2, act_bits=8, method=method, first_last_bits="same"))  # fmt: skip
    calibrate(model, x)
    layer = model[0]
    with torch.no_grad():
        target, nearest = float_layer(x), layer(x)
    result = round_layer(layer, x, target, iters=500)
    with torch.no_grad():
        rounded = layer(x)  # the layer as it is now, its own weight quantizer in use
    assert result.adaround < 0.5 * result.nearest
    mse = lambda out: (out - target).pow(2).sum(1).mean().item()  # noqa: E731
    assert mse(rounded) == pytest.approx(result.adaround, rel=1e-4) and mse(nearest) == pytest.approx(result.nearest)
    assert result.undecided < 0.05 and 0.02 < result.flipped < 0.5
    scale, offset, _, _ = layer.weight_quant.affine()
    with torch.no_grad():  # the float weight is on the grid: quantizing it keeps every integer code
        codes = [torch.round((w.double() - offset) / scale) for w in (layer.weight, layer.weight_quant(layer.weight))]
    assert torch.equal(*codes) and ((layer.weight.double() - offset) / scale - codes[0]).abs().max() < 1e-4


def test_rectified_sigmoid_reaches_0_and_1():
    h = rectified_sigmoid(torch.tensor([-10.0, 0.0, 10.0]))
    assert h.tolist() == [0.0, 0.5, 1.0]


@pytest.mark.parametrize(("name", "per_channel", "method"),
                         [("tiny_cnn", True, "interval"), ("user", False, "lsq")])  # fmt: skip
def test_adarounded_model_exports_exactly(name, per_channel, method):
    """AdaRound on a whole model (swapped layers and a conv quantized in place): the integer program still gives
    the fake-quant model's exact answers."""
    torch.manual_seed(0)
    if name == "user":
        float_model, x = UserNet(8).eval(), torch.randn(64, 1, 8, 8)
    else:
        float_model, x = create_model("tiny_cnn", in_channels=3, width=8).eval(), torch.randn(64, 3, 8, 8)
    model = quantize_model(copy.deepcopy(float_model), QuantConfig(weight_bits=3, act_bits=3, per_channel=per_channel,
                                                                  method=method))  # fmt: skip
    calibrate(model, x)
    before = copy.deepcopy(model.state_dict())
    results = adaround(model, float_model, x, iters=30)
    assert len(results) == 4 and any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    y = torch.randint(0, 10, (64,))
    agreement = compare(IntRuntime(*to_int_program(model.eval())), model, [(x, y)], exact=True)
    assert agreement["agreement"] == agreement["agreement_f64"] == 1.0 and agreement["max_logit_diff_f64"] < 1e-6


PTQ = ["method=ptq", "student.train_epochs=3", "data.batch_size=128", "quant.weight_bits=3", "quant.act_bits=3"]


def test_ptq_run_end_to_end(tmp_path):
    """A float student trained, then AdaRound: no teacher, one stage of 0 epochs with accuracies, the time it
    took, an exact export, and a resume that only reports."""
    out = str(tmp_path / "runs")
    res = qkd_in_process("run", *PTQ, "quant.ptq=adaround", "quant.ptq_images=128", "quant.ptq_iters=20",
                         "--name", "p", "--out", out)  # fmt: skip
    assert res.returncode == 0, res.stderr
    run_dir = tmp_path / "runs" / "p"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["stages"]) == ["fp_student", "1_ptq"] and summary["teacher"] is None
    stage = summary["stages"]["1_ptq"]
    assert stage["epochs"] == 0 and 0.3 < stage["val"] <= 1 and 0.3 < stage["test"] <= 1
    ptq = summary["ptq"]
    assert ptq["mode"] == "adaround" and ptq["layers"] == 4 and ptq["images"] == 128 and ptq["iters"] == 20
    assert ptq["time_s"] > 0 and stage["wall_s"] == ptq["time_s"] and summary["wall_s"] > ptq["time_s"]
    assert (run_dir / "quantization.json").is_file() and (run_dir / "checkpoints" / "1_ptq.pt").is_file()
    res = qkd_in_process("export", str(run_dir), "--format", "int")
    assert res.returncode == 0, res.stderr
    assert "top-1 agreement 100.00 % with its exact (float64) answers, 100.00 % with its float32" in res.stdout
    last = (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns
    res = qkd_in_process("run", "--resume", str(run_dir))
    assert res.returncode == 0 and "after 1_ptq" in res.stdout
    assert (run_dir / "checkpoints" / "last.pt").stat().st_mtime_ns == last


def test_ptq_plan_has_no_teacher_and_no_epochs():
    cfg = load_config(None, ["method=ptq", "student.train_epochs=2"])
    assert [(s.key, s.epochs, s.uses_teacher) for s in run_plan(cfg)] == [("fp_student", 2, False),
                                                                         ("1_ptq", 0, False)]  # fmt: skip


@pytest.mark.parametrize(("overrides", "message"), [
    (["method=qat", "quant.ptq=adaround"], "quant.ptq=adaround is post-training quantization and applies to "
                                           "method=ptq only"),
    (["method=ptq", "quant.ptq=nearest"], "quant: unknown ptq 'nearest'; valid: calibrate, adaround"),
    (["method=ptq", "quant.ptq_images=0"], "quant: ptq_images must be a positive integer; got 0"),
])  # fmt: skip
def test_refusals(overrides, message):
    with pytest.raises(ConfigError, match="invalid config: ") as err:
        load_config(None, overrides)
    assert message in str(err.value) and "\n" not in str(err.value)


def test_epochs_given_with_ptq_are_refused_not_ignored():
    with pytest.raises(ConfigError, match=r"epochs=10 with method=ptq: post-training quantization trains nothing"):
        load_config(None, ["method=ptq", "epochs=10"])
    assert load_config("cifar10-resnet20-w4a4", ["method=ptq"]).method == "ptq"  # a preset's epochs give way


def test_refusal_on_the_command_line(tmp_path):
    res = qkd_in_process("run", "method=kd", "quant.ptq=adaround", "--out", str(tmp_path))
    assert res.returncode == 2 and "set method=ptq or drop quant.ptq" in res.stderr and not list(tmp_path.iterdir())


def test_a_ptq_run_is_reused_whatever_its_unused_budget(tmp_path):
    """``qkd.reuse``: a ptq run has no epochs (and trains nothing here), so epochs, split and optim are no part of
    it; a setting it computes with still is."""
    cfg = load_config(None, [*PTQ, "student.train_epochs=0", "name=p"])
    first = run_or_reuse(cfg, tmp_path)
    again = with_overrides(cfg, ["epochs=7", "split=[0.5, 0.5, 0]", "optim.lr=0.3"])  # as a saved config could hold
    assert run_or_reuse(again, tmp_path) == first
    other = load_config(None, [*PTQ, "student.train_epochs=0", "name=p", "quant.ptq=adaround"])
    with pytest.raises(QKDError, match=r"made with other settings \(quant.ptq\)"):
        run_or_reuse(other, tmp_path)
