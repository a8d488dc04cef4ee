"""Engine jobs on worker threads: the GUI thread only ever receives their events as queued signals.

A job is a plain function `work(emit, cancel) -> result` that runs on a `JobThread`; `emit` hands an
engine `Event` to the GUI thread and `cancel` is the engine's `CancelToken`, checked between layers
and steps (Python threads cannot be killed, so cancelling is cooperative). Event-stream jobs are
wrapped with `stream`.
"""

from __future__ import annotations

import gc
import logging
import traceback
import warnings
from collections.abc import Callable, Generator
from typing import Any

from PySide6.QtCore import QObject, QThread, QTimer, Signal

from dllm_studio import jobs
from dllm_studio.errors import Cancelled, DllmError
from dllm_studio.events import CancelToken, Event

log = logging.getLogger(__name__)

Work = Callable[[Callable[[Event], None], CancelToken], Any]


def stream(make_job: Callable[[CancelToken], Generator[Event, None, Any]]) -> Work:
    """A `Work` that drives the engine job `make_job(cancel)` and forwards every event it yields."""
    return lambda emit, cancel: jobs.run(make_job(cancel), emit)


class JobThread(QThread):
    """Runs one `Work` and reports how it ended: exactly one of succeeded, failed or cancelled."""

    event = Signal(object)  # an engine Event, in the order the job yielded it
    succeeded = Signal(object)  # the job's return value
    failed = Signal(str)  # a message for the user
    cancelled = Signal()

    def __init__(self, title: str, work: Work, parent=None) -> None:
        super().__init__(parent)
        self.title = title
        self.work = work
        self.token = CancelToken()

    def cancel(self) -> None:
        self.token.cancel()

    def detach(self) -> None:
        """Report nothing more to anyone: whoever listened is going away (a quit stopped waiting for this job).
        Only `finished` stays connected, for the session's bookkeeping."""
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # PySide warns when a signal had no listener
            for signal in (self.event, self.succeeded, self.failed, self.cancelled):
                signal.disconnect()

    def run(self) -> None:
        try:
            result = self.work(self.event.emit, self.token)
        except Cancelled:
            self.cancelled.emit()
        except DllmError as exc:  # the engine's own, already user-readable
            self.failed.emit(str(exc))
        except MemoryError:
            self.failed.emit(f"{self.title} ran out of memory; nothing was changed. Try fewer bits, "
                             "fewer calibration samples or a smaller model.")
        except Exception as exc:  # a bug: keep the window alive and say what happened
            log.error("%s failed:\n%s", self.title, traceback.format_exc())
            self.failed.emit(f"{self.title} failed: {type(exc).__name__}: {exc}")
        else:
            self.succeeded.emit(result)


class GuiThreadGarbageCollection(QObject):
    """Keep Python's cyclic garbage collector on the GUI thread while workers run.

    The collector runs in whichever thread happens to allocate. If a worker thread collects a cycle that
    holds a Qt object (a closed dialog, a page's lambda), that object is destroyed off the GUI thread and
    Qt crashes. So while any job runs, automatic collection is paused and a GUI-thread timer collects
    instead (pyqtgraph's GarbageCollector does the same); when the last job ends it is switched back on.
    """

    def __init__(self, parent=None, interval_ms: int = 1000) -> None:
        super().__init__(parent)
        self.running = 0
        self.timer = QTimer(self, interval=interval_ms)
        self.timer.timeout.connect(self.collect)

    def job_started(self) -> None:
        if self.running == 0 and gc.isenabled():
            gc.disable()
            self.timer.start()
        self.running += 1

    def job_finished(self) -> None:
        self.running -= 1
        if self.running == 0 and self.timer.isActive():
            self.timer.stop()
            gc.enable()

    def reset(self) -> None:
        """Every worker has stopped (the session waited for them): collect normally again."""
        if self.running:
            self.running = 1
            self.job_finished()

    @staticmethod
    def collect() -> None:
        # Only the young generation while jobs run: it is cheap. Older generations hold the model's and
        # the libraries' objects, and walking them takes 100-300 ms, a visible freeze; they are
        # collected as usual once the last job ends and automatic collection is back on.
        if gc.get_count()[0] > gc.get_threshold()[0]:
            gc.collect(0)
