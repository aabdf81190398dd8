"""The layer table of docs/ARCHITECTURE.md holds: every cross-package import is allowed by it and
names only public modules and names."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"


def layer_table() -> dict[str, set[str]]:
    section = ARCHITECTURE.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, re.M)
    table = {pkg: set(re.findall(r"`(\w+)`", allowed)) for pkg, allowed in rows}
    assert len(table) >= 6, "docs/ARCHITECTURE.md lost its layer table?"
    return table


def cross_imports(pkg: str, packages: set[str]):
    """(file, line, imported package, module path, imported names) of every import of another
    of our packages in `pkg` (absolute imports; relative ones stay inside the package)."""
    for path in sorted((REPO / pkg).rglob("*.py")):
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                found = [(a.name, []) for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [(node.module, [a.name for a in node.names])]
            else:
                continue
            for module, names in found:
                top = module.split(".")[0]
                if top in packages and top != pkg:
                    yield path.relative_to(REPO), node.lineno, top, module, names


def violations(table: dict[str, set[str]]) -> list[str]:
    packages = set(table)
    out = []
    for pkg, allowed in table.items():
        for path, line, top, module, names in cross_imports(pkg, packages):
            where = f"{path}:{line}: {module}"
            if top not in allowed:
                out.append(f"{where}: {pkg} may not import {top}")
            private = [p for p in module.split(".")[1:] + names if p.startswith("_") and not p.startswith("__")]
            if private:
                out.append(f"{where}: private {', '.join(private)}")
    return out


def test_every_cross_package_import_follows_the_layer_table():
    assert violations(layer_table()) == []


def test_the_check_catches_a_forbidden_and_a_private_import(monkeypatch):
    """Mutation check: a stricter table (engine may not use the scheduler) and a private name are seen."""
    table = layer_table()
    assert table["models"] == set() and table["scheduler"] == set()
    strict = {**table, "engine": table["engine"] - {"scheduler"}}
    assert any("engine may not import scheduler" in v for v in violations(strict))
    fake = [(Path("loadtest/x.py"), 3, "models", "models.loader", ["_hidden"])]
    monkeypatch.setattr(sys.modules[__name__], "cross_imports",
                        lambda pkg, packages: iter(fake if pkg == "loadtest" else []))
    assert violations(table) == ["loadtest/x.py:3: models.loader: private _hidden"]
