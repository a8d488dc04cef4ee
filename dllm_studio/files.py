"""Writing files so that any failure leaves nothing half-written and an OS failure reads as one line.

Every write path of the engine and the GUI goes through `writing` (folders built in a temporary place,
such as an export) or `atomic_write_text` (single files). The cause decides what the user sees: a
failure the operating system reports (a full disk, no permission, a read-only place) becomes a
`WriteError` (or the caller's subclass of `DllmError`) naming the path; anything else is a bug and keeps
its traceback. Either way the temporary is removed first.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from dllm_studio.errors import DllmError, WriteError

# safetensors' writer reports an I/O failure only in its message, e.g.
# "Error while serializing: I/O error: No space left on device (os error 28)".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")


def os_error(exc: BaseException) -> OSError | None:
    """The operating-system error behind `exc`: itself, one in its cause or context chain, or one a native
    library (safetensors) reports only in its message; None when the failure is not the system's."""
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError):
            return exc
        match = _RUST_OS_ERROR.search(str(exc)) if type(exc).__name__ == "SafetensorError" else None
        if match:
            code = int(match.group(1))
            return OSError(code, os.strerror(code))
        exc = exc.__cause__ or exc.__context__
    return None


def describe(error: OSError) -> str:
    """A short reason for an OS error, e.g. "the disk is full" or "Permission denied"."""
    if error.errno == errno.ENOSPC:
        return "the disk is full"
    return error.strerror or str(error)


@contextmanager
def writing(path: str | Path, error: type[DllmError] = WriteError, after: str = "") -> Iterator[None]:
    """Turn a failure the operating system causes inside the block into `error`: "Could not write PATH:
    REASON" plus `after`. Other failures pass through unchanged."""
    try:
        yield
    except Exception as exc:
        cause = os_error(exc)
        if cause is None or isinstance(exc, DllmError):
            raise
        raise error(f"Could not write {path}: {describe(cause)}{after}.") from None


def atomic_write_text(path: str | Path, text: str, error: type[DllmError] = WriteError) -> None:
    """Write `text` (UTF-8) to `path` all or nothing: a temporary file beside it, then a rename.

    On any failure, interruption included, the temporary is removed and `path` is as it was.
    """
    path = Path(path)
    with writing(path, error):
        # A fresh name opened exclusively (not mkstemp, whose 0600 mode would stick to the result).
        tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}.tmp")
        try:
            with open(tmp, "x", encoding="utf-8", newline="") as f:
                f.write(text)
            os.replace(tmp, path)
        except BaseException:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            raise
