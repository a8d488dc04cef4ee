"""The bit map: a mixed-precision plan (`quant.budget.BitPlan`) as a grid, one row per block, one column per role.

Each cell is coloured by the bits its layer was given (`theme.BITS_COLORS`), so where the plan spends its bytes
shows at a glance; the tooltip names the layer. Drawn in `paintEvent` (a table of 200+ cells per 32-block model
would cost more to lay out than the picture it makes).
"""

from __future__ import annotations

from PySide6.QtCore import QEvent, QPoint, QRect, QSize, Qt
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import QSizePolicy, QToolTip, QWidget

from ui.theme import BITS_COLORS, QUANT_COLOR

CELL_H, ROW_LABEL_W, HEADER_H, LEGEND_H = 14, 34, 16, 20


def bits_color(bits: int) -> str:
    return BITS_COLORS.get(bits, QUANT_COLOR)


class BitMap(QWidget):
    """`grid[row][column]`: (layer name, bits) or None where a block lacks the role."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent, objectName="bitMap")
        self.setAccessibleName("Bits per layer")
        self.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Fixed)
        self.blocks: list[int] = []
        self.roles: list[str] = []
        self.grid: list[list[tuple[str, int] | None]] = []

    def set_plan(self, plan) -> None:
        """Show `plan` (a BitPlan): its layers by block and role, in model order."""
        self.blocks = sorted({layer.block for layer in plan.layers})
        self.roles = list(dict.fromkeys(layer.role for layer in plan.layers))
        self.grid = [[None] * len(self.roles) for _ in self.blocks]
        for layer in plan.layers:
            self.grid[self.blocks.index(layer.block)][self.roles.index(layer.role)] = (layer.name, plan.bits[layer.name])
        self.updateGeometry()
        self.update()

    def shown_bits(self) -> dict[str, int]:
        """{layer name: bits} as the cells show them."""
        return {cell[0]: cell[1] for row in self.grid for cell in row if cell is not None}

    def sizeHint(self) -> QSize:
        return QSize(ROW_LABEL_W + 40 * max(len(self.roles), 7), HEADER_H + CELL_H * len(self.blocks) + LEGEND_H + 4)

    def minimumSizeHint(self) -> QSize:
        return QSize(ROW_LABEL_W + 20 * max(len(self.roles), 1), self.sizeHint().height())

    def _cell_width(self) -> int:
        return max((self.width() - ROW_LABEL_W) // max(len(self.roles), 1), 1)

    def cell_rect(self, row: int, column: int) -> QRect:
        width = self._cell_width()
        return QRect(ROW_LABEL_W + column * width, HEADER_H + row * CELL_H, width - 1, CELL_H - 1)

    def cell_at(self, pos: QPoint) -> tuple[str, int] | None:
        if pos.x() < ROW_LABEL_W or pos.y() < HEADER_H:
            return None
        row, column = (pos.y() - HEADER_H) // CELL_H, (pos.x() - ROW_LABEL_W) // self._cell_width()
        if row < len(self.grid) and column < len(self.roles):
            return self.grid[row][column]
        return None

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            cell = self.cell_at(event.pos())
            if cell is None:
                QToolTip.hideText()
            else:
                QToolTip.showText(event.globalPos(), f"{cell[0]}: {cell[1]} bits", self)
            return True
        return super().event(event)

    def paintEvent(self, _event) -> None:
        if not self.grid:
            return
        painter = QPainter(self)
        text = self.palette().windowText().color()
        painter.setPen(text)
        metrics = painter.fontMetrics()
        for column, role in enumerate(self.roles):
            rect = self.cell_rect(0, column)
            painter.drawText(QRect(rect.left(), 0, rect.width(), HEADER_H), Qt.AlignmentFlag.AlignCenter, role)
        show_bits = CELL_H >= metrics.height() - 2  # the number inside the cell, where it fits
        for row, block in enumerate(self.blocks):
            top = HEADER_H + row * CELL_H
            painter.setPen(text)
            painter.drawText(QRect(0, top, ROW_LABEL_W - 4, CELL_H), Qt.AlignmentFlag.AlignRight
                             | Qt.AlignmentFlag.AlignVCenter, str(block))
            for column, cell in enumerate(self.grid[row]):
                if cell is None:
                    continue
                rect = self.cell_rect(row, column)
                painter.fillRect(rect, QColor(bits_color(cell[1])))
                if show_bits:
                    painter.setPen(QColor("#000000"))
                    painter.drawText(rect, Qt.AlignmentFlag.AlignCenter, str(cell[1]))
        self._paint_legend(painter, HEADER_H + CELL_H * len(self.blocks) + 4, text)
        painter.end()

    def _paint_legend(self, painter: QPainter, top: int, text: QColor) -> None:
        x = ROW_LABEL_W
        for bits in sorted(set(self.shown_bits().values())):
            painter.fillRect(QRect(x, top + 3, 12, 12), QColor(bits_color(bits)))
            painter.setPen(text)
            label = f"{bits} bits"
            painter.drawText(x + 16, top + 13, label)
            x += 16 + painter.fontMetrics().horizontalAdvance(label) + 14
