"""quant.budget: the bits of each layer chosen within a weight-size or BOPs budget, the refusals, the run's record of
the choice (kept on resume), and exact exports of the mixed-bit student."""

import copy
import itertools
import json
import random
from dataclasses import replace

import pytest
import torch
from torch.nn import functional as F

import qkd
from helpers import StopAfter, UserNet, digits_loaders, qkd_in_process
from qkd import pipeline
from qkd.config import load_config
from qkd.errors import ConfigError, QKDError
from qkd.export import compare, export_model, export_run
from qkd.quant import QuantConfig, calibrate, quantization_summary, quantize_model, set_quantization
from qkd.quant.budget import allocate, assigned, count_macs, plan_budget, sensitivities
from qkd.quant.config import Budget

# tiny_cnn on digits: conv 144 weights and fc 320 at 8 bits (first/last rule), 4,608 + 9,216 allocated
QUICK = ["method=qat", "epochs=2", "student.train_epochs=0", "data.batch_size=256"]
FIXED = 144 + 320  # bytes
SMALLEST, LARGEST, FLOAT = FIXED + (4608 + 9216) * 2 // 8, FIXED + 4608 + 9216, (144 + 4608 + 9216 + 320) * 4


def _one_line_error(res, needle: str) -> None:
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert res.returncode == 2, res.stderr
    assert len(lines) == 1 and lines[0].startswith("qkd: error: "), res.stderr
    assert needle in lines[0], lines[0]


# ----- settings -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("given", "limit"), [({"weights": "150KiB"}, 153600), ({"weights": "0.2MiB"}, 209715),
                                              ({"weights": "150000B"}, 150000), ({"weights": 1500}, 1500),
                                              ({"weights": "1.5KB"}, 1500), ({"bops": "1.2G"}, 1_200_000_000),
                                              ({"bops": 3e6}, 3_000_000), ({"bops": "250M"}, 250_000_000)])  # fmt: skip
def test_budget_units(given, limit):
    budget = Budget(**given, bits=[8, 2, 4, 4])
    assert budget.limit == limit and budget.bits == [2, 4, 8]


@pytest.mark.parametrize(("given", "needle"), [
    ({"weights": "150kib"}, "is not understood; give a number with one of the units B, KB"),
    ({"weights": "-3KiB"}, "is not understood"),
    ({"bops": "1GiB"}, "units K, M, G, T"),
    ({"weights": 0}, "must be a positive amount"),
    ({}, "give exactly one"),
    ({"weights": "1KiB", "bops": "1G"}, "give exactly one"),
    ({"weights": "1KiB", "bits": [1, 4]}, "bits must be an integer from 2 to 8"),
    ({"weights": "1KiB", "bits": []}, "quant.budget.bits must be a list"),
])  # fmt: skip
def test_budget_refusals(given, needle):
    with pytest.raises(ValueError, match=needle):
        Budget(**given)
    with pytest.raises(ConfigError, match=needle):  # as the command line gives it: one line naming the key
        load_config(None, [f"quant.budget={json.dumps(given)}"])


def test_the_preset_bits_give_way_but_the_users_are_refused():
    cfg = load_config("cifar10-resnet20-w3a3", ["quant.budget.weights=150KiB"])
    assert cfg.quant.budget == Budget(weights="150KiB") and cfg.quant.budget.bits == [2, 3, 4, 8]
    with pytest.raises(ConfigError, match="quant.weight_bits=4 with quant.budget: the budget chooses every"):
        load_config("cifar10-resnet20-w3a3", ["quant.budget.weights=150KiB", "quant.weight_bits=4"])
    with pytest.raises(ConfigError, match="weight_bits and act_bits with quant.budget"):
        qkd.fit(UserNet(), None, [], method="qat", quant={"budget": {"weights": "1KiB"}, "weight_bits": 4,
                                                          "act_bits": 4})  # fmt: skip
    with pytest.raises(ValueError, match="a budget chooses weight and activation bits together"):
        QuantConfig(weight_bits=None, budget=Budget(weights="1KiB"))
    with pytest.raises(ValueError, match="^weight_bits with quant.budget: the budget chooses every layer's bits"):
        QuantConfig(weight_bits=4, budget=Budget(weights="1KiB"))  # the default's value, but given
    with pytest.raises(ValueError, match="^weight_bits and act_bits with quant.budget"):
        QuantConfig(3, 3, budget={"weights": "1KiB"})
    assert QuantConfig(budget={"weights": "1KiB"}).budget == Budget(weights="1KiB")
    assert replace(QuantConfig(budget={"weights": "1KiB"}), budget=None).weight_bits == 4  # qkd's own replace


