"""The decision-flip strip under the chat panes: one cell per full-precision step, coloured where the quantized
model, shown the very same state, would have committed another token or at another position (`dllm_studio.flips`).
"""

from __future__ import annotations

import html

from PySide6.QtCore import QEvent, QPointF, QRectF, Qt
from PySide6.QtGui import QColor, QPainter, QPalette, QPolygonF
from PySide6.QtWidgets import QHBoxLayout, QLabel, QToolTip, QVBoxLayout, QWidget

from dllm_studio.events import Commit
from dllm_studio.flips import DecisionFlips, StepDecision
from ui.theme import FLIP_POSITION, FLIP_TOKEN

TEACHER_FORCING = ("Teacher forcing: before every step the quantized model is shown the full-precision answer's "
                   "state at that step and asked what it would commit. A flip is a step where it would commit "
                   "another token, or at another position; the marker is the first step after which the two "
                   "answers, each running on its own, differ.")
COLORS = {"token": FLIP_TOKEN, "position": FLIP_POSITION}
MARKER = 7  # px above the cells for the first-divergence triangle
CELL_HEIGHT = 16
MAX_LISTED = 6  # commits named in a cell's tooltip; a parallel step may commit a whole block


def cell_kind(decision: StepDecision) -> str:
    """"same", "token", "position" or "both" (a parallel step can move one commit and change another)."""
    kinds = [k for k, flipped in (("token", decision.other_tokens), ("position", decision.other_positions)) if flipped]
    return "both" if len(kinds) == 2 else kinds[0] if kinds else "same"


def _commits(commits: tuple[Commit, ...], pieces: dict[int, str]) -> str:
    if not commits:
        return "nothing"
    ordered = sorted(commits, key=lambda c: c.position)
    named = [f"{_quoted(pieces.get(c.token_id, ''))} at {c.position}" for c in ordered]
    more = len(named) - MAX_LISTED
    return ", ".join(named[:MAX_LISTED]) + (f" and {more} more" if more > 0 else "")


def _quoted(piece: str) -> str:
    return f"'{piece}'" if piece.strip() else "∅" if not piece else repr(piece)  # a stop token has no text


def cell_tip(decision: StepDecision, pieces: dict[int, str]) -> str:
    """"Step 3 (block 0): full precision commits 'Paris' at 2; quantized would commit 'Rome' at 2"."""
    head = f"Step {decision.step} (block {decision.block}): "
    if not decision.flipped:
        return head + f"both commit {_commits(decision.reference, pieces)}"
    return (head + f"full precision commits {_commits(decision.reference, pieces)}; "
            f"quantized would commit {_commits(decision.candidate, pieces)}")


def summary(flips: DecisionFlips) -> str:
    """The strip in one line: how many steps flipped, the first, and where the answers part."""
    n, flipped = len(flips.steps), flips.flipped_steps
    if flipped:
        text = f"Decision flips: {flipped} of {n} step{'s' * (n != 1)} (first at step {flips.first_flip})"
    else:
        text = "Decision flips: none — the quantized model makes every full-precision decision"
    if flips.first_divergence is not None:
        text += f"; answers diverge from step {flips.first_divergence}"
    elif flipped:  # possible only through a KV cache's approximation: the free runs ended the same
        text += "; the answers do not diverge"
    return text


