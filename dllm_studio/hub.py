"""Turning the MODEL argument into a local folder: `demo`, a folder path, or a hub id.

Hub ids are downloaded into the standard Hugging Face cache (so other tools share it), with
progress events; when offline, a cached copy is used, and a clear error names the id otherwise.
"""

from __future__ import annotations

import re
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
    """Fetch `repo_id` into the HF cache, or use the cached copy when the hub is unreachable."""
    import huggingface_hub
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    kwargs = dict(allow_patterns=HUB_PATTERNS)
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, tqdm_class=_progress_class(repo_id, on_event), **kwargs))
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"The hub has no repository {repo_id} (or it is private).") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError):
        pass  # offline or hub unreachable: fall back to the cache
    try:
        return Path(huggingface_hub.snapshot_download(repo_id, local_files_only=True, **kwargs))
    except Exception:
        raise ModelNotFoundError(
            f"Cannot download {repo_id}: the hub is unreachable and no copy is cached on this machine.") from None


def _progress_class(repo_id: str, on_event: Callable[[Event], None] | None):
    """A tqdm stand-in that turns huggingface_hub's byte counts into DownloadProgress events."""
    from tqdm.auto import tqdm

    class Progress(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # draw nothing; report through events
            super().__init__(*args, **kwargs)

        def update(self, n=1):
            super().update(n)
            if on_event is not None and self.unit == "B":
                on_event(DownloadProgress(repo_id, int(self.n), int(self.total) if self.total else None))

    return Progress
