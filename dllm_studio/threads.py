"""How many CPU threads torch computes with: one rule for the CLI and the desktop app.

torch takes every core by default. On a small machine that is slower, not faster, as soon as anything
else wants a core: a busy 2-core machine ran `generate demo` at 275 ms/step with the default threads and
5.8 ms/step with one. So both faces leave one physical core free (the GUI thread, or whatever else runs).
"""

from __future__ import annotations

import os

from dllm_studio.errors import InvalidSettingsError


def default_threads() -> int:
    """Physical cores this process may use, minus one, at least one."""
    import psutil

    physical = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):  # a container or taskset may allow fewer cores than the machine has
        physical = min(physical, len(os.sched_getaffinity(0)))
    return max(1, physical - 1)


def use_threads(n: int | None = None) -> int:
    """Compute with `n` threads (None: `default_threads()`); returns the number now in use."""
    import torch

    n = default_threads() if n is None else n
    if n < 1:
        raise InvalidSettingsError(f"The thread count must be at least 1, not {n}.")
    torch.set_num_threads(n)
    return torch.get_num_threads()
