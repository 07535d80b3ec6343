"""`qkd report`: the comparison table, the figures and the self-contained HTML page of several runs."""

import base64
import json
import re
import shutil

import pytest

from helpers import TINY
from helpers import qkd_in_process as qkd
from qkd.config import load_config
from qkd.report import figures, load_run, load_runs, write_report
from qkd.report.table import rows, shared_line

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory, one_thread):
    """Two finished digits runs (qkd W2A2 with an int export, qat W3A3) and a copy of the first cut short."""
    from qkd import pipeline
    from qkd.export import export_run

    out = tmp_path_factory.mktemp("report") / "runs"
    a, _ = pipeline.run(load_config(None, [*TINY, "name=qkd-w2"]), out)
    b, _ = pipeline.run(load_config(None, [*TINY, "method=qat", "quant.weight_bits=3", "quant.act_bits=3",
                                           "name=qat-w3"]), out)  # fmt: skip
    export_run(a, "int", verify=50)
    cut = out.parent / "cut" / "qkd-cut"  # as a run stopped after two epochs of its quantized stages leaves it
    shutil.copytree(a, cut)
    (cut / "summary.json").unlink()
    shutil.rmtree(cut / "export")
    history = (cut / "metrics.jsonl").read_text().splitlines()
    (cut / "metrics.jsonl").write_text("\n".join(history[:4]) + "\n")  # fp_teacher, fp_student, 2 of 1_self_study
    return a, b, cut


def test_table_says_what_each_run_reached(runs):
    a, b, cut = runs
    table = {r["run"]: r for r in rows(load_runs([a, b, cut]))}
    sa, sb = (json.loads((p / "summary.json").read_text()) for p in (a, b))
    qkd_row, qat_row = table["qkd-w2"], table["qat-w3"]
    assert (qkd_row["method"], qkd_row["bits"], qat_row["method"], qat_row["bits"]) == ("qkd", "W2A2", "qat", "W3A3")
    assert qkd_row["test %"] == f"{100 * sa['stages']['3_tutor']['test']:.2f}"
    assert qkd_row["val %"] == f"{100 * sa['stages']['3_tutor']['val']:.2f}"
    assert qkd_row["float %"] == f"{100 * sa['student_fp']['test']:.2f}"
    assert qat_row["test %"] == f"{100 * sb['stages']['1_self_study']['test']:.2f}"
    assert qkd_row["per phase, test %"].count("→") == 2 and qkd_row["per phase, test %"].startswith("self-study")
    assert qkd_row["vs float"] == f"{100 * (sa['stages']['3_tutor']['test'] - sa['student_fp']['test']):+.2f}"
    size = (a / "export" / "student-int.safetensors").stat().st_size
    assert qkd_row["int export"].startswith(f"{size / 1024:.1f} KiB (") and qat_row["int export"] == "-"
    chance = sa["at_chance"]  # the tiny 1-epoch teacher may end at chance: the table says so
    assert qkd_row["status"] == "finished" + (f"; AT CHANCE: {', '.join(chance)}" if chance else "")
    last = json.loads((cut / "metrics.jsonl").read_text().splitlines()[-1])
    assert table["qkd-cut"]["status"] == f"unfinished: {last['stage']} epoch {last['epoch']} of {last['epochs']}"
    assert table["qkd-cut"]["test %"] == "-"  # no test figure before the end: nothing invented
    same = {"data": "cifar10", "student": "MobileNetV2"}
    assert shared_line([same, same]) == "All runs: data cifar10, student MobileNetV2"  # names as they are


