"""Exported files carry their input contract: the fields, preprocessing baked into the graph, and
`qkd eval FILE` evaluating that very file (the README's examples run in tests/test_readme.py)."""

import json
import sys

import numpy as np
import onnx
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split

import qkd
from qkd import pipeline
from qkd.cli import main
from qkd.data.augment import normalize_affine
from qkd.errors import QKDError
from qkd.export import default_path, export_loaded, export_student, load_int, open_export, preprocess, raw_from_input

CASES = [("int", False), ("onnx", False), ("onnx", True), ("onnx-int", False), ("onnx-int", True)]


@pytest.fixture(scope="module")
def exports(demo_run, one_thread):
    """The demo run's student in every format, each checked on the whole test split."""
    _, run_dir, _ = demo_run
    loaded = pipeline.load_student(None, run_dir, "cpu")
    files = {(fmt, baked): export_loaded(loaded, fmt, default_path(run_dir, fmt, baked), bake_preprocessing=baked,
                                         verify=None) for fmt, baked in CASES}  # fmt: skip
    return loaded, files


def _test_split():
    digits = load_digits()
    _, images, _, labels = train_test_split(digits.images, digits.target, test_size=0.2, stratify=digits.target,
                                            random_state=0)  # fmt: skip
    return images, labels


def _contract_in_file(path):
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            manifest = json.loads(f.metadata()["qkd_manifest"])
        assert json.loads(path.with_name(path.name + ".json").read_text()) == manifest  # the copy beside it
        return manifest
    model = onnx.load(str(path))
    meta = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert model.doc_string == meta["preprocessing"] and model.graph.input[0].name == meta["input_name"]
    return meta


@pytest.mark.parametrize(("fmt", "baked"), CASES)
def test_every_export_carries_its_input_contract(exports, fmt, baked):
    loaded, files = exports
    exported = files[fmt, baked]
    meta = _contract_in_file(exported.path)
    data = loaded.data
    scale, shift = (t.flatten().tolist() for t in normalize_affine(data.mean, data.std))
    assert meta["export_format"] == fmt and meta["preprocessing_baked"] is baked
    assert meta["qkd_version"] == qkd.__version__
    assert (meta["input_name"], meta["input_layout"], meta["input_dtype"]) == ("input", "NCHW", "float32")
    assert meta["input_shape"] == ["batch", 1, 8, 8] and meta["image_size"] == [8, 8] and meta["in_channels"] == 1
    assert meta["mean"] == list(data.mean) and meta["std"] == list(data.std) and meta["pixel_max"] == 16
    assert meta["input_scale"] == scale and meta["input_shift"] == shift  # the loaders' own float32 numbers
    assert meta["class_names"] == [str(d) for d in range(10)] and meta["num_classes"] == 10
    q = (meta["weight_bits"], meta["act_bits"], meta["first_last_bits"], meta["quantizer"], meta["per_channel"])
    assert q == (2, 2, 8, "lsq", True)
    assert meta["model"] == "tiny_cnn" and meta["trained_to"] == "the end of the run"
    assert meta["data"]["name"] == "digits" and meta["color"] == "grayscale" and meta["resize"] is None
    assert ("round(v * 255 / 16)" in meta["preprocessing"]) is not baked
    assert {k: meta[k] for k in exported.contract} == exported.contract  # the int manifest holds the program too
    assert exported.check["images"] == 360 and exported.check["agreement_f64"] == 1.0


def test_the_contract_is_the_loaders_normalisation_and_baking_it_changes_no_logit(exports):
    loaded, files = exports
    images, labels = _test_split()  # scikit-learn's raw 0..16 digits, in the order of the run's test split
    contract = files["onnx", False].contract
    x = torch.cat([x for x, _ in loaded.data.test])
    assert torch.equal(torch.from_numpy(preprocess(images, contract)), x)  # bit for bit the run's input
    assert torch.equal(raw_from_input(x, loaded.data.mean, loaded.data.std, 16), torch.from_numpy(images[:, None]))
    for fmt in ("onnx", "onnx-int"):
        outside = open_export(files[fmt, False].path)[2](preprocess(images, contract))
        inside = open_export(files[fmt, True].path)[2](images[:, None].astype(np.float32))  # raw values in
        assert torch.equal(inside, outside)
        assert (inside.argmax(1).numpy() == labels).mean() == files[fmt, True].check["export_acc"]
        ops = [n.op_type for n in onnx.load(str(files[fmt, True].path)).graph.node]
        assert ops[:4] == ["Mul", "Round", "Mul", "Sub"]  # v * 255/16, rounded, then the normalisation
        assert not torch.equal(open_export(files[fmt, False].path)[2](images[:, None].astype(np.float32)), outside)


