"""Turning the MODEL argument into a local folder: `demo`, a folder path, or a hub id.

Hub ids are downloaded into the standard Hugging Face cache (so other tools share it), with
progress events; when offline, a cached copy is used, and a clear error names the id otherwise.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable
from pathlib import Path

from dllm_studio.errors import ModelNotFoundError
from dllm_studio.events import DownloadProgress, Event

DEMO_NAME = "demo"
DEMO_PATH = Path(__file__).resolve().parent.parent / "resources" / "models" / "demo"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Files worth downloading: configs, safetensors weights, tokenizers, chat templates, model code
# (only ever run with consent). Pickle weights are never fetched.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "*.tiktoken", "README.md"]


def resolve(model: str, on_event: Callable[[Event], None] | None = None) -> Path:
    """The local folder for `model`, downloading a hub id if needed."""
    if model == DEMO_NAME:
        if not (DEMO_PATH / "config.json").is_file():
            raise ModelNotFoundError(
                "The bundled demo model is not part of this build yet (it arrives with the 'demo dLLM' issue); "
                "pass a local model folder or a hub id instead.")
        return DEMO_PATH
    path = Path(model).expanduser()
    if path.is_dir():
        return path.resolve()
    if path.exists():
        raise ModelNotFoundError(f"{model} is a file; MODEL must be a model folder, a hub id or 'demo'.")
    if HUB_ID.match(model) and not model.startswith((".", "~")):
        return download(model, on_event)
    raise ModelNotFoundError(f"No model folder at {model} (and it is not a hub id like 'org/name').")


def download(repo_id: str, on_event: Callable[[Event], None] | None = None) -> Path:
    """Fetch `repo_id` into the HF cache, or use the cached copy when the hub is unreachable.

    `on_event` hears every chunk written and may stop the download by raising (`Cancelled`). That leaves the
    cache usable: huggingface_hub writes each file to a temporary `.incomplete` file of its own and moves it
    into the cache only once complete, deleting it on any error; files already finished stay and the next
    download of the repository skips them.
    """
    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.errors import GatedRepoError, HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError

    incomplete = getattr(errors, "IncompleteSnapshotError", ())  # newer huggingface_hub only

    kwargs = dict(allow_patterns=HUB_PATTERNS)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, tqdm_class=_progress_class(repo_id, on_event), **kwargs))
    except HFValidationError as exc:  # e.g. "org/a--b": looks like an id to HUB_ID, not to the hub
        raise ModelNotFoundError(f"{repo_id} is not a valid hub id ({exc}).") from None
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is gated: accept its terms on huggingface.co and log in (hf auth login) to download it.") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"The hub has no repository {repo_id} (or it is private).") from None
    except _network_errors():
        # Offline (HF_HUB_OFFLINE raises LocalEntryNotFoundError here), no connection, the hub failing,
        # or a download cut off midway: the cache may still hold a complete copy.
        pass
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
    except incomplete:
        raise ModelNotFoundError(
            f"The cached copy of {repo_id} is incomplete and the hub cannot be reached to finish it; "
            "connect and run the command again.") from None
    except LocalEntryNotFoundError:
        from huggingface_hub import constants

        why = "HF_HUB_OFFLINE is set" if constants.is_offline_mode() else "the hub is unreachable"
        raise ModelNotFoundError(
            f"Cannot download {repo_id}: {why} and no copy is cached in {constants.HF_HUB_CACHE}.") from None


def _network_errors() -> tuple[type[Exception], ...]:
    """What a failed download raises: OSError (the hub's HTTP and cache errors are OSErrors) and, for a
    connection dropped mid-file, the HTTP client's own transport error."""
    try:
        from httpx2 import TransportError  # huggingface_hub 2.x's HTTP client
    except ImportError:
        try:
            from httpx import TransportError  # huggingface_hub 1.x's
        except ImportError:
            return (OSError,)
    return (OSError, TransportError)


# snapshot_download counts bytes twice: received from the network (this bar, against an estimated
# total) and written to disk (against the files' real sizes). Only the second is reported.
_TRANSFER_BAR_DESC = "Downloading bytes"


def _progress_class(repo_id: str, on_event: Callable[[Event], None] | None):
    """A tqdm stand-in that turns huggingface_hub's byte counts into DownloadProgress events."""
    from tqdm.auto import tqdm

    class Progress(tqdm):
        def __init__(self, *args, **kwargs):
            # Decide before tqdm sees the arguments: a disabled tqdm never stores `unit`.
            self._reports = (on_event is not None and kwargs.get("unit") == "B"
                             and kwargs.get("desc") != _TRANSFER_BAR_DESC)
            self._count_lock = threading.Lock()
            kwargs["disable"] = True  # draw nothing; report through events
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            # A disabled tqdm's update() does nothing, so count here; files download in parallel threads.
            with self._count_lock:
                self.n += n or 0
                done, total = int(self.n), int(self.total) if self.total else None
            if self._reports:
                on_event(DownloadProgress(repo_id, done, total))

    return Progress
