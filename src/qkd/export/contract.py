"""The input contract of an exported file: what it takes, how to prepare it, what it is, inside the file.

Every export carries the same fields: an ONNX file (``onnx``, ``onnx-int``) as ``metadata_props``, each value
JSON (``json.loads`` reads every one), the int file in its JSON manifest. The preparation, for images whose raw
values ``v`` run from 0 to ``pixel_max`` (255 for 8-bit images; 16 for scikit-learn's digits), channels first::

    p = round(v * 255 / pixel_max)          # 0..255 pixels (p = v for 8-bit images)
    x = p * input_scale - input_shift       # float32, per channel: (p / 255 - mean) / std as the run computed it

``input_scale`` and ``input_shift`` are the float32 numbers the run's data loaders used, so ``x`` is bit for bit
the input the network was trained and evaluated on. With ``preprocessing_baked`` (``qkd export
--bake-preprocessing``) the graph computes both lines itself and takes ``v``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from qkd.checkpoint import atomic_write
from qkd.errors import QKDError

#: data sets whose raw values are not 0..255 (the pipeline stores them as round(v * 255 / pixel_max))
PIXEL_MAX = {"digits": 16}
CLASS_NAMES = {
    "digits": [str(d) for d in range(10)],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
}
#: the evaluation transform of image folders (qkd.data.sources): resize, centre crop, then the normalisation
IMAGEFOLDER_RESIZE = {"shorter_side": 256, "interpolation": "bilinear", "center_crop": 224}
INPUT_NAME = "input"


def run_contract(cfg: Any, data: Any, where: str) -> dict[str, Any]:
    """The contract fields a run knows: model, bits, data normalisation, classes, and the data settings that
    ``qkd eval FILE`` rebuilds the test split from. ``cfg``: a RunConfig; ``data``: its DataBundle."""
    q, name = cfg.quant, cfg.data.name.strip().lower()
    return {
        "model": cfg.student.name,
        "trained_to": where,
        "weight_bits": q.weight_bits if q.budget is None else "mixed",  # per layer within quant.budget
        "act_bits": q.act_bits if q.budget is None else "mixed",
        "first_last_bits": q.first_last_bits,
        "quantizer": q.method,
        "per_channel": q.per_channel,
        **input_contract(
            mean=data.mean,
            std=data.std,
            num_classes=data.num_classes,
            class_names=_class_names(name, cfg.data.root),
            pixel_max=PIXEL_MAX.get(name, 255),
            color=_color(name, data.in_channels),
            resize=IMAGEFOLDER_RESIZE if name == "imagefolder" else None,
        ),
        "data": {**cfg.model_dump(mode="json")["data"], "seed": cfg.seed},
    }


def input_contract(
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    num_classes: int | None = None,
    class_names: Sequence[str] | None = None,
    pixel_max: int = 255,
    color: str | None = None,
    resize: dict | None = None,
) -> dict[str, Any]:
    """The normalisation part of a contract, for ``export_student(..., info)`` from Python: ``mean``/``std`` of
    ``pixels / 255`` per channel (None: unknown, your own data pipeline normalises)."""
    scale = shift = None
    if mean is not None and std is not None:
        from qkd.data.augment import normalize_affine  # the loaders' own float32 numbers

        scale_t, shift_t = normalize_affine(mean, std)
        scale, shift = scale_t.flatten().tolist(), shift_t.flatten().tolist()
    return {
        "num_classes": num_classes,
        "class_names": list(class_names) if class_names is not None else None,
        "mean": None if mean is None else [float(m) for m in mean],
        "std": None if std is None else [float(s) for s in std],
        "pixel_max": pixel_max,
        "input_scale": scale,
        "input_shift": shift,
        "color": color,
        "resize": resize,
    }


def complete(info: dict[str, Any], fmt: str, example: Tensor, baked: bool) -> dict[str, Any]:
    """``info`` (a run's contract, or any fields of your own) with the fields every export carries."""
    if baked and info.get("input_scale") is None:
        raise QKDError("--bake-preprocessing needs the data's normalisation (mean/std), which this run's data "
                       "does not give (a data factory normalises its own images); export without it")  # fmt: skip
    from qkd._version import __version__

    contract = {
        "qkd_version": __version__,
        "export_format": fmt,
        "input_name": INPUT_NAME,
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_shape": ["batch", *example.shape[1:]],
        "in_channels": int(example.shape[1]),
        "image_size": list(example.shape[2:]),
        **info,
        "preprocessing_baked": baked,
        "output": "logits, float64" if fmt != "onnx" else "logits, float32",
    }
    contract["preprocessing"] = describe(contract)
    return contract


def describe(c: dict[str, Any]) -> str:
    """One paragraph saying what the file takes, for people (``doc_string`` of an ONNX file)."""
    shape = "x".join(str(d) for d in c.get("input_shape", ["batch"])[1:])
    color = f" ({c['color']})" if c.get("color") else ""
    head = f"'{c.get('input_name', INPUT_NAME)}', float32 NCHW {shape}{color}"
    if c.get("input_scale") is None:
        return f"{head}, prepared as the run's own data pipeline prepared its images (qkd does not know how)"
    pm, resize = c.get("pixel_max", 255), c.get("resize")
    raw = "0..255 pixels" if pm == 255 else f"the data set's raw values v (0..{pm})"
    crop = (f"resize the shorter side to {resize['shorter_side']} ({resize['interpolation']}) and centre-crop "
            f"{resize['center_crop']}x{resize['center_crop']}, then " if resize else "")  # fmt: skip
    if c.get("preprocessing_baked"):
        return f"{head}: {crop}{raw} as they are; the graph scales and normalises them itself"
    to_p = "" if pm == 255 else f"p = round(v * 255 / {pm}) from the raw values v (0..{pm}), then "
    return (f"{head}: {crop}{to_p}x = p * input_scale - input_shift per channel in float32, i.e. (p / 255 - mean) "
            f"/ std with p the 0..255 pixels, mean {c['mean']}, std {c['std']}")  # fmt: skip


# ----- preparing inputs -----------------------------------------------------------------------------------------
def preprocess(images: Any, contract: dict[str, Any], layout: str = "NHWC") -> np.ndarray:
    """Raw images (values 0..``pixel_max``; ``layout`` NHWC, or NHW for one channel, or NCHW) -> the file's
    input, float32 NCHW, as the contract says (for a file with baked preprocessing: the raw values as they are).

    >>> engine, manifest = load_int("student-int.safetensors")
    >>> logits = engine(torch.from_numpy(preprocess(images, manifest)))
    """
    v = np.asarray(images, dtype=np.float32)
    if layout == "NHWC":
        v = (v[..., None] if v.ndim == 3 else v).transpose(0, 3, 1, 2)
    elif layout != "NCHW":
        raise QKDError(f"layout must be NHWC or NCHW, not {layout!r}")
    if v.ndim != 4 or v.shape[1] != contract.get("in_channels", v.shape[1]):
        raise QKDError(f"images of shape {tuple(v.shape)} (NCHW) do not match the file's input "
                       f"{contract.get('input_shape')}")  # fmt: skip
    if contract.get("preprocessing_baked"):
        return np.ascontiguousarray(v)
    if contract.get("input_scale") is None:
        raise QKDError("this file's contract has no normalisation (its run's data factory normalised the images "
                       "itself): prepare the images as that factory did")  # fmt: skip
    pm = contract.get("pixel_max", 255)
    p = v if pm == 255 else np.round(v * np.float32(255 / pm))
    scale, shift = (np.asarray(contract[k], dtype=np.float32).reshape(1, -1, 1, 1)
                    for k in ("input_scale", "input_shift"))  # fmt: skip
    return p * scale - shift


def raw_from_input(x: Tensor, mean: Sequence[float], std: Sequence[float], pixel_max: int = 255) -> Tensor:
    """The raw values (0..``pixel_max``, NCHW float32) behind a normalised batch of the run's loaders: exact,
    since the loaders' float32 normalisation moves a pixel by far less than half a level."""
    from qkd.data.augment import normalize_affine

    scale, shift = (t.double() for t in normalize_affine(mean, std))
    p = torch.round((x.double().cpu() + shift) / scale).clamp(0, 255)
    return (p if pixel_max == 255 else torch.round(p * pixel_max / 255)).float()


# ----- ONNX ----------------------------------------------------------------------------------------------------
def apply_to_onnx(model: Any, contract: dict[str, Any]) -> None:
    """Write ``contract`` into an ONNX model (``metadata_props``, one JSON value per key; the description as
    ``doc_string``) and, where the contract says so, put the preprocessing into its graph."""
    from onnx import helper

    if contract.get("preprocessing_baked"):
        _bake(model.graph, contract)
    from qkd._version import __version__

    model.producer_name, model.producer_version = "qkd", __version__
    model.doc_string = contract["preprocessing"]
    del model.metadata_props[:]
    helper.set_model_props(model, {k: json.dumps(v) for k, v in contract.items()})


def _bake(graph: Any, contract: dict[str, Any]) -> None:
    """``input`` becomes the raw values: ``[Round(v * 255 / pixel_max)] -> Mul input_scale -> Sub input_shift``
    feed what read ``input`` before, in float32 as the run's loaders computed it."""
    from onnx import helper, numpy_helper

    name, inner = graph.input[0].name, "qkd_preprocess/normalized"
    for node in graph.node:
        for i, value in enumerate(node.input):
            if value == name:
                node.input[i] = inner

    def const(key: str, values: Any) -> str:
        array = np.asarray(values, dtype=np.float32)
        graph.initializer.append(numpy_helper.from_array(array.reshape((1, -1, 1, 1)) if array.ndim else array, key))
        return key

    nodes, x, pm = [], name, contract.get("pixel_max", 255)
    if pm != 255:
        nodes.append(helper.make_node("Mul", [x, const("qkd_preprocess.to_255", 255 / pm)], ["qkd_preprocess/to_255"]))
        nodes.append(helper.make_node("Round", ["qkd_preprocess/to_255"], ["qkd_preprocess/pixels"]))
        x = "qkd_preprocess/pixels"
    scale, shift = const("qkd_preprocess.scale", contract["input_scale"]), const("qkd_preprocess.shift",
                                                                                 contract["input_shift"])  # fmt: skip
    nodes.append(helper.make_node("Mul", [x, scale], ["qkd_preprocess/scaled"]))
    nodes.append(helper.make_node("Sub", ["qkd_preprocess/scaled", shift], [inner]))
    for i, node in enumerate(nodes):
        node.name = node.output[0]
        graph.node.insert(i, node)


def read_onnx_contract(path: Path) -> dict[str, Any] | None:
    """The contract of an ONNX file (None: an ONNX model without one); a file that is no ONNX model or whose
    qkd metadata is damaged is a one-line :class:`QKDError`."""
    import onnx

    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:
        raise QKDError(f"{path} is not a qkd export (int, onnx, onnx-int or executorch): {first_line(e)}") from None
    if not model.graph.node:
        raise QKDError(f"{path} is not a qkd export (int, onnx, onnx-int or executorch): no ONNX graph in it")
    props = {p.key: p.value for p in model.metadata_props}
    if "qkd_version" not in props:
        return None
    try:
        return {k: json.loads(v) for k, v in props.items()}
    except ValueError:
        raise QKDError(f"{path}: its qkd metadata is damaged (a value that is not JSON)") from None


def is_safetensors(path: Path) -> bool:
    """A safetensors file begins with the 8-byte length of a JSON header."""
    with open(path, "rb") as f:
        head = f.read(9)
    n = int.from_bytes(head[:8], "little") if len(head) == 9 else 0
    return head[8:9] == b"{" and 0 < n < os.path.getsize(path)


def first_line(e: Exception) -> str:
    """The first non-empty line of an exception's message (its type where it has none), for one-line errors."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)


# ----- writing ---------------------------------------------------------------------------------------------------
def write_export(path: str | Path, data: bytes) -> None:
    """Write an exported file atomically (a temporary file renamed over ``path``) with the mode the umask gives;
    a place that cannot take it is a one-line :class:`QKDError`. Every format writes its file through it."""
    try:
        atomic_write(Path(path), lambda f: f.write(data))
    except OSError as e:
        raise QKDError(f"cannot write {path}: {e.strerror or e}; choose another --out") from None


def _class_names(name: str, root: str | None) -> list[str] | None:
    """Class names where the data set says them: built-in lists, an npz file's ``classes``, image folders'."""
    if name in CLASS_NAMES:
        return CLASS_NAMES[name]
    try:
        if name == "imagefolder" and root:
            base = Path(root).expanduser() / "train"
            return sorted(e.name for e in os.scandir(base) if e.is_dir())
        if name == "npz":
            from qkd.data.arrays import npz_paths

            with np.load(npz_paths(root)[0], allow_pickle=False) as f:
                return [str(c) for c in f["classes"]] if "classes" in f.files else None
        if name == "cifar100":
            from torchvision.datasets import CIFAR100

            return list(CIFAR100(root or "data", train=False).classes)
    except (OSError, RuntimeError, ValueError, KeyError, QKDError):
        return None
    return None


def _color(name: str, channels: int) -> str:
    if channels == 1:
        return "grayscale"
    return "RGB" if name in ("cifar10", "cifar100", "imagefolder") else f"{channels} channels, as in the training data"
