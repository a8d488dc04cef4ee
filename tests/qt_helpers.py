"""Helpers the pytest-qt tests share."""

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QApplication


def error_dialogs() -> list:
    """The error dialogs showing now (ui.dialogs.show_error opens them without blocking)."""
    return [w for w in QApplication.topLevelWidgets() if w.objectName() == "errorDialog" and w.isVisible()]


def shortcut_owners(window) -> dict[str, list[str]]:
    """Every key sequence bound in the window -> the texts of the actions it triggers, once per binding."""
    owners: dict[str, list[str]] = {}
    for action in window.findChildren(QAction):
        for key in action.shortcuts():
            owners.setdefault(key.toString(QKeySequence.SequenceFormat.PortableText), []).append(action.text())
    return owners


def studio_session(model):
    """A studio session holding `model`, for a fixture to yield; waits for any job a test leaves running."""
    from ui.session import Session

    s = Session()
    s.set_model(model)
    yield s
    s.shutdown()


def cancel_at_first(qtbot, page, session, kind: str = "LayerQuantized"):
    """Start the Quantize page's job and press Cancel at its first `kind` event; wait until the session is idle."""
    cancelled = []

    def on_event(event):
        if type(event).__name__ == kind and not cancelled:
            cancelled.append(event)
            page.cancel_button.click()

    with qtbot.waitSignal(session.busy_changed, timeout=120_000, check_params_cb=lambda busy, _t: not busy):
        page.start_button.click()
        page.job.event.connect(on_event)
    assert cancelled
