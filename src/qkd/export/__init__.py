"""Deployment of a quantized student: one integer program format, several targets, a checker and a reader.

>>> from qkd.export import export_run, load_int
>>> exported = export_run("runs/demo", "int")          # written, and checked against the trained model
>>> runtime, manifest = load_int(exported.path)

The modules: :mod:`~qkd.export.program` (the format: ops, terms, fixed-point bits),
:mod:`~qkd.export.grid` (each quantizer as an integer grid: the front part every exporter shares),
:mod:`~qkd.export.fixedpoint`, :mod:`~qkd.export.trace` (a model -> the program, with ``trace_calls``);
the targets :mod:`~qkd.export.int_file` (+ :mod:`~qkd.export.int_runtime`, ``packing``),
:mod:`~qkd.export.onnx_qdq` and :mod:`~qkd.export.onnx_int` (+ ``onnx_common``),
:mod:`~qkd.export.executorch_pte` (an ExecuTorch program lowered to XNNPACK);
:mod:`~qkd.export.verify` (the checker), :mod:`~qkd.export.read` (an exported file back),
:mod:`~qkd.export.contract` (what a file takes) and :mod:`~qkd.export.api` (the entry points).
Names are imported on first use, so ``import qkd.export`` stays cheap (onnx only with an ONNX format).
"""

from qkd.lazy import keep_old_paths, lazy_names

_PUBLIC = {
    "api": ("Exported", "default_path", "export_loaded", "export_model", "export_run", "export_student",
            "float_checkpoint_bytes"),
    "formats": ("EXTENSIONS", "FORMATS", "check_format", "check_limit"),
    "read": ("DATA_CHANGES", "evaluate_export", "open_export"),
    "verify": ("compare", "float64_reference"),
    "contract": ("input_contract", "preprocess", "raw_from_input", "run_contract"),
    "int_file": ("load_int", "save_int"),
    "int_runtime": ("IntRuntime",),
    "onnx_qdq": ("export_onnx",),
    "onnx_int": ("export_onnx_int",),
    "executorch_pte": ("export_executorch", "load_pte"),
    "onnx_common": ("onnx_runner", "run_onnx"),
    "trace": ("to_int_program", "to_real_program"),
    "program": ("OPS",),
}  # fmt: skip
__getattr__, __all__ = lazy_names(__name__, _PUBLIC)

# The old module paths, each an alias holding the public names of the modules that replaced it.
OLD_PATHS = {
    "deploy": ("api", "formats", "verify", "read"),
    "intfile": ("int_file",),
    "intgraph": ("program", "fixedpoint", "trace"),
    "intengine": ("int_runtime", "fixedpoint"),
    "onnx": ("onnx_qdq",),
}
keep_old_paths(__name__, OLD_PATHS)
