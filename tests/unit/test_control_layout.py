"""The control package's import direction, checked: leaves import nothing from it."""

from __future__ import annotations

import ast
from pathlib import Path

import sockd.control

PACKAGE = Path(sockd.control.__file__).resolve().parent
#: What each module of the package may import from the package (the leaves: nothing).
ALLOWED: dict[str, set[str]] = {
    "api": set(),
    "access": set(),
    "http": set(),
    "socketfile": set(),
    "handler": {"api", "access", "http"},
    "server": {"api", "access", "http", "handler", "socketfile"},
    "__init__": {"api", "access", "http", "handler", "server"},
}


def package_imports(path: Path) -> set[str]:
    """The ``sockd.control`` modules that the file at ``path`` imports."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = []
        if isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        for name in names:
            if name.startswith("sockd.control."):
                found.add(name.removeprefix("sockd.control.").split(".")[0])
            elif name == "sockd.control":
                found.add("__init__")
    return found


def test_control_modules_import_in_one_direction() -> None:
    """Each module of sockd.control imports only the package modules its docstring allows."""
    modules = {path.stem: package_imports(path) for path in PACKAGE.glob("*.py")}
    assert set(modules) == set(ALLOWED)
    for name, imported in modules.items():
        assert imported <= ALLOWED[name], (name, imported - ALLOWED[name])


def test_control_modules_stay_small() -> None:
    """No module of the control package grows past ~600 lines."""
    for path in PACKAGE.glob("*.py"):
        assert len(path.read_text().splitlines()) <= 620, path.name