def _cli(monkeypatch, capsys, *args):
    monkeypatch.setattr(sys, "argv", ["qkd", *map(str, args)])
    with pytest.raises(SystemExit) as exit_:
        main()
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def _top1(out: str) -> float:
    return float(next(ln for ln in out.splitlines() if ln.strip().startswith("test top-1 %")).split()[-3])


def _one_line_error(code, err, needle):
    assert code == 2 and err.count("\n") == 1 and err.startswith("qkd: error: ") and needle in err, err


def test_eval_evaluates_the_given_file(demo_run, exports, tmp_path, monkeypatch, capsys):
    _, _, accuracy = demo_run
    for (fmt, baked), exported in exports[1].items():
        code, out, err = _cli(monkeypatch, capsys, "eval", exported.path, *["--backend", fmt] * baked)
        assert code == 0, err
        assert f"{fmt} export of tiny_cnn W2A2 lsq" in out and "(360 images)" in out
        assert _top1(out) == round(100 * exported.check["export_acc"], 2)
        assert abs(_top1(out) - 100 * accuracy) <= 100 / 360 + 0.005  # the run's accuracy, within one image
    # a file that differs is evaluated as it is: integer weights changed; an ONNX file's normalisation changed
    original = exports[1]["int", False].path
    tensors = load_file(original)
    with safe_open(str(original), framework="pt") as f:
        metadata = f.metadata()
    last = [k for k in tensors if k.endswith(".weight")][-1]
    tensors[last] = torch.zeros_like(tensors[last])
    save_file(tensors, tmp_path / "changed.safetensors", metadata=metadata)
    model = onnx.load(str(exports[1]["onnx", False].path))
    shift = next(p for p in model.metadata_props if p.key == "input_shift")
    shift.value = json.dumps([v + 2 for v in json.loads(shift.value)])
    onnx.save(model, tmp_path / "changed.onnx")
    for changed, exported in (("changed.safetensors", exports[1]["int", False]),
                              ("changed.onnx", exports[1]["onnx", False])):  # fmt: skip
        code, out, err = _cli(monkeypatch, capsys, "eval", tmp_path / changed)
        assert code == 0, err
        assert _top1(out) < 100 * exported.check["export_acc"] - 20


def test_eval_of_a_file_that_is_no_export_of_this_kind(demo_run, exports, tmp_path, monkeypatch, capsys):
    (tmp_path / "junk.onnx").write_bytes(b"not a model at all")
    model = onnx.load(str(exports[1]["onnx", False].path))
    del model.metadata_props[:]
    onnx.save(model, tmp_path / "foreign.onnx")
    int_file = exports[1]["int", False].path
    cases = [
        (["eval", tmp_path / "junk.onnx"], "is not a qkd export (int, onnx, onnx-int or executorch)"),
        (["eval", tmp_path / "foreign.onnx"], "is an ONNX model without qkd's metadata"),
        (["eval", int_file, "--engine", "onnx"], "is an int export, not onnx: evaluate it with --backend int"),
        (["eval", int_file, "quant.weight_bits=3"], "'quant.weight_bits=3' is not taken"),
        (["eval", f"{int_file}.json"], "is the manifest written beside an int export"),
        (["export", demo_run[1], "--format", "int", "--bake-preprocessing"], "applies to the ONNX formats"),
    ]
    for args, needle in cases:
        _one_line_error(*_cli(monkeypatch, capsys, *args)[::2], needle)
    with pytest.raises(QKDError, match="applies to the ONNX formats"):
        export_student(exports[0].student, "int", tmp_path / "s.safetensors", torch.zeros(2, 1, 8, 8), {}, True)


def test_an_export_without_a_run_says_what_it_does_not_know(exports, tmp_path):
    """From Python with no contract: the fields of the file itself, and no guessed normalisation."""
    path = tmp_path / "bare.onnx"
    export_student(exports[0].student, "onnx", path, torch.zeros(2, 1, 8, 8), {})
    fmt, meta, _ = open_export(path)
    assert fmt == "onnx" and meta["input_shape"] == ["batch", 1, 8, 8] and meta.get("mean") is None
    assert "qkd does not know how" in meta["preprocessing"]
    with pytest.raises(QKDError, match="no normalisation"):
        preprocess(np.zeros((1, 8, 8)), meta)
    _, manifest = load_int(exports[1]["int", False].path)
    assert preprocess(np.zeros((1, 8, 8)), manifest).shape == (1, 1, 8, 8)
