"""Persistent settings: QSettings with one table of defaults, so every reader gets a typed value."""

from __future__ import annotations

import json
from pathlib import Path

from PySide6.QtCore import QSettings

ORGANIZATION = "dLLM Studio"
APPLICATION = "dLLM Studio"

DEFAULTS: dict[str, object] = {
    "theme": "system",  # system | light | dark
    "page": 0,
    "chat/gen_length": 32,
    "chat/steps": 32,
    "chat/block_length": 32,
    "chat/remasking": "low_confidence",
    "chat/temperature": 0.0,
    "chat/seed": 0,
    "chat/cache": "none",  # one of sampling.CACHES
    "chat/threshold": 0.0,  # 0: off (GenerationConfig.threshold None)
    "quantize/method": "gptq",
    "quantize/wbits": 4,
    "quantize/abits": 16,
    "quantize/alpha": "",  # "": the method's default (QuantRecipe.alpha None)
    "quantize/clip": "",
    "quantize/group_size": 128,
    "quantize/calib_samples": 32,
    "quantize/masked_calib": True,
    "quantize/calib_masking": "stratified",  # one of quant.recipe.CALIB_MASKINGS; masked_calib False: clean text
    "export/format": "native",
    "recent/models": "[]",  # JSON list, most recent first (an INI file would turn a one-item list into a string)
}

RECENT_LIMIT = 10


def remembered(recent: list[str], source: str, limit: int = RECENT_LIMIT) -> list[str]:
    """`recent` with `source` moved to the front, at most `limit` long."""
    return [source, *(r for r in recent if r != source)][:limit]


def still_there(recent: list[str]) -> list[str]:
    """`recent` without the folders that are gone; 'demo' and hub ids (never absolute paths) stay as they are."""
    return [r for r in recent if not Path(r).is_absolute() or Path(r).is_dir()]


class Settings:
    def __init__(self) -> None:
        self._store = QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION)

    def get(self, key: str):
        default = DEFAULTS[key]
        value = self._store.value(key, default)
        try:  # INI files hand back strings; give callers the default's type
            if isinstance(default, bool):
                return value if isinstance(value, bool) else str(value).lower() in ("true", "1")
            return type(default)(value)
        except (TypeError, ValueError):
            return default

    def set(self, key: str, value) -> None:
        if key not in DEFAULTS:
            raise KeyError(key)
        self._store.setValue(key, value)

    # models opened, for File > Open Recent: "demo", hub ids and absolute folder paths
    def recent_models(self) -> list[str]:
        """Most recent first; folders deleted since are dropped (and forgotten)."""
        try:
            stored = json.loads(self.get("recent/models"))
        except ValueError:
            stored = []
        stored = [r for r in stored if isinstance(r, str)] if isinstance(stored, list) else []
        recent = still_there(stored)
        if recent != stored:
            self.set("recent/models", json.dumps(recent))
        return recent

    def add_recent_model(self, source: str) -> None:
        self.set("recent/models", json.dumps(remembered(self.recent_models(), source)))

    def clear_recent_models(self) -> None:
        self.set("recent/models", "[]")

    # window geometry and splitter states are opaque bytes
    def raw(self, key: str):
        return self._store.value(key)

    def set_raw(self, key: str, value) -> None:
        self._store.setValue(key, value)

    def sync(self) -> None:
        self._store.sync()
