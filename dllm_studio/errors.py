"""Errors a user can act on.

Every failure the engine can explain is a `DllmError` whose message is one complete sentence naming
the thing at fault (a file, a tensor, a setting). The CLI prints the message as one line and exits
non-zero; the GUI shows it in a dialog. Anything else is a bug and keeps its traceback.

Messages speak to both faces, so they never name a CLI flag or a GUI control. Where the remedy is a
switch only a face has (replace the folder, skip the memory check, run the model's code), the error is
its own type carrying the facts, and each face adds the advice that names its own flag or control.
"""

from pathlib import Path


class DllmError(Exception):
    """Base class: a specific, user-facing error message."""


class ModelNotFoundError(DllmError):
    """The MODEL argument names no folder, bundled model or reachable hub repository."""


class ModelLoadError(DllmError):
    """A model folder exists but cannot be loaded (missing, corrupt or inconsistent files)."""


class UnsupportedModelError(ModelLoadError):
    """The folder holds a model family dLLM Studio does not implement."""


class RemoteCodeRefusedError(ModelLoadError):
    """The model needs code from its folder and the user has not agreed to run it."""

    def __init__(self, message: str, folder: Path, files: list[str]) -> None:
        super().__init__(message)
        self.folder, self.files = folder, files


class SandboxUnavailableError(DllmError):
    """Generated code would run without operating-system isolation, and the user has not agreed to that."""


class InvalidSettingsError(DllmError):
    """Generation (or other job) settings that cannot work together."""


class Cancelled(DllmError):
    """A job was cancelled by the user; nothing it would have produced is kept."""


class SuiteError(DllmError):
    """A task-suite file is missing or malformed; the message names the file and the line."""


class InsufficientMemoryError(DllmError):
    """A job would need more RAM or VRAM than is free; the message gives the estimate and what is free."""

    def __init__(self, message: str, needed: int, free: int) -> None:
        super().__init__(message)
        self.needed, self.free = needed, free


class QuantizationError(DllmError):
    """A quantization recipe that cannot run on this model (a bit-width a method cannot do, a bad group size)."""


class ExportError(DllmError):
    """A quantized model cannot be written (existing folder, full disk, unwritable place)."""


class FolderExistsError(ExportError):
    """The output folder exists and replacing it was not asked for."""

    def __init__(self, path: Path) -> None:
        super().__init__(f"{path} already exists.")
        self.path = Path(path)


class WriteError(DllmError):
    """A file cannot be written (full disk, no permission, read-only place); nothing half-written is left."""


class ConversationError(DllmError):
    """A saved chat conversation cannot be read (missing, malformed, or from a newer dLLM Studio)."""


class ReportError(DllmError):
    """A file that is not a dLLM Studio comparison or study report, or one written by a newer version."""
