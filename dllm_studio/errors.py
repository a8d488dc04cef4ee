"""Errors a user can act on.

Every failure the engine can explain is a `DllmError` whose message is one complete sentence naming
the thing at fault (a file, a tensor, a flag). The CLI prints the message as one line and exits
non-zero; the GUI shows it in a dialog. Anything else is a bug and keeps its traceback.
"""


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


class InvalidSettingsError(DllmError):
    """Generation (or other job) settings that cannot work together."""


class Cancelled(DllmError):
    """A job was cancelled by the user; nothing it would have produced is kept."""


class SuiteError(DllmError):
    """A task-suite file is missing or malformed; the message names the file and the line."""


class InsufficientMemoryError(DllmError):
    """A job would need more RAM or VRAM than is free; the message gives the estimate and what is free."""


class QuantizationError(DllmError):
    """A quantization recipe that cannot run on this model (a bit-width a method cannot do, a bad group size)."""


class ExportError(DllmError):
    """A quantized model cannot be written (existing folder, full disk, unwritable place)."""
