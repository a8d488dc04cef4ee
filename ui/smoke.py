"""`--smoke PNG`: the check packaging and CI run on a build. It starts the real window offscreen, opens the
demo model, answers one prompt on the Chat page (so torch, the tokenizer and the sampler all ran), saves
a screenshot of the window and exits 0; a failure or a timeout exits 1 with the reason.
"""

from __future__ import annotations

import os
import platform
import sys
import tempfile
from pathlib import Path

from PySide6.QtCore import QSettings, QTimer

PROMPT = "What is the capital of France?"
TIMEOUT_MS = 300_000


def prepare() -> None:
    """Before the QApplication exists: render offscreen and keep the user's own settings out of it."""
    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope,
                      tempfile.mkdtemp(prefix="dllm-studio-smoke-"))


def versions() -> str:
    import PySide6
    import torch

    # Not `import transformers` here: its lazy module is not thread-safe, and the worker is loading the
    # model through it right now.
    from importlib.metadata import PackageNotFoundError, version

    try:
        transformers = version("transformers")
    except PackageNotFoundError:  # a frozen build without the metadata
        transformers = "?"
    frozen = " (frozen)" if getattr(sys, "frozen", False) else ""
    return (f"dLLM Studio smoke{frozen}: Python {platform.python_version()}, torch {torch.__version__}, "
            f"transformers {transformers}, PySide6 {PySide6.__version__}, Qt platform "
            f"{os.environ.get('QT_QPA_PLATFORM', 'default')}")


def run(app, window, screenshot: Path) -> int:
    """Drive `window` (already opening the demo) to one answer, save `screenshot`; returns the exit code."""
    print(versions(), flush=True)
    outcome = {"code": 1}

    def finish(code: int, message: str) -> None:
        outcome["code"] = code
        print(message, file=sys.stderr if code else sys.stdout, flush=True)
        app.exit(code)

    def opened(_model) -> None:
        chat = window.chat
        window.show_page("chat")
        for field, value in (("gen_length", 16), ("block_length", 16), ("steps", 16)):
            getattr(chat, field).setValue(value)
        chat.input.setPlainText(PROMPT)
        chat.send()

    def answered() -> None:
        answer = window.chat.fp.last_answer()
        image = window.grab()
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        if not image.save(str(screenshot)):
            finish(1, f"smoke: could not write {screenshot}")
        else:
            finish(0, f"smoke: ok; {PROMPT!r} -> {answer!r}; screenshot {screenshot} "
                      f"({image.width()}x{image.height()})")

    window.models.loaded.connect(opened)
    window.chat.turn_finished.connect(answered)
    window.session.job_failed.connect(lambda title, message: finish(1, f"smoke: {title} failed: {message}"))
    QTimer.singleShot(TIMEOUT_MS, lambda: finish(1, f"smoke: no answer within {TIMEOUT_MS // 1000} s"))
    app.exec()
    window.close()
    return outcome["code"]
