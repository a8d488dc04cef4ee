"""Small widgets more than one page uses."""

from __future__ import annotations

from PySide6.QtWidgets import QComboBox

from ui.session import Session


class VariantPicker(QComboBox):
    """The session's quantized variants, kept in step with it.

    The user's choice stays while that variant exists; otherwise the newest variant (the one most likely
    just made) is offered. A variant the session selects (its folder opened again) becomes the choice. It refreshes before the page's own `variants_changed` handlers run, because it
    connects first.
    """

    def __init__(self, session: Session, parent=None, **kwargs) -> None:
        super().__init__(parent, **kwargs)
        self.session = session
        self.setAccessibleName("Quantized variant")
        session.variants_changed.connect(self.refresh)
        session.variant_selected.connect(self.setCurrentText)
        self.refresh()

    def refresh(self) -> None:
        current, names = self.currentText(), list(self.session.variants)
        self.blockSignals(True)  # one change signal for the whole refresh, not one per item
        self.clear()
        self.addItems(names)
        self.setCurrentText(current if current in names else (names[-1] if names else ""))
        self.blockSignals(False)
        if self.currentText() != current:
            self.currentIndexChanged.emit(self.currentIndex())
