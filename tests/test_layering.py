"""The engine never imports Qt (napari-style layering): the GUI is one face of it, the CLI another."""

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import dllm_studio

QT_MODULES = ("PySide6", "PyQt5", "PyQt6", "qtpy", "pyqtgraph", "superqt", "shiboken6", "ui")
ENGINE = Path(dllm_studio.__file__).parent


def test_no_engine_source_imports_qt_or_the_ui():
    offenders = []
    for path in ENGINE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
            offenders += [f"{path.relative_to(ENGINE)}: {n}" for n in names if n.split(".")[0] in QT_MODULES]
    assert offenders == []


def test_importing_every_engine_module_loads_no_qt():
    modules = [m.name for m in pkgutil.walk_packages([str(ENGINE)], "dllm_studio.") if not m.name.endswith("__main__")]
    code = ("import importlib, sys\n"
            f"for m in {modules!r}: importlib.import_module(m)\n"
            f"print([m for m in sys.modules if m.split('.')[0] in {QT_MODULES!r}])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True).stdout
    assert out.strip() == "[]"
