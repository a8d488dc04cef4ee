"""Take the README's screenshots from a real window: every page in a realistic state on the demo model.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python docs/make_screenshots.py [--theme light|dark]
        [--size 1024x700]

The window runs on an X server (Xvfb) and each shot is grabbed from the screen, as a person would see it.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QEventLoop, QSettings, QTimer
from PySide6.QtWidgets import QApplication

OUT = Path(__file__).parent / "screenshots"


def wait(condition, timeout_s: float = 600) -> None:
    """Run the event loop until `condition()` holds."""
    import time

    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError("the window did not reach the expected state")
        settle(50)


def settle(ms: int = 400) -> None:
    loop = QEventLoop()
    QTimer.singleShot(ms, loop.quit)
    loop.exec()


def shoot(window, name: str, suffix: str) -> None:
    settle()
    g = window.frameGeometry()
    pixmap = QApplication.primaryScreen().grabWindow(0, g.x(), g.y(), g.width(), g.height())
    path = OUT / f"{name}{suffix}.png"
    pixmap.save(str(path))
    print(f"saved {path} ({pixmap.width()}x{pixmap.height()})")


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--theme", default="light", choices=("light", "dark"))
    parser.add_argument("--size", default="1440x900", help="window size WxH; other than the default, the shots "
                        "are named after it (e.g. chat-1024x700.png) to check a small screen")
    args = parser.parse_args()
    width, height = (int(n) for n in args.size.split("x"))
    suffix = ("" if args.theme == "light" else "-dark") + ("" if args.size == "1440x900" else f"-{args.size}")
    tmp = Path(tempfile.mkdtemp(prefix="dllm-shots-"))
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, str(tmp / "settings"))

    from ui import theme
    from ui.app import create_window
    from ui.settings import APPLICATION, ORGANIZATION, Settings

    app = QApplication(sys.argv[:1])
    app.setOrganizationName(ORGANIZATION)
    app.setApplicationName(APPLICATION)
    theme.apply(app, args.theme)
    window = create_window("demo", Settings())
    window.resize(width, height)
    window.move(0, 0)
    window.show()
    wait(lambda: window.session.model is not None and not window.session.busy)
    OUT.mkdir(exist_ok=True)
    shoot(window, "models", suffix)
    window.show_quick_start()
    shoot(window._quick_start, "quick-start", suffix)
    window._quick_start.close()

    window.show_page("quantize")
    q = window.quantize
    q.method.setCurrentIndex(q.method.findData("gptq"))
    q.bits.setCurrentIndex(q.bits.findData(4))
    q.start()
    wait(lambda: not window.session.busy)
    shoot(window, "quantize", suffix)
    # a 3-bit round-to-nearest variant too: it answers differently, which is what Chat and Compare show
    q.method.setCurrentIndex(q.method.findData("rtn"))
    q.bits.setCurrentIndex(q.bits.findData(3))
    q.start()
    wait(lambda: not window.session.busy)
    # weights and activations at 4 bits with QuaRot: the Transforms tab shows each input before and after rotating
    q.method.setCurrentIndex(q.method.findData("quarot"))
    q.bits.setCurrentIndex(next(i for i in range(q.bits.count()) if q.bits.itemText(i).startswith("W4A4")))
    q.start()
    wait(lambda: not window.session.busy)
    q.live_tabs.setCurrentWidget(q.transforms_table.parentWidget())
    shoot(window, "quantize-transforms", suffix)
    q.live_tabs.setCurrentWidget(q.live_tabs.widget(0))
    # bits per layer planned to a target (mixed precision): the bit map under the recipe
    q.method.setCurrentIndex(q.method.findData("gptq"))
    q.bits.setCurrentIndex(q.bits.findData(4))
    q.precision.setCurrentIndex(q.precision.findData("bpw"))
    q.budget.setValue(3.2)
    q.start()
    wait(lambda: not window.session.busy)
    shoot(window, "quantize-budget", suffix)
    q.precision.setCurrentIndex(q.precision.findData("uniform"))

    window.show_page("chat")
    chat = window.chat
    chat.variant_box.setCurrentText("RTN W3A16 g128")
    finished = []
    chat.answer_finished.connect(lambda pane, text: finished.append(pane))
    # a held-out math item: the demo answers with the worked sum, so a quantization error shows where it sits
    chat.input.setPlainText("There were 15 birds on a tree and 2 flew away. How many birds are left?")
    chat.send()
    wait(lambda: len(finished) == 2 and not window.session.busy)
    shoot(window, "chat", suffix)
    # replay a late step: the end-of-answer padding settles first, then the sum appears with masks still open
    for pane in (chat.fp, chat.quant):
        pane.replay.setValue(28)
    shoot(window, "chat-denoising", suffix)
    # a second turn: the demo is single-turn, so it is sent the new question alone (the pane says so)
    finished.clear()
    chat.input.setPlainText("What is 7 + 5?")
    chat.send()
    wait(lambda: len(finished) == 2 and not window.session.busy)
    shoot(window, "chat-two-turns", suffix)
    # Fast-dLLM: the dual cache and a 0.9 threshold commit most of each 8-token block at once
    chat.new_chat()
    chat.block_length.setValue(8)
    chat.cache.setCurrentText("dual")
    chat.threshold.setValue(0.9)
    finished.clear()
    chat.input.setPlainText("There were 15 birds on a tree and 2 flew away. How many birds are left?")
    chat.send()
    wait(lambda: len(finished) == 2 and not window.session.busy)
    shoot(window, "chat-fast", suffix)

    window.show_page("compare")
    window.compare.variant.setCurrentText("RTN W3A16 g128")
    window.compare.limit.setValue(20)
    window.compare.run()
    wait(lambda: not window.session.busy)
    shoot(window, "compare", suffix)

    window.show_page("export")
    window.export.path.setText(str(tmp / "demo-gptq-w4"))
    window.export.export()
    wait(lambda: not window.session.busy)
    shoot(window, "export", suffix)
    window.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
