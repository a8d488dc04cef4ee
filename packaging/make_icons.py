"""Render resources/icons/dllm-studio.svg to the PNG sizes desktops ask for, and a Windows .ico.

    python packaging/make_icons.py

The PNGs are committed (the app and the bundle need no SVG renderer at start-up); rerun after editing the SVG.
macOS wants an .icns: build it on a Mac from these PNGs with `iconutil` (see packaging/README.md).
"""

from __future__ import annotations

import sys
from pathlib import Path

from PySide6.QtCore import Qt
from PySide6.QtGui import QGuiApplication, QImage, QPainter
from PySide6.QtSvg import QSvgRenderer

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"
SIZES = (16, 24, 32, 48, 64, 128, 256, 512)


def render(svg: QSvgRenderer, size: int) -> QImage:
    image = QImage(size, size, QImage.Format.Format_ARGB32)
    image.fill(Qt.GlobalColor.transparent)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    svg.render(painter)
    painter.end()
    return image


def main() -> int:
    _app = QGuiApplication.instance() or QGuiApplication(sys.argv[:1])  # painting needs an application
    svg = QSvgRenderer(str(ICONS / "dllm-studio.svg"))
    if not svg.isValid():
        raise SystemExit(f"cannot read {ICONS / 'dllm-studio.svg'}")
    for size in SIZES:
        path = ICONS / f"dllm-studio-{size}.png"
        render(svg, size).save(str(path))
        print(f"wrote {path}")
    if render(svg, 256).save(str(ICONS / "dllm-studio.ico")):
        print(f"wrote {ICONS / 'dllm-studio.ico'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
