"""The int file: the integer program packed into one safetensors file plus a JSON manifest; its runtime is
:class:`~qkd.export.int_runtime.IntRuntime` (:func:`load_int` returns one).

Weights are stored at their bit-width (two 4-bit or four 2-bit values per byte, see
:mod:`qkd.export.packing`); requantization multipliers and shifts as int32, biases as int64 fixed point; the op list
(the network's structure) as the manifest, both inside the file's metadata and beside it as
``<file>.json`` for people and other tools.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from qkd.errors import QKDError
from qkd.export.contract import write_export
from qkd.export.int_runtime import IntRuntime
from qkd.export.packing import pack_bits, unpack_bits
from qkd.export.program import FRAC_BITS, LAYERS

FORMAT = "qkd-int/4"  # 3: affine (interval) grids, with the extra terms of program.TERMS; 4: torchvision's ops
READS = ("qkd-int/2", "qkd-int/3", FORMAT)  # each a subset of the next: /2 has LSQ grids only, /3 no ops of /4


def _layer_ops(ops: list[dict]) -> dict[str, dict]:
    return {op["name"]: op for op in ops if op["op"] in LAYERS}


def save_int(path: str | Path, ops: list[dict], tensors: dict[str, torch.Tensor], info: dict[str, Any]) -> Path:
    """Write the integer program atomically; returns the path. ``info`` goes into the manifest."""
    path = Path(path)
    stored = {}
    layers = _layer_ops(ops)
    for key, value in tensors.items():
        name, field = key.rsplit(".", 1)
        if field == "weight":
            lo = layers[name]["w_range"][0]
            stored[key] = torch.from_numpy(pack_bits(value.numpy(), layers[name]["w_bits"], lo))
        else:  # biases and input offsets are int64 fixed point; multipliers and shifts fit int32
            stored[key] = value if field in ("bias", "in_offset") else value.to(torch.int32)
    manifest = {"format": FORMAT, "frac_bits": FRAC_BITS, **info, "ops": ops}
    write_export(path, safetensors_bytes(stored, metadata={"qkd_manifest": json.dumps(manifest)}))
    write_export(path.with_name(path.name + ".json"), json.dumps(manifest, indent=1).encode())
    return path


def load_int(path: str | Path) -> tuple[IntRuntime, dict[str, Any]]:
    """Read a packed integer checkpoint back into an :class:`~qkd.export.int_runtime.IntRuntime` and its manifest.

    >>> runtime, manifest = load_int("runs/demo/export/student-int.safetensors")
    """
    path = Path(path)
    if not path.is_file():
        raise QKDError(f"integer checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            manifest = json.loads(f.metadata()["qkd_manifest"])
        stored = load_file(str(path))
    except Exception as e:
        raise QKDError(f"{path} is not a qkd integer checkpoint: {str(e).splitlines()[0]}") from None
    if manifest.get("format") not in READS or manifest.get("frac_bits") != FRAC_BITS:
        raise QKDError(f"{path} has format {manifest.get('format')}; this qkd reads {', '.join(READS)}")
    layers = _layer_ops(manifest["ops"])
    tensors = {}
    for key, value in stored.items():
        name, field = key.rsplit(".", 1)
        if field == "weight":
            op = layers[name]
            count = int(np.prod(op["w_shape"]))
            codes = unpack_bits(value.numpy(), op["w_bits"], op["w_range"][0], count)
            tensors[key] = torch.from_numpy(codes).view(op["w_shape"])
        else:
            tensors[key] = value.long()
    return IntRuntime(manifest["ops"], tensors), manifest
