"""What an export is asked for: the formats, their file extensions, and the checks of a request that need no
model (no torch here), so that a misspelt format or count is refused before a run is read."""

from __future__ import annotations

import importlib.util

from qkd.errors import QKDError

EXTENSIONS = {"int": "safetensors", "onnx": "onnx", "onnx-int": "onnx", "executorch": "pte"}
FORMATS = tuple(EXTENSIONS)


def check_format(fmt: str, bake_preprocessing: bool = False, four_bit_storage: bool = False) -> None:
    """A one-line :class:`QKDError` for a format that is not one, preprocessing to bake into the int or .pte
    file, 4-bit storage asked of another format than the QDQ ONNX, or the executorch format without ExecuTorch
    installed."""
    if fmt not in FORMATS:
        raise QKDError(f"unknown export format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    if four_bit_storage and fmt != "onnx":
        raise QKDError(f"--four-bit-storage applies to --format onnx (QDQ codes in INT4/UINT4), not {fmt} (the int "
                       "format packs codes at their bit-width already)")  # fmt: skip
    if bake_preprocessing and fmt in ("int", "executorch"):
        raise QKDError(f"--bake-preprocessing applies to the ONNX formats (onnx, onnx-int); the {fmt} file's "
                       "contract says the preprocessing (qkd.export.contract.preprocess applies it)")  # fmt: skip
    if fmt == "executorch" and not has_executorch():
        raise QKDError("the executorch format needs ExecuTorch: pip install 'qkd-distill[executorch]'")


def has_executorch() -> bool:
    """Whether ExecuTorch can be imported (found without importing it)."""
    try:
        return importlib.util.find_spec("executorch") is not None
    except (ImportError, ValueError):  # ValueError: a module set to None in sys.modules (imports of it fail)
        return False


def check_limit(limit: int | None, name: str = "verify") -> None:
    """A one-line :class:`QKDError` for a count of images to check that is not 1 or more (None: all of them)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise QKDError(f"{name} is how many test images the export is checked on: 1 or more (e.g. 1000; a split "
                       f"holding fewer is checked whole), not {limit!r}")  # fmt: skip
