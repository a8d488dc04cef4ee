"""The one driver for the engine's event-stream jobs.

A job is a generator that yields `Event`s and returns its result. The CLI, the GUI's workers and the
tests all run jobs through `run`, so they see the same full stream.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Generator
from typing import TypeVar

from dllm_studio.errors import Cancelled
from dllm_studio.events import CancelToken, Event

R = TypeVar("R")


def run(job: Generator[Event, None, R], on_event: Callable[[Event], None] | None = None) -> R:
    """Drive `job` to the end, handing each event to `on_event`, and return the job's result."""
    while True:
        try:
            event = next(job)
        except StopIteration as stop:
            return stop.value
        if on_event is not None:
            on_event(event)


def threaded(work: Callable[[Callable[[Event], None]], R], cancel: CancelToken | None = None) -> Generator[Event, None, R]:
    """A job made of blocking `work(emit)`: it runs on a helper thread and each event it emits is yielded in turn.

    For work that reports from inside code that cannot yield (a hub download's own threads, a model family's
    loader). `emit` returns once the job's caller has handled the event, then raises `Cancelled` if `cancel` is
    set (or the job was closed early): so the work stops at the unit of work after the event that cancelled it.
    The job ends only when the work has.
    """
    events: queue.SimpleQueue = queue.SimpleQueue()
    closed = threading.Event()
    finished = object()
    outcome: list = []

    def stop_if_asked() -> None:
        if closed.is_set():
            raise Cancelled("The job was stopped.")
        if cancel is not None:
            cancel.check()

    def emit(event: Event) -> None:
        stop_if_asked()
        handled = threading.Event()
        events.put((event, handled))
        handled.wait()
        stop_if_asked()

    def target() -> None:
        try:
            outcome.append((True, work(emit)))
        except BaseException as exc:  # handed to the job's caller, as if the work had run in its thread
            outcome.append((False, exc))
        finally:
            events.put(finished)

    thread = threading.Thread(target=target, name="job-work", daemon=True)
    thread.start()
    try:
        while (item := events.get()) is not finished:
            event, handled = item
            try:
                yield event
            finally:
                handled.set()
    finally:
        closed.set()
        while thread.is_alive():  # let every emit waiting on a closed job return (and raise)
            try:
                item = events.get(timeout=0.05)
            except queue.Empty:
                continue
            if item is not finished:
                item[1].set()
        thread.join()
    ok, value = outcome[0]
    if not ok:
        raise value
    return value
