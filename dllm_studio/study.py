"""The study: every valid method × bit-width quantized from one model, each evaluated on the same suites, laid out
as the seed study (arXiv:2508.14896) lays its tables out.

`study` is an event-stream job. For each cell it quantizes the base (the pipeline's own job), evaluates every
suite, and turns each result into a comparison row against the base (`compare.suite_row`, so a study row and a
`compare` row are the same thing). Settings a method cannot produce are skipped with the recipe's own reason.

Every (model, recipe, suite, sampler) result is cached as JSON under the report folder as soon as it exists, and
the report is rewritten after every suite: an interrupted study keeps its finished cells and a rerun resumes
where it stopped, skipping the quantizing of a cell whose suites are all cached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dllm_studio.checkpoint import folder_fingerprint
from dllm_studio.compare import (Candidate, SuiteCompared, checked_suites, machine, model_entry, new_report,
                                 suite_row)
from dllm_studio.errors import DllmError, InvalidSettingsError, WriteError
from dllm_studio.eval.runner import EvalResult, evaluate, suite_config
from dllm_studio.eval.suites import Suite
from dllm_studio.events import CancelToken, Event
from dllm_studio.files import atomic_write_text, describe
from dllm_studio.memory import MemorySampler

if TYPE_CHECKING:
    from dllm_studio.models.base import DiffusionLM

CACHE = "cells"  # the report folder's subfolder of cached results


@dataclass(frozen=True)
class StudyProgress(Event):
    """Cell `cell` (1-based) of `cells` starts (`stage` "running") or is passed over ("skipped": the method cannot
    produce the setting; the cell's "reason" in the report says why)."""

    cell: int
    cells: int
    label: str
    stage: str
    elapsed_s: float
    eta_s: float | None  # over the whole sweep; None until a cell has been computed


def parse_setting(text: str) -> tuple[int, int]:
    """'w4a16' or 'W4' -> (4, 16); 'w8a8' -> (8, 8)."""
    match = re.fullmatch(r"w(\d+)(?:a(\d+))?", text.strip().lower())
    if not match:
        raise InvalidSettingsError(f"A bit-width setting reads like w4a16 or w8a8, not {text!r}.")
    return int(match.group(1)), int(match.group(2) or 16)


def plan(methods: Sequence[str], settings: Sequence[tuple[int, int]], recipe: dict | None = None) -> list[dict]:
    """The sweep's cells, setting by setting then method by method; a setting the method cannot produce (or
    whose library is missing here) is a skipped cell with the reason."""
    from dllm_studio.quant import runtimes
    from dllm_studio.quant.methods import METHODS
    from dllm_studio.quant.recipe import QuantRecipe

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidSettingsError(f"Unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    cells = []
    for wbits, abits in settings:
        for method in methods:
            setting = f"W{wbits}A{abits}"
            cell = {"setting": setting, "method": method.upper(), "label": f"{method.upper()} {setting}",
                    "status": "pending", "reason": "", "recipe": None}
            try:
                made = QuantRecipe(method=method, wbits=wbits, abits=abits, **(recipe or {})).validate()
                missing = runtimes.unavailable(method) if method in runtimes.METHODS else None
                if missing:
                    raise InvalidSettingsError(missing)
                cell["recipe"] = made.to_dict()
            except DllmError as exc:
                cell.update(status="skipped", reason=str(exc))
            cells.append(cell)
    return cells


def study(base: Candidate, methods: Sequence[str], settings: Sequence[tuple[int, int]],
          suites: Sequence[str | Path | Suite], folder: str | Path, *, limit: int | None = None,
          overrides: dict | None = None, split: str = "test", recipe: dict | None = None,
          cancel: CancelToken | None = None, unsafe_code_eval: bool = False) -> Generator[Event, None, dict]:
    """Run the sweep, writing the report into `folder` as it goes; returns the final report.

    Yields a `StudyProgress` per cell stage, the quantizer's and the evaluations' own events, and a
    `SuiteCompared` row per finished (model, suite)."""
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe
    from dllm_studio.report import write_report

    cells = plan(methods, settings, recipe)
    if not any(c["status"] == "pending" for c in cells):
        raise InvalidSettingsError("No method can produce any of these settings: " +
                                   "; ".join(f"{c['label']}: {c['reason']}" for c in cells))
    loaded = checked_suites(suites, split, overrides)
    folder = Path(folder)
    try:
        (folder / CACHE).mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # before the model loads: a bad folder should not cost a load
        raise WriteError(f"Cannot use {folder} for the study's report: {describe(exc)}.") from None
    model = base.open()
    if model.mask_token_id is None:  # the text suite's likelihood needs a mask token
        loaded = [s for s in loaded if s.name != "text"]
    fingerprint, base_parameters = _fingerprint(model), model.num_parameters()
    started = time.perf_counter()
    report = {**new_report("study", base.label, split=split, limit=limit, overrides=overrides,
                           suites=[s.label for s in loaded]), "cells": cells, "machine": machine(model.device)}
    base_results: dict[str, EvalResult] = {}

    def run_cell(label: str, recipe_dict: dict | None) -> Generator[Event, None, bool]:
        """Every suite's row for one model (the base, or the base quantized by `recipe_dict`), from the cache
        or computed now (then cached); True when anything was computed."""
        paths = {s.label: folder / CACHE / _cache_name(label, s, fingerprint, recipe_dict, split, limit, overrides)
                 for s in loaded}
        cached = {name: _read_cache(path) for name, path in paths.items()}
        subject, profile = model, None
        if recipe_dict is not None and any(c is None for c in cached.values()):
            made = QuantRecipe(**{**recipe_dict, "skip": tuple(recipe_dict["skip"])})
            done = yield from quantize(model, made, cancel)
            subject, profile = done.model, {"summary": done.summary, "layers": done.layers}
        entry = model_entry(Candidate(label, profile=profile), subject, base_parameters)
        with MemorySampler() as memory:
            for suite in loaded:
                saved = cached[suite.label]
                if saved is None:
                    result = yield from evaluate(subject, suite, overrides, limit, cancel, unsafe_code_eval)
                    saved = {"result": result.to_dict(), "entry": entry, "peak_rss_bytes": memory.peak}
                    atomic_write_text(paths[suite.label], json.dumps(saved) + "\n")
                result = EvalResult.from_dict(saved["result"])
                if recipe_dict is None:
                    base_results[suite.label] = result
                row = suite_row(suite.label, label, result, base_results.get(suite.label) if recipe_dict else None,
                                saved["entry"], saved["peak_rss_bytes"])
                report["rows"].append(row)
                report["settings"].setdefault(suite.label, result.settings)
                if not any(m["label"] == label for m in report["models"]):
                    report["models"].append(saved["entry"])
                write_report(_finished(report, started), folder)  # an interruption keeps every finished row
                yield SuiteCompared(row)
        return any(c is None for c in cached.values())

    yield from run_cell(base.label, None)  # the base first: every row is read against it
    computed, computed_s = 0, 0.0
    for number, cell in enumerate(cells, 1):
        remaining = sum(c["status"] == "pending" for c in cells)
        eta = computed_s / computed * remaining if computed else None
        yield StudyProgress(number, len(cells), cell["label"],
                            "skipped" if cell["status"] == "skipped" else "running", time.perf_counter() - started, eta)
        if cell["status"] == "skipped":
            continue
        t0 = time.perf_counter()
        if (yield from run_cell(cell["label"], cell["recipe"])):  # cached cells cost nothing: not in the ETA
            computed, computed_s = computed + 1, computed_s + time.perf_counter() - t0
        cell["status"] = "done"
    final = _finished(report, started)
    write_report(final, folder)
    return final


def _finished(report: dict, started: float) -> dict:
    return {**report, "seconds": round(time.perf_counter() - started, 2)}


def _fingerprint(model: DiffusionLM) -> str:
    """What identifies the base model's files: names, sizes and modification times (a retrained or replaced
    model gets new cache entries; reading gigabytes of weights to hash them would cost more than a cell)."""
    return json.dumps([str(model.source), str(model.dtype), folder_fingerprint(Path(model.path))])


def _cache_name(label: str, suite: Suite, fingerprint: str, recipe: dict | None, split: str, limit: int | None,
                overrides: dict | None) -> str:
    config = dataclasses.asdict(suite_config(suite.name, overrides))
    key = json.dumps({"model": fingerprint, "recipe": recipe, "suite": str(suite.path), "items": suite.items[:limit],
                      "split": split, "limit": limit, "sampler": config}, sort_keys=True, default=str)
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    return f"{re.sub(r'[^a-z0-9]+', '-', label.lower()).strip('-')}-{suite.label}-{digest}.json"


def _read_cache(path: Path) -> dict | None:
    """A cached result, or None when there is none (or it is unreadable: then it is simply computed again)."""
    try:
        cached = json.loads(path.read_text(encoding="utf-8"))
        EvalResult.from_dict(cached["result"])
        return cached if {"entry", "peak_rss_bytes"} <= cached.keys() else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
