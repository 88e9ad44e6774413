"""The input/output layer is one package whose modules import each other one way only
(geometry ← checks ← dicom ← images ← labels), with no import hidden inside a function."""

from __future__ import annotations

import ast
from pathlib import Path

IO = Path(__file__).resolve().parents[1] / "ARENASegmentation" / "arenaseg" / "io"
ORDER = ["geometry", "checks", "dicom", "images", "labels"]


def sibling_imports(path: Path) -> list[tuple[str, bool]]:
    """(sibling module, imported at top level?) for every ``from .x import`` in ``path``."""
    tree = ast.parse(path.read_text())
    top = set(map(id, tree.body))
    return [(node.module.split(".")[0], id(node) in top) for node in ast.walk(tree)
            if isinstance(node, ast.ImportFrom) and node.level == 1 and node.module]


def test_io_modules_import_each_other_one_way_at_the_top():
    for path in IO.glob("*.py"):
        for module, at_top in sibling_imports(path):
            assert at_top, f"{path.name} imports .{module} inside a function (a hidden cycle)"
            if path.stem in ORDER and module in ORDER:
                assert ORDER.index(module) < ORDER.index(path.stem), f"{path.name} imports .{module}"


def test_the_old_modules_are_gone():
    engine = IO.parent
    for name in ("imageio", "checks", "annotations", "outputs"):
        assert not (engine / f"{name}.py").exists(), name
