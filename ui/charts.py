"""The studio's charts, with pyqtgraph kept behind a few small classes.

Each chart keeps its data in numpy arrays and is redrawn by its page's timer (at most ~10 Hz), never
once per engine event: `set_*`/`append` calls are cheap and may come at any rate. Charts restyle themselves
when the application palette changes (`ui.theme.apply` sets pyqtgraph's colours first), so a theme switch
shows at once; a title too long for the chart's width is elided, the full one in the tooltip.
"""

from __future__ import annotations

import html

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QEvent, Qt
from PySide6.QtGui import QColor, QFont, QFontMetricsF

from ui.theme import BAD, FP_COLOR, QUANT_COLOR


TITLE_POINTS = 10
TITLE_MARGIN_PX = 16  # the plot item's own margins either side of the title


class _Chart(pg.PlotWidget):
    def __init__(self, title: str, x_label: str, y_label: str, description: str, parent=None) -> None:
        super().__init__(parent)
        self.setMinimumHeight(150)
        # pyqtgraph centres the title over the plot column alone, so a title elided to the chart's width still
        # ran past its right edge; spanning the axis columns too gives it the width it is elided to.
        layout, label = self.plotItem.layout, self.plotItem.titleLabel
        layout.removeItem(label)
        layout.addItem(label, 0, 0, 1, layout.columnCount())
        self.description = description
        self.setLabel("bottom", x_label)
        self.setLabel("left", y_label)
        self.setMenuEnabled(False)
        self.showGrid(x=False, y=True, alpha=0.25)
        self.setAccessibleName(title)
        self.setAccessibleDescription(description)
        self.set_title(title)

    def set_title(self, title: str) -> None:
        self.title = title
        self._show_title()

    def _show_title(self) -> None:
        """The title elided to the width the chart has now; when elided, the full title heads the tooltip."""
        font = QFont(self.font())
        font.setPointSizeF(TITLE_POINTS)
        shown = QFontMetricsF(font).elidedText(self.title, Qt.TextElideMode.ElideRight,
                                               max(self.width() - TITLE_MARGIN_PX, 40))
        self.setTitle(html.escape(shown), size=f"{TITLE_POINTS}pt")  # coloured by the current foreground
        self.setToolTip(self.description if shown == self.title else f"{self.title}\n\n{self.description}")

    def resizeEvent(self, event) -> None:
        super().resizeEvent(event)
        if hasattr(self, "title"):  # the base class resizes before __init__ has set a title
            self._show_title()

    def changeEvent(self, event) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.PaletteChange and hasattr(self, "title"):  # not during the base __init__
            self.restyle()

    def restyle(self) -> None:
        """Take pyqtgraph's current background and foreground (the theme's chart colours)."""
        foreground = pg.getConfigOption("foreground")
        self.setBackground(pg.getConfigOption("background"))
        for name in ("left", "bottom"):
            self.getAxis(name).setPen(foreground)
            self.getAxis(name).setTextPen(foreground)
        self._show_title()
        legend = self.plotItem.legend or getattr(self, "legend", None)
        if legend is not None:
            legend.setLabelTextColor(foreground)
            for _sample, label in legend.items:
                label.setText(label.text)  # setLabelTextColor only applies to labels added later


class BarChart(_Chart):
    """One bar per item (a layer), growing as items arrive; bars above `alarm` are drawn in red."""

    def __init__(self, title: str, x_label: str, y_label: str, description: str, *, log_y: bool = False,
                 alarm: float | None = None, parent=None) -> None:
        super().__init__(title, x_label, y_label, description, parent)
        self.log_y, self.alarm = log_y, alarm
        self.setLogMode(y=log_y)
        self.bars = pg.BarGraphItem(x=[], height=[], width=0.8)
        self.addItem(self.bars)
        self.values = np.zeros(0)

    def set_values(self, values) -> None:
        self.values = np.asarray(values, dtype=float)
        x = np.arange(len(self.values))
        shown = np.log10(np.maximum(self.values, 1e-6)) if self.log_y else self.values
        base = QColor(QUANT_COLOR)
        brushes = [pg.mkBrush(BAD) if self.alarm is not None and v > self.alarm else pg.mkBrush(base)
                   for v in self.values]
        if self.log_y:  # bars rise from 10^0 = a ratio of 1
            self.bars.setOpts(x=x, y0=np.zeros_like(shown), height=shown, brushes=brushes, pen=None)
        else:
            self.bars.setOpts(x=x, height=shown, brushes=brushes, pen=None)
        if len(x):
            self.setXRange(-0.6, max(len(x), 8) - 0.4, padding=0)


class ChannelProfile(_Chart):
    """Max |activation| per input channel of one layer, the outlier channels marked."""

    def __init__(self, parent=None) -> None:
        super().__init__("Current layer: channel magnitudes", "input channel", "max |x|",
                         "Largest |activation| per input channel of the layer being quantized; red points are "
                         "outlier channels (more than 4x the median channel, the dashed line).", parent)
        self.curve = self.plot([], [], pen=pg.mkPen(FP_COLOR, width=1))
        self.marks = pg.ScatterPlotItem(size=7, brush=pg.mkBrush(BAD), pen=None)
        self.addItem(self.marks)
        self.median_line = pg.InfiniteLine(angle=0, pen=pg.mkPen("#888888", style=pg.QtCore.Qt.PenStyle.DashLine))
        self.addItem(self.median_line)

    def set_profile(self, name: str, absmax, outlier_factor: float = 4.0) -> None:
        values = np.asarray(absmax, dtype=float)
        self.set_title(f"Channel magnitudes: {name}")
        if not len(values):
            return
        x = np.arange(len(values))
        median = float(np.median(values)) or 1e-12
        self.curve.setData(x, values)
        hot = values > outlier_factor * median
        self.marks.setData(x[hot], values[hot])
        self.median_line.setValue(median)


class MemoryChart(_Chart):
    """Resident memory over time and its peak, one run at a time; CUDA allocations when a GPU is in use."""

    def __init__(self, title: str = "Memory", parent=None) -> None:
        super().__init__(title, "seconds", "MB", "Process memory over time: resident set (RSS), its peak during "
                         "this run, and CUDA allocations when a GPU is used.", parent)
        self.legend = self.addLegend(offset=(-10, -10))
        self.rss = self.plot([], [], pen=pg.mkPen(FP_COLOR, width=2), name="RSS")
        self.peak = self.plot([], [], pen=pg.mkPen(BAD, width=1, style=pg.QtCore.Qt.PenStyle.DashLine), name="peak")
        self.cuda = pg.PlotDataItem([], [], pen=pg.mkPen(QUANT_COLOR, width=2))  # added once a GPU reports
        self.data: list[tuple[float, float, float, float]] = []

    def append(self, seconds: float, rss: int, peak: int, cuda: int | None = None) -> None:
        self.data.append((seconds, rss / 1e6, peak / 1e6, (cuda or 0) / 1e6 if cuda is not None else np.nan))
        del self.data[:-3000]

    def start_run(self) -> None:
        """A new run: no samples, so no peak, until it appends its own (the page passes this run's peak)."""
        self.data.clear()
        self.redraw()

    def redraw(self) -> None:
        if not self.data:
            for curve in (self.rss, self.peak, self.cuda):
                curve.setData([], [])
            return
        t, rss, peak, cuda = np.array(self.data).T
        self.rss.setData(t, rss)
        self.peak.setData(t, peak)
        if not np.isnan(cuda).all():
            if self.cuda.scene() is None:
                self.addItem(self.cuda)
                self.legend.addItem(self.cuda, "CUDA")
            self.cuda.setData(t, cuda)
