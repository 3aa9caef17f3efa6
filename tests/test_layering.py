"""The import structure: the layer order of docs/architecture.md, no private names across modules, a light import.

The layer order is the ```layers``` block of docs/architecture.md (top layer first). A module
may import from its own layer and from any layer below it; imports inside functions and
``TYPE_CHECKING`` blocks count too. Exceptions are listed below, each with its reason, and an
exception that no longer occurs fails the test (so the list cannot go stale).
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "bitcompile"
ARCHITECTURE = ROOT / "docs" / "architecture.md"

#: (importer, imported module): why this upward import is allowed.
ALLOWED_UPWARD = {
    ("bitcompile.inspect.html", "bitcompile"): "reads bitcompile.__version__ for the page footer (lazily, at write time)",
    ("bitcompile.kernels", "bitcompile.targets"): (
        "kernels/__init__ re-exports get_kernel / resolve_target lazily for code written before the registry (BC)"
    ),
}

#: (importer, imported module, name): why this private name may cross modules.
ALLOWED_PRIVATE: dict[tuple[str, str, str], str] = {}


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _layers() -> list[list[str]]:
    """The ```layers``` block: one layer per line, top first; ``#`` starts a comment."""
    text = ARCHITECTURE.read_text()
    start = text.index("```layers\n") + len("```layers\n")
    block = text[start : text.index("```", start)]
    layers = [line.split("#", 1)[0].split() for line in block.splitlines()]
    return [layer for layer in layers if layer]


def _layer_of(module: str, layers: list[list[str]]) -> int | None:
    """Index of the layer naming ``module`` exactly, else of the longest ``pkg.*`` pattern covering it."""
    best, best_length = None, -1
    for index, patterns in enumerate(layers):
        for pattern in patterns:
            if pattern == module:
                return index
            if pattern.endswith(".*"):
                package = pattern[:-2]
                if (module == package or module.startswith(package + ".")) and len(package) > best_length:
                    best, best_length = index, len(package)
    return best


def _imports(module: str, path: Path) -> list[tuple[str, str | None, int]]:
    """``(imported bitcompile module, imported name or None, line)`` for every import in the file."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names if alias.name.split(".")[0] == "bitcompile"]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            if base.split(".")[0] != "bitcompile":
                continue
            for alias in node.names:
                submodule = f"{base}.{alias.name}"
                if submodule in MODULES:
                    found.append((submodule, None, node.lineno))
                else:
                    found.append((base, alias.name, node.lineno))
    return found


def test_every_module_has_a_layer():
    layers = _layers()
    missing = [m for m in MODULES if _layer_of(m, layers) is None]
    assert not missing, f"modules missing from the ```layers``` block of docs/architecture.md: {missing}"


def test_imports_go_down_the_layers():
    layers = _layers()
    upward, allowed_seen = [], set()
    for module, path in MODULES.items():
        own = _layer_of(module, layers)
        for imported, _name, line in _imports(module, path):
            target = _layer_of(imported, layers)
            if target is None or own is None or target >= own:
                continue
            if (module, imported) in ALLOWED_UPWARD:
                allowed_seen.add((module, imported))
                continue
            upward.append(f"{path.relative_to(ROOT)}:{line}: {module} (layer {own}) imports {imported} (layer {target})")
    assert not upward, "upward imports (docs/architecture.md lists the layers, top first):\n" + "\n".join(upward)
    assert allowed_seen == set(ALLOWED_UPWARD), f"stale ALLOWED_UPWARD entries: {set(ALLOWED_UPWARD) - allowed_seen}"


def test_no_private_name_is_imported_from_another_module():
    crossing, allowed_seen = [], set()
    for module, path in MODULES.items():
        for imported, name, line in _imports(module, path):
            if name is None or not name.startswith("_") or name.startswith("__") or imported == module:
                continue
            if (module, imported, name) in ALLOWED_PRIVATE:
                allowed_seen.add((module, imported, name))
                continue
            crossing.append(f"{path.relative_to(ROOT)}:{line}: {module} imports {name} from {imported}")
    assert not crossing, "private names imported across modules (make them public where they live):\n" + "\n".join(crossing)
    assert allowed_seen == set(ALLOWED_PRIVATE), f"stale ALLOWED_PRIVATE entries: {set(ALLOWED_PRIVATE) - allowed_seen}"


def test_layer_check_sees_an_upward_import_inside_a_function(tmp_path):
    """The checker itself: a lazy import in a function body is found, and placed in its layer."""
    path = tmp_path / "probe.py"
    path.write_text("def f():\n    from bitcompile.backend import capture\n    from bitcompile.passes.ternary_rewrite import _x\n")
    found = _imports("bitcompile.kernels.probe", path)
    assert found == [("bitcompile.backend", "capture", 2), ("bitcompile.passes.ternary_rewrite", "_x", 3)]
    layers = _layers()
    assert _layer_of("bitcompile.backend", layers) < _layer_of("bitcompile.kernels.probe", layers)


HEAVY = ("torch._dynamo", "rich", "matplotlib")


@pytest.mark.parametrize("statement", ["import bitcompile", "from bitcompile import pack, TernaryConfig, save_packed"])
def test_import_bitcompile_loads_no_dynamo_rich_or_matplotlib(statement):
    code = f"import sys\n{statement}\nprint(sorted(m for m in {HEAVY!r} if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_lazy_public_names_and_the_compile_entry_point_still_resolve():
    code = (
        "import bitcompile, bitcompile.backend\n"
        "from bitcompile import ExplainReport, explain\n"
        "from bitcompile.inspect.report import ExplainReport as R, explain as e\n"
        "from torch._dynamo.backends.registry import lookup_backend\n"
        "assert ExplainReport is R and explain is e and {'explain', 'ExplainReport'} <= set(dir(bitcompile))\n"
        "assert lookup_backend('bitcpm') is bitcompile.backend.bitcpm\n"
        "print('ok')"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr
