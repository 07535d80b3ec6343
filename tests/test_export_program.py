"""The integer program format: every integer backend implements every op; the public names and the old module
paths of qkd.export import."""

import importlib

import pytest

import qkd.export
from qkd.export import program
from qkd.export.int_runtime import IntRuntime
from qkd.export.onnx_int import OnnxIntBuilder

BACKENDS = (IntRuntime, OnnxIntBuilder)  # the int runtime and the integer ONNX exporter


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: b.__name__)
def test_every_integer_backend_implements_every_op(backend):
    assert program.missing_ops(backend) == [], f"{backend.__name__} lacks ops of qkd.export.program.OPS"


def test_an_op_added_without_its_implementations_is_caught(monkeypatch):
    monkeypatch.setattr(program, "OPS", (*program.OPS, "gelu"))
    assert all(program.missing_ops(backend) == ["gelu"] for backend in BACKENDS)


def test_public_names_import():
    assert all(getattr(qkd.export, name) is not None for name in qkd.export.__all__)
    with pytest.raises(AttributeError):
        qkd.export.no_such_name  # noqa: B018


OLD_NAMES = {
    "deploy": ("EXTENSIONS", "FORMATS", "Exported", "check_format", "check_split", "compare", "default_path",
               "evaluate_export", "export_loaded", "export_run", "export_student", "float64_reference",
               "float_checkpoint_bytes", "open_export", "require_quantized", "DATA_CHANGES"),
    "intfile": ("FORMAT", "READS", "load_int", "save_int", "write_export"),
    "intgraph": ("FRAC_BITS", "LAYERS", "ACTIVATIONS", "SHAPE_OPS", "OPS", "TERMS", "fixed_multiplier",
                 "pool_windows", "to_int_program", "to_real_program"),
    "intengine": ("IntEngine", "INT32", "INT64_SAFE", "ONE", "mul_round", "shift_round", "thresholds"),
    "onnx": ("export_onnx", "onnx_runner", "run_onnx", "storage_type"),
    "onnx_int": ("export_onnx_int", "OPSET"),
    "contract": ("preprocess", "raw_from_input", "run_contract", "input_contract", "read_onnx_contract"),
    "packing": ("pack_bits", "unpack_bits"),
}  # fmt: skip


@pytest.mark.parametrize("old", list(OLD_NAMES))
def test_old_module_paths_keep_their_names(old):
    module = importlib.import_module(f"qkd.export.{old}")
    assert [n for n in OLD_NAMES[old] if not hasattr(module, n)] == []
    assert importlib.import_module("qkd.export.intengine").IntEngine is IntRuntime
