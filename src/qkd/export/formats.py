"""What an export is asked for: the formats, their file extensions, and the checks of a request that need no
model (no torch here), so that a misspelt format or count is refused before a run is read."""

from __future__ import annotations

from qkd.errors import QKDError

EXTENSIONS = {"int": "safetensors", "onnx": "onnx", "onnx-int": "onnx"}
FORMATS = tuple(EXTENSIONS)


def check_format(fmt: str, bake_preprocessing: bool = False, four_bit_storage: bool = False) -> None:
    """A one-line :class:`QKDError` for a format that is not one, preprocessing to bake into the int file, or 4-bit
    storage asked of another format than the QDQ ONNX."""
    if fmt not in FORMATS:
        raise QKDError(f"unknown export format '{fmt}'; valid formats: {', '.join(FORMATS)}")
    if four_bit_storage and fmt != "onnx":
        raise QKDError(f"--four-bit-storage applies to --format onnx (QDQ codes in INT4/UINT4), not {fmt} (the int "
                       "format packs codes at their bit-width already)")  # fmt: skip
    if bake_preprocessing and fmt == "int":
        raise QKDError("--bake-preprocessing applies to the ONNX formats (onnx, onnx-int); the int file's "
                       "manifest says the preprocessing (qkd.export.contract.preprocess applies it)")  # fmt: skip


def check_limit(limit: int | None, name: str = "verify") -> None:
    """A one-line :class:`QKDError` for a count of images to check that is not 1 or more (None: all of them)."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise QKDError(f"{name} is how many test images the export is checked on: 1 or more (e.g. 1000; a split "
                       f"holding fewer is checked whole), not {limit!r}")  # fmt: skip