def test_report_command_writes_table_figures_and_one_self_contained_page(runs, tmp_path):
    a, b, _ = runs
    res = qkd("report", str(a), str(b), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert "qkd-w2" in res.stdout and "qat-w3" in res.stdout and "report.html" in res.stdout
    rep = tmp_path / "rep"
    for name in ("accuracy-per-epoch.png", "accuracy-vs-bits.png"):
        assert (rep / name).read_bytes().startswith(PNG) and (rep / name).stat().st_size > 10_000
    page = (rep / "report.html").read_text()
    assert "qkd-w2" in page and "qat-w3" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 2 and all(base64.b64decode(i).startswith(PNG) for i in images)
    assert not re.search(r'(src|href)="(http|//|file:)', page)  # opens anywhere, offline: nothing outside the page
    md = (rep / "report.md").read_text()
    assert md.count("| qkd-w2 |") == 1 and "![accuracy-per-epoch](accuracy-per-epoch.png)" in md


def test_report_of_a_folder_of_runs_and_bad_targets(runs, tmp_path):
    a, _, cut = runs
    res = qkd("report", str(a.parent), str(cut), "--out", str(tmp_path / "rep"))
    assert res.returncode == 0, res.stderr
    assert all(n in res.stdout for n in ("qkd-w2", "qat-w3", "qkd-cut")) and "unfinished" in res.stdout
    (tmp_path / "a-file").write_text("kept")
    for target, out, says in ((tmp_path / "nothing", "rep2", "does not exist"), (tmp_path / "rep", "rep2",
                              "not a run folder"), (a, "a-file", "is a file")):  # fmt: skip
        res = qkd("report", str(target), "--out", str(tmp_path / out))
        assert res.returncode == 2 and says in res.stderr and len(res.stderr.strip().splitlines()) == 1
        assert "Traceback" not in res.stderr and not (tmp_path / "rep2").exists()
    assert (tmp_path / "a-file").read_text() == "kept"


def test_epoch_curve_follows_the_quantized_stages_with_their_boundaries(runs):
    a, _, cut = runs
    run = load_run(a)
    curve, metric = figures.run_curve(run, "C0")
    stages = run.curve_stages()
    assert metric == "val" and [s["key"] for s in stages] == ["1_self_study", "2_co_study", "3_tutor"]
    assert curve.x == list(range(1, sum(s["epochs"] for s in stages) + 1))
    quantized = [r for r in run.history if r["stage"] in {s["key"] for s in stages}]
    assert curve.y == [100 * r["val_acc"] for r in quantized]
    assert [name for _, name in curve.boundaries] == ["2_co_study", "3_tutor"]
    teacher = [r for r in quantized if "teacher_val_acc" in r]
    assert curve.extra is not None and len(curve.extra[0]) == len(teacher) > 0  # the teacher in co-study
    partial, _ = figures.run_curve(load_run(cut), "C1")
    assert len(partial.x) == 2 and "unfinished" in partial.label


def test_python_api_and_a_report_without_a_finished_quantized_run(runs, tmp_path):
    _, _, cut = runs
    made = write_report(load_runs([cut]), tmp_path / "rep")
    assert made.html.is_file() and [p.name for p in made.figures] == ["accuracy-per-epoch.png"]  # no bits figure
    assert "qkd-cut" in made.text


def test_a_float_teacher_run_is_reported_as_float_training(runs, tmp_path):
    """`qkd train-fp --role teacher` trains the teacher only: the row and curve are the teacher's, method float."""
    from qkd.report.runs import Run

    stages = [{"key": "fp_teacher", "phase": "self_study", "epochs": 2, "quantized": False, "role": "teacher"}]
    history = [{"stage": "fp_teacher", "epoch": e, "epochs": 2, "val_acc": 0.5 + e / 10, "time_s": 1.0} for e in (1, 2)]
    summary = {"method": "qkd", "student": "tiny_cnn", "teacher": "tiny_cnn_wide", "bits": {"weight": 2, "act": 2},
               "stages": {"fp_teacher": {**stages[0], "val": 0.7, "test": 0.71, "wall_s": 2.0}}}  # fmt: skip
    run = Run(tmp_path / "fp-teacher", {"method": "qkd", "data": {"name": "digits"}}, stages, history, summary)
    (row,) = rows([run])
    assert (row["method"], row["bits"], row["student"], row["test %"]) == ("float", "float", "tiny_cnn_wide", "71.00")
    assert row["per phase, test %"] == "float training 71.00" and row["float %"] == row["vs float"] == "-"
    curve, _ = figures.run_curve(run, "C0")
    assert curve.y == [60.0, 70.0] and curve.label == "fp-teacher: float"
    assert figures.accuracy_vs_bits([run]) is None
