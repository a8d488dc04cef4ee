"""Where the user's own files go: the platform's application-data folders, never the install or bundle.

Settings live where QSettings puts them (the platform's config location); quantized models and saved
conversations go under the user data folder, e.g. ~/.local/share/dLLM Studio on Linux,
~/Library/Application Support/dLLM Studio on macOS, %LOCALAPPDATA%\\dLLM Studio on Windows.
"""

from __future__ import annotations

from pathlib import Path

import platformdirs

from ui.settings import APPLICATION

ICONS = Path(__file__).resolve().parent.parent / "resources" / "icons"


def data_dir() -> Path:
    return Path(platformdirs.user_data_dir(APPLICATION, appauthor=False))


def models_dir() -> Path:
    """The default parent folder for exported quantized models."""
    return data_dir() / "models"


def conversations_dir() -> Path:
    return data_dir() / "conversations"
