"""Memory: what this process holds, what the machine has free, and whether a job will fit.

`preflight` compares an estimate against the free RAM (or VRAM) before a job allocates anything, and
refuses with the numbers when it will not fit; `force=True` runs it anyway. `MemorySampler` records
RSS (and CUDA memory) several times a second from its own thread while a long job runs.
"""

from __future__ import annotations

import sys
import threading
import time
from collections import deque

from dllm_studio.errors import InsufficientMemoryError
from dllm_studio.events import MemorySample

HEADROOM = 0.9  # share of the free memory a job may plan to use; the rest is left to the OS and the app
ACTIVATION_SHARE = 0.25  # running a model: its weights plus a quarter again for activations, caches, tokenizer


def rss_bytes() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def peak_rss_bytes() -> int:
    """Peak resident memory of this process so far, in bytes."""
    try:  # Linux: the high-water mark of this process's own memory (getrusage's ru_maxrss carries a forking
        # parent's peak into the child, so a process started from a large one would report the parent's size)
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import resource
    except ImportError:  # Windows: psutil reports the peak working set there
        import psutil

        info = psutil.Process().memory_info()
        return int(getattr(info, "peak_wset", info.rss))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)  # macOS reports bytes, Linux KiB


def available_bytes(device="cpu") -> int:
    """Memory a new allocation can use now, the one "free memory" figure every face shows and checks against.

    On the CPU it is the kernel's MemAvailable (psutil's `available`: free pages plus the page cache and
    reclaimable slabs it can drop), not `free`, which leaves out the cache and reads far lower on a machine
    that has been reading files. On a CUDA device it is the device's free memory (`cudaMemGetInfo`).
    """
    import torch

    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    import psutil

    return int(psutil.virtual_memory().available)


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


def size_change(before: int, after: int, baseline: str, what: str = "") -> str:
    """One size against another in one stated baseline, e.g. "quantized linears 1.60 MB (bf16) → 417.41 KB =
    26 % of bf16": the percentage is `after / before`, so the numbers shown divide to it."""
    share = f"{100 * after / before:.0f} %" if before else "n/a"
    return f"{what + ' ' if what else ''}{human(before)} ({baseline}) → {human(after)} = {share} of {baseline}"


def quantized_sizes(summary: dict, held_dtype) -> list[str]:
    """The size lines of a quantization summary (`quant.pipeline.summarize`), for every face that shows them.

    Packed linears are compared with the same linears at bf16, the usual reference whatever the model was held
    in; the whole model with itself as held (`held_dtype`, e.g. torch.float32), since the layers left
    unquantized stay at that dtype after quantization too.
    """
    held = str(held_dtype).removeprefix("torch.")
    return [size_change(summary["linear_bytes_bf16"], summary["linear_bytes_after"], "bf16", "quantized linears"),
            size_change(summary["model_bytes_before"], summary["model_bytes_after"], held, "whole model")]


def largest_part(parts: dict[str, int]) -> str:
    """Which part of an estimate dominates, in words: "mostly Hessians and solver, 1.36 GB"."""
    name = max(parts, key=parts.get)
    return f"mostly {name}, {human(parts[name])}"


def fit(needed: int, free: int) -> str:
    """How `needed` bytes sit in `free` memory: "fits" (under half of it), "tight" (under HEADROOM) or "won't fit"."""
    if needed <= 0.5 * free:
        return "fits"
    return "tight" if needed <= HEADROOM * free else "won't fit"


def preflight(what: str, needed: dict[str, int], device="cpu", *, force: bool = False,
              available: int | None = None) -> int:
    """Refuse `what` when the parts of `needed` (name -> bytes) exceed the free memory, unless forced.

    Returns the total estimate. The error lists every part, so the user sees what to change.
    """
    total = sum(needed.values())
    free = available_bytes(device) if available is None else available
    if total > free * HEADROOM and not force:
        parts = ", ".join(f"{name} {human(b)}" for name, b in needed.items())
        where = "VRAM" if str(device).startswith("cuda") else "RAM"
        raise InsufficientMemoryError(
            f"{what} needs about {human(total)} ({parts}) but only {human(free)} of {where} is free; "
            "close other programs, pick fewer bits or a smaller model.", total, free)
    return total


class RunPeak:
    """The peak resident memory of one run, for a chart that starts fresh per run.

    The process's high-water mark (`peak_rss_bytes`) never goes down, so on its own it would carry an earlier
    run's peak into this one. Once this run has raised the mark, the mark is this run's exact peak (it caught
    the spikes between samples too); until then, the best known is the largest sample this run has seen.
    """

    def __init__(self) -> None:
        self._mark_at_start = peak_rss_bytes()
        self.peak = 0

    def sample(self, rss: int) -> int:
        """The run's peak so far, given the RSS just sampled."""
        mark = peak_rss_bytes()
        self.peak = max(self.peak, rss, mark if mark > self._mark_at_start else 0)
        return self.peak


class MemorySampler:
    """Samples RSS, peak RSS and CUDA memory every `interval` seconds on a daemon thread.

    Use as a context manager; `drain()` returns the samples taken since the last call (jobs yield
    them as events between layers), `on_sample` is called from the sampler thread for live charts.
    """

    def __init__(self, interval: float = 0.2, on_sample=None) -> None:
        self.interval, self.on_sample = interval, on_sample
        self._samples: deque[MemorySample] = deque(maxlen=10_000)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="memory-sampler", daemon=True)
        self._start = time.perf_counter()
        self.peak = 0
        self.latest: MemorySample | None = None

    def __enter__(self) -> MemorySampler:
        self._start = time.perf_counter()
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    def sample(self) -> MemorySample:
        import torch

        rss = rss_bytes()
        self.peak = max(self.peak, rss)
        cuda = torch.cuda.memory_allocated() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        s = MemorySample(round(time.perf_counter() - self._start, 3), rss, self.peak, cuda)
        self.latest = s
        self._samples.append(s)
        if self.on_sample is not None:
            self.on_sample(s)
        return s

    def drain(self) -> list[MemorySample]:
        out = []
        while self._samples:
            out.append(self._samples.popleft())
        return out

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()
