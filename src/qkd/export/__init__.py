"""Deployment of a quantized student: one integer program format, several targets, a checker and a reader.

>>> from qkd.export import export_run, load_int
>>> exported = export_run("runs/demo", "int")          # written, and checked against the trained model
>>> runtime, manifest = load_int(exported.path)

The modules: :mod:`~qkd.export.program` (the format: ops, terms, fixed-point bits),
:mod:`~qkd.export.grid` (each quantizer as an integer grid: the front part every exporter shares),
:mod:`~qkd.export.fixedpoint`, :mod:`~qkd.export.trace` (a model -> the program, with ``trace_calls``);
the targets :mod:`~qkd.export.int_file` (+ :mod:`~qkd.export.int_runtime`, ``packing``),
:mod:`~qkd.export.onnx_qdq` and :mod:`~qkd.export.onnx_int` (+ ``onnx_common``);
:mod:`~qkd.export.verify` (the checker), :mod:`~qkd.export.read` (an exported file back),
:mod:`~qkd.export.contract` (what a file takes) and :mod:`~qkd.export.api` (the entry points).
Names are imported on first use, so ``import qkd.export`` stays cheap (onnx only with an ONNX format).
"""

from __future__ import annotations

import importlib
import sys
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any

_PUBLIC = {
    "api": ("EXTENSIONS", "FORMATS", "Exported", "check_format", "default_path", "export_loaded", "export_run",
            "export_student", "float_checkpoint_bytes"),
    "read": ("DATA_CHANGES", "evaluate_export", "open_export"),
    "verify": ("compare", "float64_reference"),
    "contract": ("input_contract", "preprocess", "raw_from_input", "run_contract"),
    "int_file": ("load_int", "save_int"),
    "int_runtime": ("IntRuntime",),
    "onnx_qdq": ("export_onnx",),
    "onnx_int": ("export_onnx_int",),
    "onnx_common": ("onnx_runner", "run_onnx"),
    "trace": ("to_int_program", "to_real_program"),
    "program": ("OPS",),
}  # fmt: skip
_WHERE = {name: module for module, names in _PUBLIC.items() for name in names}
__all__ = sorted(_WHERE)

# The old module paths, each an alias holding the public names of the modules that replaced it.
OLD_PATHS = {
    "deploy": ("api", "verify", "read"),
    "intfile": ("int_file",),
    "intgraph": ("program", "fixedpoint", "trace"),
    "intengine": ("int_runtime", "fixedpoint"),
    "onnx": ("onnx_qdq",),
}


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
    globals()[name] = value
    return value


class _OldPaths(MetaPathFinder, Loader):
    """Imports ``qkd.export.<old>`` (:data:`OLD_PATHS`) as a module of the new modules' public names."""

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        return ModuleSpec(fullname, self) if package == __name__ and old in OLD_PATHS else None

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        new = [f"{__name__}.{m}" for m in OLD_PATHS[module.__name__.rpartition(".")[2]]]
        module.__doc__ = f"The old path of {', '.join(new)}, kept for old imports."
        for name in new:
            module.__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items() if k[0] != "_"})


if not any(isinstance(f, _OldPaths) for f in sys.meta_path):
    sys.meta_path.append(_OldPaths())
