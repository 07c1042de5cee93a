"""Storage (`io/`) sits below the manifests and the NF4 maths; NF4's on-disk layout is storage."""

import ast
from pathlib import Path

import ailora_tools

PKG = Path(ailora_tools.__file__).parent


def _package_imports(path: Path) -> list[tuple[str, bool]]:
    """(module below ailora_tools, at module top?) for each relative import of a file."""
    package = path.relative_to(PKG).parent.parts
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            found.append((".".join([*base, *(node.module or "").split(".")]).strip("."), id(node) in top))
    return found


def test_io_imports_neither_the_manifests_nor_quantization():
    for path in (PKG / "io").glob("*.py"):
        for module, _ in _package_imports(path):
            assert module.split(".")[0] not in ("manifests", "quantization"), f"io/{path.name} imports {module}"


def test_quantization_imports_storage_at_module_top_only():
    for path in (PKG / "quantization").glob("*.py"):
        inner = [m for m, at_top in _package_imports(path) if not at_top]
        assert not inner, f"quantization/{path.name} imports {inner} inside functions"
