"""User code by import path (``mypkg.module:function``), for configs that name a model or data factory."""

from __future__ import annotations

import importlib
import inspect
import os
import sys
from collections.abc import Callable
from typing import Any

from qkd.errors import QKDError


def is_import_path(name: str) -> bool:
    return ":" in name and not name.startswith("timm:")


def load_object(path: str, what: str) -> Callable[..., Any]:
    """The callable that ``"package.module:attribute"`` names; a bad path is one clear line."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise QKDError(f"{what} '{path}' must look like package.module:function")
    try:
        module = _import(module_name)
    except ImportError as e:
        raise QKDError(f"{what} '{path}': cannot import {module_name} ({e}); is it on PYTHONPATH?") from None
    obj = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise QKDError(f"{what} '{path}': {module_name} has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise QKDError(f"{what} '{path}' is not callable")
    return obj


def _import(module_name: str) -> Any:
    """Import ``module_name``, also from the working directory, as ``python -m qkd`` finds it: the installed
    ``qkd`` script's ``sys.path`` starts with its own bin folder instead, so ``mynets.py`` beside you was missed."""
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        here = os.getcwd()
        if e.name != module_name.partition(".")[0] or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)  # after the installed packages: a name they hold still means theirs
        return importlib.import_module(module_name)


def call_accepting(fn: Callable[..., Any], what: str, offered: dict[str, Any], given: dict[str, Any]) -> Any:
    """Call ``fn`` with the ``given`` keywords plus those of ``offered`` its signature accepts."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    kwargs = {k: v for k, v in offered.items() if takes_any or k in params} | given
    try:
        inspect.signature(fn).bind(**kwargs)
    except TypeError as e:
        raise QKDError(f"{what} does not accept these arguments: {e}") from None
    except ValueError:
        pass
    return fn(**kwargs)
