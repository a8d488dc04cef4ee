"""Start the desktop studio: `python main.py [MODEL]` (MODEL: demo, a folder or a hub id); `--smoke PNG` checks a build."""

from __future__ import annotations

import argparse
import gc
import logging
import os
import sys
from pathlib import Path

from PySide6.QtGui import QIcon
from PySide6.QtWidgets import QApplication

from ui import smoke, theme
from ui.paths import ICONS
from ui.settings import APPLICATION, ORGANIZATION, Settings


def create_window(model: str | None = "demo", settings: Settings | None = None):
    """The main window with a fresh session, opening `model` in the background (None: open nothing)."""
    from dllm_studio.threads import use_threads
    from ui.main_window import MainWindow
    from ui.session import Session

    # Leave one core to the window: torch's compute threads would otherwise take every core and the GUI
    # thread would wait for a time slice (on 2 cores this is also faster overall: measured 10 s vs 13 s
    # for the demo's GPTQ run with the charts drawing). The CLI's --threads default is the same rule.
    use_threads()
    # A worker running Python code keeps the GIL for up to the switch interval each time the GUI thread
    # asks for it, and Qt calls release and re-take it many times per repaint: 1 ms instead of 5 ms
    # keeps a repaint from waiting tens of milliseconds.
    sys.setswitchinterval(0.001)
    window = MainWindow(Session(), settings or Settings())
    # torch, transformers and Qt leave a million long-lived objects behind; a full collection walking
    # them all takes 100-300 ms on the GUI thread. Frozen, they are never walked again.
    gc.collect()
    gc.freeze()
    if model:
        window.models.open(model)
    return window


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dllm-studio-gui", description="The dLLM Studio desktop app.")
    parser.add_argument("model", nargs="?", default="demo", help="demo (default), a model folder or a hub id")
    parser.add_argument("--theme", choices=("system", "light", "dark"), help="override the saved theme")
    parser.add_argument("--smoke", metavar="PNG", type=Path,
                        help="check a build: open the demo offscreen, answer one prompt, save a screenshot, exit")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if args.smoke:
        smoke.prepare()

    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)  # also the X11 WM class the .desktop entry matches
    app.setWindowIcon(app_icon())
    settings = Settings()
    if args.theme:
        settings.set("theme", args.theme)
    theme.apply(app, settings.get("theme"))
    app.styleHints().colorSchemeChanged.connect(  # "system" follows the desktop when it switches
        lambda _scheme: settings.get("theme") == "system" and theme.apply(app, "system"))
    window = create_window("demo" if args.smoke else args.model, settings)
    window.show()
    if args.smoke:
        return smoke.run(app, window, args.smoke)
    return exit_status(app.exec(), window.session)


def exit_status(status: int, session) -> int:
    """`status`, once the window has closed; exits at once instead when a job ignored the quit's cancel.

    That job's worker is inside one long torch op and cannot be killed. Returning would take Python through its
    shutdown with the thread running, destroying the still running QThread (Qt aborts) or tearing modules down
    under it; os._exit skips all that. Nothing is lost by it: the window saved the settings before it closed,
    and the engine writes every file atomically (a streamed folder keeps its resumable partial folder).
    """
    if session.detached_jobs():
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    return status


def app_icon() -> QIcon:
    icon = QIcon()
    for png in sorted(ICONS.glob("dllm-studio-*.png")):
        icon.addFile(str(png))
    return icon


if __name__ == "__main__":
    sys.exit(main())
