"""What the studio holds: the full-precision model, its quantized variants, and the one running job.

One job runs at a time (Anki's single-slot executor): quantizing, generating and evaluating all
compete for the same cores and memory, so the full-precision and quantized chat panes take turns
rather than running together.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
import time
from pathlib import Path

from PySide6.QtCore import QObject, Signal

from dllm_studio import memory
from dllm_studio.models import DiffusionLM
from ui.workers import GuiThreadGarbageCollection, JobThread, Work


@dataclass
class Variant:
    """A quantized model the user can chat with, compare and export."""

    name: str
    model: DiffusionLM
    summary: dict = field(default_factory=dict)  # the quantizer's summary when it was made this session
    layers: list[dict] = field(default_factory=list)  # per-layer statistics (profile.json's "layers")
    folder: Path | None = None  # where it lives on disk, once loaded from or exported to a folder


def is_quantized(model: DiffusionLM) -> bool:
    return bool(model.config.get("quantization_config"))


# Jobs still running after a quit gave up waiting for them: held here, unparented, so that neither the session
# nor its window going away destroys a QThread that is still running (Qt aborts the process when that happens).
_detached: set[JobThread] = set()


class Session(QObject):
    model_changed = Signal()  # the full-precision model was (re)loaded
    variants_changed = Signal()  # one added, or one's folder became known
    variant_selected = Signal(str)  # the user asked for this variant (e.g. by opening its folder again)
    busy_changed = Signal(bool, str)  # running?, the job's title
    job_failed = Signal(str, str)  # title, message
    free_memory_changed = Signal(object)  # bytes free now, from refresh_free_memory (object: past 32 bits)

    def __init__(self, parent=None) -> None:
        super().__init__(parent)
        self.model: DiffusionLM | None = None
        self.variants: dict[str, Variant] = {}
        self.job: JobThread | None = None
        self._threads: set[JobThread] = set()  # kept alive until their thread has really stopped
        self._gc = GuiThreadGarbageCollection(self)
        self.free_memory = memory.available_bytes()

    # ---- free memory --------------------------------------------------------------------------------
    def refresh_free_memory(self) -> int:
        """Read the free memory once and hand it to every widget that shows it (the status bar, the Models card,
        the Quantize preflight), so no two of them can show different figures at the same moment."""
        self.free_memory = memory.available_bytes()
        self.free_memory_changed.emit(self.free_memory)
        return self.free_memory

    # ---- models -------------------------------------------------------------------------------------
    def set_model(self, model: DiffusionLM) -> None:
        """A new full-precision model. Variants stay: a quantized folder opened earlier is still worth comparing."""
        self.model = model
        self.model_changed.emit()

    def add_variant(self, variant: Variant) -> Variant:
        name, n = variant.name, 2
        while name in self.variants:  # two runs of one recipe keep both results
            name, n = f"{variant.name} ({n})", n + 1
        variant.name = name
        self.variants[name] = variant
        self.variants_changed.emit()
        return variant

    def set_folder(self, variant: Variant, folder: Path) -> None:
        """`variant` now lives in `folder` (it was exported there)."""
        variant.folder = folder
        self.variants_changed.emit()

    def select_variant(self, variant: Variant) -> None:
        self.variant_selected.emit(variant.name)

    def holding(self, folder: Path) -> DiffusionLM | Variant | None:
        """What is open from `folder` already (paths compared resolved): the full-precision model, a variant, or None."""
        folder = folder.resolve()
        if self.model is not None and Path(self.model.path).resolve() == folder:
            return self.model
        return next((v for v in self.variants.values() if v.folder is not None and v.folder.resolve() == folder), None)

    @property
    def described_only(self) -> bool:
        """The open model is only described (on meta, from its headers): too big to load here, it can only be
        quantized streaming from its shards."""
        return self.model is not None and all(t.is_meta for t in self.model.module.parameters())

    # ---- jobs ---------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        return self.job is not None

    def unavailable(self, *, needs_variant: bool = False) -> str | None:
        """Why a job on the open model (and a quantized variant) cannot start now, or None when it can."""
        if self.model is None:
            return "Open a model on the Models page first."
        if self.described_only:
            return (f"{self.model.source} is too big to load here, so it is only described: quantize it streaming "
                    "from its shards on the Quantize page, then open the folder it writes.")
        if needs_variant and not self.variants:
            return ("No quantized variant yet: quantize the model on the Quantize page, or open a quantized "
                    "folder on the Models page.")
        if self.job is not None:
            return f"Wait for {self.job.title} to finish."
        return None

    def start(self, title: str, work: Work, *, on_event: Callable | None = None, on_done: Callable | None = None,
              on_failed: Callable | None = None, on_cancelled: Callable | None = None) -> JobThread:
        """Run `work` on a worker thread; exactly one of on_done(result) / on_failed(message) / on_cancelled()
        is called on the GUI thread when it ends, after the session is free again (so it may chain the next)."""
        if self.job is not None:
            raise RuntimeError(f"{self.job.title} is still running")
        job = JobThread(title, work, self)
        if on_event is not None:
            job.event.connect(on_event)

        def ended(callback, *args):
            if self.job is job:
                self.job = None
                self.busy_changed.emit(False, title)
            if callback is not None:
                callback(*args)

        job.succeeded.connect(lambda result: ended(on_done, result))
        job.failed.connect(lambda message: (ended(on_failed, message), self.job_failed.emit(title, message)))
        job.cancelled.connect(lambda: ended(on_cancelled))
        job.finished.connect(lambda: (self._threads.discard(job), self._gc.job_finished()))
        self.job = job
        self._threads.add(job)
        self._gc.job_started()
        self.busy_changed.emit(True, title)
        job.start()
        return job

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()

    def shutdown(self, timeout_ms: int = 30_000) -> bool:
        """Cancel the running job and wait at most `timeout_ms` in all for the worker threads to stop (on quit).

        Returns whether they all stopped (the window, quitting, gives them 2 s). Cancelling is cooperative: a
        worker inside one long torch op sees it only when the op returns. Such a worker is detached: nothing it
        reports reaches the pages any more, and a quitting process exits without it (`ui.app.exit_status`).
        Nothing is lost by not waiting: settings are saved first, and the engine writes every file atomically
        (a streamed folder keeps its resumable partial folder).
        """
        self.cancel()
        deadline = time.monotonic() + timeout_ms / 1000
        for job in list(self._threads):
            job.wait(max(0, round(1000 * (deadline - time.monotonic()))))
        running = [job for job in self._threads if job.isRunning()]
        for job in running:
            job.detach()
            job.setParent(None)
            _detached.add(job)
            job.finished.connect(lambda job=job: _detached.discard(job))
        if not running:  # a detached worker still runs Python: the collector stays on the GUI thread's timer
            self._gc.reset()
        return not running

    @staticmethod
    def detached_jobs() -> int:
        """How many jobs a quit left running (they ignored the cancel so far)."""
        return sum(job.isRunning() for job in _detached)