class FlipStrip(QWidget):
    """One cell per full-precision step; hover a cell for both decisions."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent, objectName="flipStrip")
        self.flips: DecisionFlips | None = None
        self.pieces: dict[int, str] = {}
        self.cells: list[str] = []  # cell_kind per step, in step order
        self.setAccessibleName("Decision flips per denoising step")
        self.setAccessibleDescription(TEACHER_FORCING)
        self.setMouseTracking(True)
        self.setFixedHeight(MARKER + CELL_HEIGHT + 2)
        self.setMinimumWidth(120)

    def set_flips(self, flips: DecisionFlips, pieces: dict[int, str]) -> None:
        self.flips, self.pieces = flips, pieces
        self.cells = [cell_kind(d) for d in flips.steps]
        self.update()

    def _cell_rect(self, i: int) -> QRectF:
        width = self.width() / max(len(self.cells), 1)
        gap = 1.0 if width >= 4 else 0.0  # separate cells while there is room, else a continuous band
        return QRectF(i * width, MARKER, max(width - gap, 1.0), CELL_HEIGHT)

    def cell_at(self, x: float) -> int | None:
        if not self.cells or not 0 <= x < self.width():
            return None
        return min(int(x * len(self.cells) / self.width()), len(self.cells) - 1)

    def divergence_x(self) -> float | None:
        """Where the marker points: the left edge of the first diverging step, or the end when a run ended first."""
        if self.flips is None or self.flips.first_divergence is None:
            return None
        steps = [d.step for d in self.flips.steps]
        d = self.flips.first_divergence
        return self._cell_rect(steps.index(d)).left() if d in steps else float(self.width())

    def paintEvent(self, _event) -> None:
        p = QPainter(self)
        palette = self.palette()
        window, text = palette.color(QPalette.ColorRole.Window), palette.color(QPalette.ColorRole.WindowText)
        # "agree" is a faint mix of the text into the window, so it recedes in a light and a dark theme alike
        neutral = QColor.fromRgbF(*(0.78 * a + 0.22 * b for a, b in zip(window.getRgbF()[:3], text.getRgbF()[:3])))
        p.setPen(Qt.PenStyle.NoPen)
        for i, kind in enumerate(self.cells):
            rect = self._cell_rect(i)
            if kind == "both":  # token change on top, moved position below
                top, bottom = QRectF(rect), QRectF(rect)
                top.setHeight(rect.height() / 2)
                bottom.setTop(top.bottom())
                p.fillRect(top, QColor(FLIP_TOKEN))
                p.fillRect(bottom, QColor(FLIP_POSITION))
            else:
                p.fillRect(rect, QColor(COLORS.get(kind, neutral)))
        x = self.divergence_x()
        if x is not None:
            x = min(max(x, MARKER / 2), self.width() - MARKER / 2)  # keep the whole triangle on screen
            p.setRenderHint(QPainter.RenderHint.Antialiasing)
            p.setBrush(text)
            p.drawPolygon(QPolygonF([QPointF(x - MARKER / 2, 0), QPointF(x + MARKER / 2, 0), QPointF(x, MARKER)]))
            p.fillRect(QRectF(x - 0.75, MARKER, 1.5, CELL_HEIGHT), text)
        p.end()

    def event(self, event) -> bool:
        if event.type() == QEvent.Type.ToolTip:
            i = self.cell_at(event.pos().x())
            if i is None:
                QToolTip.hideText()
            else:  # <qt> forces rich text, so a piece like <|eot_id|> shows as itself
                QToolTip.showText(event.globalPos(), f"<qt>{html.escape(self.cell_tip(i), quote=False)}</qt>", self)
            return True
        return super().event(event)

    def cell_tip(self, i: int) -> str:
        return cell_tip(self.flips.steps[i], self.pieces)


class FlipPanel(QWidget):
    """The strip with its one-line summary and a legend above it."""

    def __init__(self, parent=None) -> None:
        super().__init__(parent, objectName="flipPanel")
        self.label = QLabel(objectName="flipSummary", toolTip=TEACHER_FORCING)
        self.strip = FlipStrip()
        legend = QLabel(objectName="flipLegend", textFormat=Qt.TextFormat.RichText, toolTip=TEACHER_FORCING)
        legend.setText(f'<span style="color:{FLIP_TOKEN}">■</span> another token &nbsp;'
                       f'<span style="color:{FLIP_POSITION}">■</span> another position &nbsp;'
                       "▼ answers diverge")
        row = QHBoxLayout()
        row.addWidget(self.label, 1)
        row.addWidget(legend)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(0, 0, 0, 0)
        layout.setSpacing(2)
        layout.addLayout(row)
        layout.addWidget(self.strip)
        self.hide()

    def show_flips(self, flips: DecisionFlips, pieces: dict[int, str]) -> None:
        self.strip.set_flips(flips, pieces)
        self.label.setText(summary(flips))
        self.strip.setAccessibleDescription(f"{summary(flips)}. {TEACHER_FORCING}")
        self.show()
