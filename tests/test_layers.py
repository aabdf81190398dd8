"""The layer table of docs/ARCHITECTURE.md holds: every cross-package import is allowed by it and
names only public modules and names."""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ARCHITECTURE = REPO / "docs" / "ARCHITECTURE.md"
NAMESPACE = "dspark_serve"   # the installed distribution's one top-level name (pyproject.toml)


def layer_table() -> dict[str, set[str]]:
    section = ARCHITECTURE.read_text().split("## Layers", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)` \| (.+?) \|$", section, re.M)
    table = {pkg: set(re.findall(r"`(\w+)`", allowed)) for pkg, allowed in rows}
    assert len(table) >= 6, "docs/ARCHITECTURE.md lost its layer table?"
    return table


def cross_imports(pkg: str, packages: set[str]):
    """(file, line, imported package, module path below the namespace, imported names) of every
    import of another of our packages in `pkg` (absolute imports; relative ones stay inside the package)."""
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
                if not module.startswith(NAMESPACE + "."):
                    continue
                module = module[len(NAMESPACE) + 1:]
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


def python_files():
    skip = {".venv", ".git", "build", "dist"}
    return [p for p in sorted(REPO.rglob("*.py")) if not skip & set(p.relative_to(REPO).parts)]


def bare_imports(packages: set[str], files) -> list[str]:
    """Imports of our packages by their folder name (`from engine import ...`): from the repository
    root they would load a second copy of the module beside the installed `dspark_serve.engine`."""
    out = []
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            where = path.relative_to(REPO) if path.is_relative_to(REPO) else path
            out += [f"{where}:{node.lineno}: {m}" for m in modules if m.split(".")[0] in packages]
    return out


def test_every_import_of_our_packages_goes_through_the_namespace(tmp_path):
    packages = set(layer_table())
    assert bare_imports(packages, python_files()) == []
    # mutation check: a bare import is seen
    bad = tmp_path / "bad.py"
    bad.write_text("import json\nfrom engine.llm import LLM\n")
    assert len(bare_imports(packages, [REPO / "tests" / "test_layers.py", bad])) == 1


def test_the_distribution_installs_every_package_folder_under_the_namespace():
    """pyproject.toml lists packages by hand (a package-dir mapping cannot be found automatically):
    a new sub-package folder missing from the list would be absent from the wheel."""
    import tomllib

    tool = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    folders = {p.parent.relative_to(REPO).as_posix() for p in REPO.glob("*/**/__init__.py")
               if p.relative_to(REPO).parts[0] in layer_table()}
    listed = set()
    for package in tool["packages"]:
        top, _, rest = package.removeprefix(NAMESPACE + ".").partition(".")
        listed.add("/".join([tool["package-dir"][f"{NAMESPACE}.{top}"], *filter(None, rest.split("."))]))
    assert folders == listed
    assert set(tool["package-dir"]) == {f"{NAMESPACE}.{p}" for p in layer_table()}
