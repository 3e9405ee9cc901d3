"""The package's folders are the pipeline, and each imports only downward (docs/development.md, "Layout").

Read from the source with ``ast`` (every import, the ones inside functions too), so a new module that
reaches up a layer, or a circle between modules, fails here rather than in review.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parents[1] / "hf_rksp"

#: top-level part of hf_rksp -> layer; a module may import its own folder and lower layers only
LAYERS = {
    "errors": 0, "version": 0, "_moved": 0, "data": 0,
    "utils": 1,
    "spectral": 2,
    "record": 3,
    "models": 4,
    "capture": 5,
    "report": 6, "publish": 6,
    "pipeline": 7,
    "training": 8,
    "cli": 9,
    "__init__": 10, "__main__": 10,
}


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = f.relative_to(PKG.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = f
    return out


def imports(path: Path) -> set[str]:
    """Every hf_rksp module ``path`` imports (``from hf_rksp.x import y`` counts x, and x.y when that is a module)."""
    known = modules()
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path}: relative import (the package uses absolute imports)")
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("hf_rksp"):
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                out.add(sub if sub in known else node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hf_rksp"))
    return out


def part(module: str) -> str:
    bits = module.split(".")
    return bits[1] if len(bits) > 1 else "__init__"


def layer(module: str, path: Path) -> int:
    if module == "hf_rksp":
        return LAYERS["__init__"]
    if path.name == "__main__.py":
        return LAYERS["__main__"]
    return LAYERS[part(module)]


def test_every_folder_has_a_layer():
    missing = {part(m) for m in modules() if m != "hf_rksp"} - set(LAYERS)
    assert not missing, f"add these to LAYERS (and to docs/development.md): {sorted(missing)}"


@pytest.mark.parametrize("module", sorted(modules()))
def test_imports_only_downward(module):
    path = modules()[module]
    mine = layer(module, path)
    for target in imports(path):
        if target == "hf_rksp":
            assert mine == LAYERS["__init__"], f"{module} imports the package root (import the module instead)"
            continue
        same_folder = part(target) == part(module)
        assert same_folder or layer(target, modules()[target]) < mine, \
            f"{module} (layer {mine}) imports {target} (layer {layer(target, modules()[target])}): up or sideways"


def test_no_import_circle():
    graph = {m: {t for t in imports(p) if t != "hf_rksp"} for m, p in modules().items()}
    state: dict[str, int] = {}

    def visit(m, stack):
        state[m] = 1
        for t in graph.get(m, ()):
            if state.get(t) == 1:
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(t):] + [t]))
            if t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in graph:
        if m not in state:
            visit(m, [m])


@pytest.mark.parametrize("module", sorted(modules()))
def test_every_module_says_what_it_owns(module):
    doc = ast.get_docstring(ast.parse(modules()[module].read_text()))
    assert doc and len(doc) > 20, f"{module} has no docstring saying what it owns"


def test_layer_check_catches_an_upward_import(tmp_path, monkeypatch):
    """The check itself: a spectral module that imports the pipeline is reported."""
    fake = tmp_path / "m.py"
    fake.write_text('"""x."""\nfrom hf_rksp.pipeline.run import audit\n')
    assert "hf_rksp.pipeline.run" in imports(fake)
    mods = modules()
    monkeypatch.setitem(globals(), "modules", lambda: {**mods, "hf_rksp.spectral.m": fake})
    with pytest.raises(AssertionError, match="up or sideways"):
        test_imports_only_downward("hf_rksp.spectral.m")
