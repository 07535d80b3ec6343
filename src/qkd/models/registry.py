"""A small timm-like model registry, plus checkpoint loading with user-facing errors.

Models are looked up by name so configs and the CLI can refer to them as plain strings; every entry
function takes ``num_classes`` so one call site can build a teacher and a student for any dataset.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import nn

from qkd.errors import QKDError
from qkd.plugins import call_accepting, is_import_path, load_object

ModelFn = TypeVar("ModelFn", bound=Callable[..., nn.Module])

_REGISTRY: dict[str, Callable[..., nn.Module]] = {}
_MAX_LISTED_KEYS = 5
# BatchNorm's step counter only matters for momentum=None; many published checkpoints omit it.
_TOLERATED_MISSING_SUFFIX = "num_batches_tracked"


def register_model(fn: ModelFn) -> ModelFn:
    """Register ``fn`` under its ``__name__``.

    Re-registering the same function (a module imported twice, e.g. a user file loaded by path) is
    allowed; a different function under a taken name is refused so one model cannot silently shadow another.
    """
    name = fn.__name__
    old = _REGISTRY.get(name)
    if old is not None and _qualified(old) != _qualified(fn):
        raise QKDError(f"model name '{name}' is already registered by {_qualified(old)}")
    _REGISTRY[name] = fn
    return fn


def _qualified(fn: Callable[..., Any]) -> str:
    return f"{fn.__module__}.{fn.__qualname__}"


def list_models() -> list[str]:
    """Names of all registered models, sorted so listings and error messages are stable."""
    return sorted(_REGISTRY)


def create_model(name: str, num_classes: int | None = 10, offered: dict[str, Any] | None = None,
                 **kwargs: Any) -> nn.Module:  # fmt: skip
    """Build a model by name; bad names or arguments become a QKDError rather than a traceback.

    ``name`` is a registered model (``qkd list``), ``timm:<name>`` (timm installed: ``pip install
    timm``), or a factory by import path, ``mypkg.nets:build``. ``num_classes`` (unless None) and
    ``kwargs`` are passed; ``offered`` keywords (e.g. ``in_channels``) only where the function takes them.
    """
    if name.startswith("timm:"):
        return _create_timm(name.removeprefix("timm:"), num_classes, **kwargs)
    fn = load_object(name, "model factory") if is_import_path(name) else _REGISTRY.get(name)
    if fn is None:
        raise QKDError(f"unknown model '{name}'; valid models: {', '.join(list_models())}, timm:<name>, "
                       "or an import path mypkg.module:function")  # fmt: skip
    given = kwargs | ({} if num_classes is None else {"num_classes": num_classes})
    model = call_accepting(fn, f"model '{name}'", offered or {}, given)
    if not isinstance(model, nn.Module):
        raise QKDError(f"model '{name}' returned a {type(model).__name__}, not a torch.nn.Module")
    return model


def _create_timm(name: str, num_classes: int | None, **kwargs: Any) -> nn.Module:
    """A timm model by name, never downloading: start from a local ``checkpoint`` instead of ``pretrained``."""
    try:
        import timm
    except ImportError:
        raise QKDError(f"model 'timm:{name}' needs timm: pip install timm") from None
    if not timm.is_model(name):
        raise QKDError(f"timm has no model '{name}' (timm.list_models() lists them)")
    if kwargs.get("pretrained"):
        raise QKDError(f"timm:{name}: pretrained=true downloads weights; set the model's checkpoint to a local file")
    try:
        return timm.create_model(name, pretrained=False, **kwargs, **({} if num_classes is None else
                                                                      {"num_classes": num_classes}))  # fmt: skip
    except TypeError as exc:
        raise QKDError(f"model 'timm:{name}' does not accept these arguments: {exc}") from None


def load_pretrained(model: nn.Module, path: str | Path) -> None:
    """Load weights from a checkpoint file into ``model`` in place.

    Accepts the common layouts (raw state dict, ``{'state_dict': ...}``, ``{'model': ...}``, DataParallel
    ``module.`` prefixes) and checks keys and shapes first, so a wrong file fails with one clear line.
    """
    path = Path(path)
    if not path.is_file():
        raise QKDError(f"checkpoint not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types (pickle, zip, EOF, Unpickling) for a bad file
        raise QKDError(f"could not read checkpoint {path}: {_one_line(exc)}") from None
    state = _strip_prefix(_extract_state_dict(obj, path))
    _check_compatible(model, state, path)
    model.load_state_dict(state, strict=False)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}"


def _extract_state_dict(obj: object, path: Path) -> Mapping[str, torch.Tensor]:
    """Unwrap trainer checkpoints, which store the weights next to epochs, optimiser state and metrics."""
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            inner = obj.get(key)
            if isinstance(inner, Mapping):
                obj = inner
                break
    if not isinstance(obj, Mapping) or not obj:
        raise QKDError(f"checkpoint {path} holds no state dict")
    bad = [str(k) for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise QKDError(f"checkpoint {path} is not a state dict of tensors (e.g. {', '.join(bad[:5])})")
    return obj


def _strip_prefix(state: Mapping[str, torch.Tensor], prefix: str = "module.") -> dict[str, torch.Tensor]:
    """Drop the DataParallel/DDP prefix so such checkpoints load into a bare model."""
    return {k.removeprefix(prefix): v for k, v in state.items()}


def _check_compatible(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path) -> None:
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not k.endswith(_TOLERATED_MISSING_SUFFIX)]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing keys {_preview(missing)}")
        if unexpected:
            parts.append(f"unexpected keys {_preview(unexpected)}")
        raise QKDError(f"checkpoint {path} does not fit the model: {'; '.join(parts)}")
    for key, tensor in state.items():
        want = expected[key].shape
        if tensor.shape != want:
            raise QKDError(
                f"checkpoint {path} does not fit the model: {key} has shape {tuple(tensor.shape)}, "
                f"model expects {tuple(want)}"
            )


def _preview(keys: list[str]) -> str:
    shown = ", ".join(keys[:_MAX_LISTED_KEYS])
    more = len(keys) - _MAX_LISTED_KEYS
    return f"{shown} (+{more} more)" if more > 0 else shown
