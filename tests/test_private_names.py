"""No private name is used across modules of qkd: what ruff's PLC2701 cannot see.

Ruff flags ``from qkd.x import _y`` in benchmarks/ and tests/, but not inside the qkd package itself (it treats
one top-level package as one module), nor ``rundir._y`` through an imported module. This test checks both, by
reading the source (no imports, well under a second)."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"


def _private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _module_of(path: Path) -> str:
    parts = path.relative_to(SRC).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _absolute(node: ast.ImportFrom, here: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = here.split(".") if is_package else here.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _is_qkd_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return name.split(".")[0] == "qkd" and (path.with_suffix(".py").is_file() or (path / "__init__.py").is_file())


def private_uses(path: Path, here: str | None) -> list[tuple[int, str]]:
    """``(line, name)`` for each private name of another qkd module imported or read (``mod._name``) in the file
    at ``path``; ``here``: the module that file is (None outside the package)."""
    tree, found, modules = ast.parse(path.read_text()), [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            source = _absolute(node, here or "", path.name == "__init__.py") if here else node.module or ""
            if not source.startswith("qkd"):
                continue
            for alias in node.names:
                if _is_qkd_module(f"{source}.{alias.name}"):
                    modules.add(alias.asname or alias.name)
                elif _private(alias.name) and source != here:
                    found.append((node.lineno, f"{source}.{alias.name}"))
        elif isinstance(node, ast.Import):
            modules |= {a.asname for a in node.names if a.asname and a.name.startswith("qkd.")}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _private(node.attr):
            if isinstance(node.value, ast.Name) and node.value.id in modules:
                found.append((node.lineno, f"{node.value.id}.{node.attr}"))
    return found


def test_no_private_name_crosses_a_module():
    files = [(p, _module_of(p)) for p in sorted((SRC / "qkd").rglob("*.py"))]
    files += [(p, None) for d in ("benchmarks", "scripts") for p in sorted((ROOT / d).glob("*.py"))]
    found = [f"{p.relative_to(ROOT)}:{line} {name}" for p, here in files for line, name in private_uses(p, here)]
    assert not found, "private names used across modules (make them public, or move the code):\n" + "\n".join(found)


def test_the_check_sees_both_forms_and_spares_the_module_itself(tmp_path):
    text = "from qkd.train.rundir import _x\nfrom qkd.train import rundir\nrundir._y()\nfrom .runs import _own\n"
    (tmp_path / "runs.py").write_text(text)
    uses = private_uses(tmp_path / "runs.py", "qkd.report.runs")  # read as if it were qkd/report/runs.py
    assert uses == [(1, "qkd.train.rundir._x"), (3, "rundir._y")]
