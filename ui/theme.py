"""Light and dark palettes; "system" follows the desktop's colour scheme as it changes."""

from __future__ import annotations

import pyqtgraph as pg
from PySide6.QtCore import Qt
from PySide6.QtGui import QColor, QGuiApplication, QPalette
from PySide6.QtWidgets import QApplication

# Colours with a meaning, the same in both themes: what each pane, badge and band stands for.
FP_COLOR = "#3b7dd8"  # full precision
QUANT_COLOR = "#e07b28"  # quantized
GOOD, WARN, BAD = "#2e9d57", "#d99a1e", "#d64541"
FIT_COLORS = {"fits": GOOD, "tight": WARN, "won't fit": BAD}  # memory.fit's verdicts
# A layer's weight bits in the bit map: fewer bits, warmer (more error); 8 bits in full precision's blue.
BITS_COLORS = {2: BAD, 3: WARN, 4: GOOD, 8: FP_COLOR}
BAND_COLORS = {"negligible": GOOD, "moderate": WARN, "significant": BAD}  # the seed study's accuracy-drop bands
# A decision flip's kind (Okabe-Ito vermillion and sky blue: apart for every common colour-vision deficiency, and
# strong enough against a light or a dark window).
FLIP_TOKEN, FLIP_POSITION = "#d55e00", "#56b4e9"


def is_dark(theme: str) -> bool:
    if theme == "system":
        return QGuiApplication.styleHints().colorScheme() == Qt.ColorScheme.Dark
    return theme == "dark"


def apply(app: QApplication, theme: str) -> None:
    app.setStyle("Fusion")  # the one style whose palette is honoured on every platform
    dark = is_dark(theme)
    # The chart colours first: the palette change below is what tells open charts to restyle (ui.charts).
    pg.setConfigOptions(antialias=False,  # antialiased lines cost several ms per repaint
                       background="#1e1f22" if dark else "w", foreground="#dddddd" if dark else "k")
    app.setPalette(_dark_palette() if dark else app.style().standardPalette())


def _dark_palette() -> QPalette:
    p = QPalette()
    roles = {
        QPalette.ColorRole.Window: "#2b2d30", QPalette.ColorRole.WindowText: "#dfe1e5",
        QPalette.ColorRole.Base: "#1e1f22", QPalette.ColorRole.AlternateBase: "#26282b",
        QPalette.ColorRole.ToolTipBase: "#3c3f41", QPalette.ColorRole.ToolTipText: "#dfe1e5",
        QPalette.ColorRole.Text: "#dfe1e5", QPalette.ColorRole.Button: "#3c3f41",
        QPalette.ColorRole.ButtonText: "#dfe1e5", QPalette.ColorRole.BrightText: "#ff6b68",
        QPalette.ColorRole.Highlight: "#2f65ca", QPalette.ColorRole.HighlightedText: "#ffffff",
        QPalette.ColorRole.Link: "#6aa5ff", QPalette.ColorRole.PlaceholderText: "#8c8f94",
    }
    for role, color in roles.items():
        p.setColor(role, QColor(color))
    for role in (QPalette.ColorRole.Text, QPalette.ColorRole.ButtonText, QPalette.ColorRole.WindowText):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#6f7378"))
    return p
