"""The one driver for the engine's event-stream jobs.

A job is a generator that yields `Event`s and returns its result. The CLI, the GUI's workers and the
tests all run jobs through `run`, so they see the same full stream.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from typing import TypeVar

from dllm_studio.events import Event

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
