"""The wheel ships ``adapters/`` as ``handoff.adapters`` and installs no top-level ``adapters``."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_layout(tmp_path: Path) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "--no-build-isolation",
         "--wheel-dir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
        timeout=300,
    )  # fmt: skip
    (wheel,) = tmp_path.glob("warm_handoff-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top_level = {name.split("/")[0] for name in names}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"handoff"}
    assert "handoff/adapters/__init__.py" in names
    assert "handoff/py.typed" in names
    # Every package of the source tree is in the wheel (a missing entry in pyproject's
    # explicit package list breaks `import handoff` only after installation).
    on_disk = {
        path.parent.relative_to(ROOT).as_posix()
        for path in (ROOT / "handoff").rglob("__init__.py")
        if "adapters" not in path.relative_to(ROOT).parts
    }
    shipped = {name.rsplit("/", 1)[0] for name in names if name.endswith("/__init__.py")}
    assert on_disk <= shipped, on_disk - shipped
    assert not any(name.startswith("adapters/") for name in names)
    assert "handoff = handoff.cli:main" in scripts


def test_editable_install_maps_adapters_into_the_package() -> None:
    import handoff.adapters

    assert Path(handoff.adapters.__file__).resolve().parent == ROOT / "adapters"


def test_product_code_never_imports_the_testing_package() -> None:
    """DESIGN.md: product commands (``handoff simulate``) run no code from
    :mod:`handoff.testing`, so that a test helper's change never changes the product."""
    import ast

    offenders = []
    for root in (ROOT / "handoff", ROOT / "adapters"):
        for path in root.rglob("*.py"):
            if "testing" in path.relative_to(ROOT).parts:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.Import):
                    names, line = [alias.name for alias in node.names], node.lineno
                elif isinstance(node, ast.ImportFrom) and node.module:
                    names, line = [node.module], node.lineno
                else:
                    continue
                if any(n == "handoff.testing" or n.startswith("handoff.testing.") for n in names):
                    offenders.append(f"{path.relative_to(ROOT)}:{line}")
    assert offenders == []
