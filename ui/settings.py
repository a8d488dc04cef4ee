"""Persistent settings: QSettings with one table of defaults, so every reader gets a typed value."""

from __future__ import annotations

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
    "quantize/method": "gptq",
    "quantize/wbits": 4,
    "quantize/group_size": 128,
    "quantize/calib_samples": 32,
    "quantize/masked_calib": True,
    "export/format": "native",
}


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

    # window geometry and splitter states are opaque bytes
    def raw(self, key: str):
        return self._store.value(key)

    def set_raw(self, key: str, value) -> None:
        self._store.setValue(key, value)

    def sync(self) -> None:
        self._store.sync()
