"""Issue #32 item 2: storage (`io/`) sits below the manifests and the NF4 maths; NF4's on-disk layout is storage."""
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


def test_the_nf4_layout_is_one_object_wherever_it_is_imported_from():
    from ailora_tools import quantization
    from ailora_tools.io import nf4_layout
    from ailora_tools.io.peft_adapter import NF4_STATE
    from ailora_tools.quantization import nf4

    assert NF4_STATE is nf4_layout.STATE is nf4.STATE
    assert quantization.parts_layout is nf4.parts_layout is nf4_layout.parts_layout
    assert nf4_layout.parts_layout((64, 32), "F32")[""] == ("U8", (1024, 1))