@pytest.mark.parametrize(("budget", "needle"), [
    ("quant.budget.weights=3000B", f"is below what these bits can meet: with bits [2, 3, 4, 8] this model's weight "
                                   f"size is from {SMALLEST / 1024:.1f} KiB (all at 2 bits) to {LARGEST / 1024:.1f} "
                                   f"KiB (all at 8 bits), {FLOAT / 1024:.1f} KiB in float"),
    ("quant.budget.weights=1MiB", "is above the float model's"),
    ("quant.budget.weights=150QB", "quant.budget.weights='150QB' is not understood"),
    ("quant.weight_bits=3", "quant.weight_bits=3 with quant.budget"),
    ("quant.budget.bops=10", "quant.budget.bops=10 (1e-05 MBOPs) is below what these bits can meet"),
])  # fmt: skip
def test_run_refuses_a_budget_it_cannot_meet_and_writes_nothing(tmp_path, budget, needle):
    extra = ["quant.budget.weights=8000B"] if budget.startswith("quant.weight_bits") else []
    res = qkd_in_process("run", *QUICK, *extra, budget, "--out", str(tmp_path / "runs"))
    _one_line_error(res, needle)
    assert not (tmp_path / "runs").exists()


# ----- the allocation -------------------------------------------------------------------------------------------
def _brute_force(costs, sens, limit):
    fits = [c for c in itertools.product(*(range(len(r)) for r in costs))
            if sum(costs[i][j] for i, j in enumerate(c)) <= limit]  # fmt: skip
    return min((sum(sens[i][j] for i, j in enumerate(c)) for c in fits), default=None)


@pytest.mark.parametrize("seed", range(40))
def test_allocation_is_optimal_and_never_over_budget(seed):
    rng = random.Random(seed)
    layers, widths = rng.randint(1, 6), rng.randint(1, 3)
    costs = [sorted(rng.randint(1, 40) for _ in range(widths)) for _ in range(layers)]
    sens = [sorted((rng.uniform(-0.1, 3) for _ in range(widths)), reverse=True) for _ in range(layers)]
    if seed % 2:  # not only the usual shape: costlier need not mean less sensitive
        sens = [[rng.uniform(-1, 3) for _ in range(widths)] for _ in range(layers)]
    limit = rng.randint(0, sum(max(r) for r in costs) + 5)
    chosen, best = allocate(costs, sens, limit), _brute_force(costs, sens, limit)
    if best is None:
        assert chosen is None
        return
    assert sum(costs[i][j] for i, j in enumerate(chosen)) <= limit
    assert sum(sens[i][j] for i, j in enumerate(chosen)) == pytest.approx(best, abs=1e-12)


def test_plan_counts_bytes_and_bops():
    torch.manual_seed(0)
    model = UserNet(8)  # stem (in place) and head fixed at 8 bits; block.branch.0 (144 weights), down.0 (1,152)
    x = torch.randn(2, 1, 8, 8)
    plan = plan_budget(model, QuantConfig(budget=Budget(weights="1000B", bits=[2, 4])))
    assert plan.allocated == {"block.branch.0": [36, 72], "down.0": [288, 576]}
    assert plan.fixed == {"stem.0": (8, 8), "head": (8, 8)} and plan.fixed_cost == 72 + 160
    probe = quantize_model(copy.deepcopy(model), QuantConfig())
    macs = count_macs(probe, x)  # per image: 8x8 positions x 9 x 8 ... ; down: 4x4 positions
    assert macs == {"stem.0": 64 * 9 * 8, "block.branch.0": 64 * 9 * 4 * 4, "down.0": 16 * 9 * 8 * 16, "head": 160}
    over = QuantConfig(budget=Budget(bops="1G", bits=[2, 4]), overrides={"down.*": {"weight_bits": 2}})
    with pytest.raises(QKDError, match="is above the float model's"):
        plan_budget(model, over, x)
    plan = plan_budget(model, QuantConfig(budget=Budget(bops="1M", bits=[2, 4]), overrides=over.overrides), x)
    assert plan.fixed["down.0"] == (2, 4)  # an override's unset side keeps act_bits (4, the default)
    assert plan.allocated == {"block.branch.0": [macs["block.branch.0"] * 4, macs["block.branch.0"] * 16]}


# ----- a run within budget --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def budget_run(tmp_path_factory, one_thread):
    """A digits QAT run of tiny_cnn within 8,000 bytes of weights, interrupted after its first epoch and resumed
    (with the bits it chose then), as the command line starts it."""
    out = tmp_path_factory.mktemp("budget") / "runs"
    cfg = load_config(None, [*QUICK, "quant.budget.weights=8000B", "name=b"])
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg, out, on_epoch_end=StopAfter(1))
    first = json.loads((out / "b" / "quantization.json").read_text())
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("qkd.train.trainer.choose_student_bits", lambda *a: pytest.fail("resume chose bits again"))
        _, summary = pipeline.resume(out / "b")
    return out / "b", first, summary


