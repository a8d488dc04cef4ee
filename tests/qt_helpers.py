"""Helpers the pytest-qt tests share."""

from PySide6.QtWidgets import QApplication


def error_dialogs() -> list:
    """The error dialogs showing now (ui.dialogs.show_error opens them without blocking)."""
    return [w for w in QApplication.topLevelWidgets() if w.objectName() == "errorDialog" and w.isVisible()]
