"""Run by test_ui_window under a real X11 server (Xvfb, platform xcb), where standard keys map to real ones.

Usage: python xcb_window_check.py SETTINGS_DIR. Opens the main window with no model, lists every action's
shortcuts, presses Ctrl+Q as a user would, and prints one JSON object: the shortcuts, whether the window
closed, and every Qt warning seen.
"""

import json
import sys
from pathlib import Path

from PySide6.QtCore import QSettings, Qt, QTimer, qInstallMessageHandler
from PySide6.QtTest import QTest
from PySide6.QtWidgets import QApplication

sys.path.insert(0, str(Path(__file__).parent))
from qt_helpers import shortcut_owners  # noqa: E402


def main() -> int:
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, sys.argv[1])
    warnings: list[str] = []
    qInstallMessageHandler(lambda _kind, _context, message: warnings.append(message))
    app = QApplication(sys.argv[:1])
    app.setQuitOnLastWindowClosed(False)  # the window closing must not end the check before it reports
    from ui.app import create_window
    from ui.settings import Settings

    window = create_window(None, Settings())
    window.show()
    window.activateWindow()
    result = {"platform": app.platformName()}

    def press_quit() -> None:
        result["shortcuts"] = shortcut_owners(window)
        QTest.keyClick(window, Qt.Key.Key_Q, Qt.KeyboardModifier.ControlModifier)
        QTimer.singleShot(300, finish)

    def finish() -> None:
        result.update(closed=not window.isVisible(), warnings=warnings)
        print(json.dumps(result))
        app.exit(0)

    QTimer.singleShot(800, press_quit)  # let the window map and take focus first
    return app.exec()


if __name__ == "__main__":
    sys.exit(main())