def test_run_chooses_bits_within_budget_and_records_them(budget_run):
    run_dir, first, summary = budget_run
    budget, table = summary["budget"], json.loads((run_dir / "quantization.json").read_text())
    assert table["budget"] == first["budget"] == budget  # the resumed run kept the bits chosen at its start
    assert budget["unit"] == "weights" and budget["limit"] == 8000 and budget["achieved"] <= 8000
    assert (budget["smallest"], budget["largest"], budget["float"]) == (SMALLEST, LARGEST, FLOAT)
    assert budget["fixed"] == {"features.0.0": [8, 8], "fc": [8, 8]}
    assert set(budget["bits"]) == {"features.1.0", "features.2.0"} and set(budget["sensitivity"]) == set(budget["bits"])
    rows = {r["name"]: (r["weight_bits"], r["act_bits"]) for r in table["layers"]}
    assert rows == {"features.0.0": (8, 8), "fc": (8, 8), **{n: (b, b) for n, b in budget["bits"].items()}}
    size = sum(-(-n * rows[k][0] // 8) for k, n in {"features.0.0": 144, "features.1.0": 4608,
                                                     "features.2.0": 9216, "fc": 320}.items())  # fmt: skip
    assert size == budget["achieved"]
    assert summary["bits"]["weight"] == "mixed" and summary["stages"]["1_self_study"]["epochs"] == 2


@pytest.mark.parametrize("fmt", ["int", "onnx", "onnx-int"])
def test_a_budget_run_exports_exactly(budget_run, tmp_path, fmt):
    pytest.importorskip("onnxruntime")
    exported = export_run(budget_run[0], fmt, tmp_path / f"student.{fmt}", verify=200)
    print(fmt, exported.check)
    assert exported.check["agreement_f64"] == 1.0 and exported.check["max_logit_diff_f64"] < 1e-4


def test_fit_within_a_bops_budget_resumed_and_exact_exports_of_its_mixed_bits(tmp_path, one_thread):
    train, val = digits_loaders()
    torch.manual_seed(0)
    quant, student = QuantConfig(budget=Budget(bops="300K", bits=[2, 3, 4]), first_last_bits="same"), UserNet(8)
    settings = dict(method="qat", epochs=2, quant=quant, optim={"lr": 0.05}, out=tmp_path / "r")
    with pytest.raises(KeyboardInterrupt):
        qkd.fit(student, None, train, val, on_epoch_end=StopAfter(1), **settings)
    chosen = json.loads((tmp_path / "r" / "quantization.json").read_text())["budget"]
    result = qkd.fit(student, None, train, val, resume=True, **settings)  # the same object, quantized: resumed
    budget = result.summary["budget"]
    assert budget == chosen
    assert budget["unit"] == "bops" and budget["achieved"] <= 300_000 and not budget["fixed"]
    assert len(set(budget["bits"].values())) > 1, budget  # a budget between the widths: mixed
    x, y = next(iter(val))
    for fmt in ("int", "onnx-int", "onnx"):
        if fmt != "int":
            pytest.importorskip("onnxruntime")
        run = export_model(result.student, fmt, tmp_path / f"s.{fmt}", x[:2], {})
        check = compare(run, result.student, [(x, y)], exact=True)
        print(fmt, check)
        assert check["agreement_f64"] == 1.0 and check["max_logit_diff_f64"] < 1e-4, (fmt, check)


def test_sensitivity_is_the_loss_increase_with_one_layer_quantized():
    torch.manual_seed(0)
    model, quant = UserNet(8).eval(), QuantConfig(budget=Budget(weights="1KiB", bits=[2, 4]))
    batches = [(torch.randn(16, 1, 8, 8), torch.randint(0, 10, (16,))) for _ in range(2)]
    names = ["stem.0", "down.0", "head"]
    found = sensitivities(model, quant, names, batches, F.cross_entropy)
    base = sum(F.cross_entropy(model(x), y).item() for x, y in batches) / 2
    for name, b in itertools.product(names, (2, 4)):  # the reference: calibrate with that layer alone on
        alone = quantize_model(copy.deepcopy(model), QuantConfig(weight_bits=b, act_bits=b, first_last_bits="same"))
        set_quantization(alone, False)
        set_quantization(alone.get_submodule(name), True)
        calibrate(alone, batches[0][0])
        with torch.no_grad():
            want = sum(F.cross_entropy(alone(x), y).item() for x, y in batches) / 2 - base
        assert found[name][[2, 4].index(b)] == pytest.approx(want, abs=1e-6), (name, b)
    assert found["down.0"][0] > found["down.0"][1] > 0  # 2 bits cost more than 4


def test_assigned_bits_quantize_each_layer_at_its_width():
    model = UserNet(8)
    quant = QuantConfig(budget=Budget(weights="1KiB"), overrides={"head": {"act_bits": 6}})
    quantize_model(model, assigned(quant, {"block.branch.0": 2, "down.0": 3}))
    calibrate(model, torch.randn(4, 1, 8, 8))
    rows = {r["name"]: (r["weight_bits"], r["act_bits"]) for r in quantization_summary(model).rows}
    assert rows == {"stem.0": (8, 8), "block.branch.0": (2, 2), "down.0": (3, 3), "head": (8, 6)}
    with pytest.raises(QKDError, match="quantize_model takes each layer's bits, not a budget"):
        quantize_model(UserNet(8), quant)  # not silently at weight_bits
