"""Names a package imports on first use (PEP 562), and old module paths kept as aliases.

A package's ``__init__`` lists its public names by submodule; none is imported before it is read. So
``import qkd``, ``qkd --help`` and the refusal of a misspelt setting cost no torch import (3 s here).
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from importlib.abc import Loader, MetaPathFinder
from importlib.machinery import ModuleSpec
from typing import Any


def lazy_names(package: str, public: dict[str, tuple[str, ...]]) -> tuple[Callable[[str], Any], list[str]]:
    """The ``__getattr__`` of ``package`` serving ``public`` ({submodule: its public names}) and those
    submodules themselves, and the package's ``__all__``."""
    where = {name: module for module, names in public.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name in where:
            value = getattr(importlib.import_module(f"{package}.{where[name]}"), name)
        elif name in public:
            value = importlib.import_module(f"{package}.{name}")
        else:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        setattr(sys.modules[package], name, value)  # found directly from now on
        return value

    return __getattr__, sorted(where)


class OldPaths(MetaPathFinder, Loader):
    """Imports ``<package>.<old>`` as a module holding the public names of the modules that replaced it."""

    def __init__(self, package: str, old_paths: dict[str, tuple[str, ...]]) -> None:
        self.package, self.old_paths = package, old_paths

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> ModuleSpec | None:
        package, _, old = fullname.rpartition(".")
        return ModuleSpec(fullname, self) if package == self.package and old in self.old_paths else None

    def create_module(self, spec: ModuleSpec) -> None:
        return None

    def exec_module(self, module: Any) -> None:
        new = [f"{self.package}.{m}" for m in self.old_paths[module.__name__.rpartition(".")[2]]]
        module.__doc__ = f"The old path of {', '.join(new)}, kept for old imports."
        for name in new:
            module.__dict__.update({k: v for k, v in vars(importlib.import_module(name)).items() if k[0] != "_"})


def keep_old_paths(package: str, old_paths: dict[str, tuple[str, ...]]) -> None:
    """Make ``import <package>.<old>`` work for every old path in ``old_paths`` ({old: the new modules})."""
    if not any(isinstance(f, OldPaths) and f.package == package for f in sys.meta_path):
        sys.meta_path.append(OldPaths(package, old_paths))
