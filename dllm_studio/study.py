"""The study: every valid method × bit-width quantized from one model, each evaluated on the same suites, laid out
as the seed study (arXiv:2508.14896) lays its tables out.

`study` is an event-stream job. For each cell it quantizes the base (the pipeline's own job), evaluates every
suite, and turns each result into a comparison row against the base (`compare.suite_row`, so a study row and a
`compare` row are the same thing). Settings a method cannot produce are skipped with the recipe's own reason.

A setting may carry a mixed-precision budget (`w4a16@3.25`: stored bits per quantized weight; `w4a16@1.2MB`: the
whole model's weights as stored): the cell's layers are planned to it (`quant.budget`, up to the setting's bits)
before quantizing, so a budgeted model sits in the tables beside the uniform ones, with the bytes each stores.

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
from collections import Counter
from collections.abc import Generator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from dllm_studio.checkpoint import folder_fingerprint
from dllm_studio.compare import (Candidate, SuiteCompared, checked_suites, machine, model_entry, new_report,
                                 suite_row)
from dllm_studio.errors import DllmError, ExportError, InvalidSettingsError, QuantizationError, WriteError
from dllm_studio.eval.runner import EvalResult, evaluate, suite_config
from dllm_studio.eval.suites import Suite
from dllm_studio.events import CancelToken, Event
from dllm_studio.files import atomic_write_text, describe
from dllm_studio.memory import MemorySampler
from dllm_studio.quant.recipe import QuantRecipe

if TYPE_CHECKING:
    from dllm_studio.models.base import DiffusionLM
    from dllm_studio.quant.budget import BitPlan

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


@dataclass(frozen=True)
class Budget:
    """What a mixed-precision cell is planned to: stored bits per quantized weight (scales and zero points
    included) or bytes of the whole model's weights as stored, as `QuantRecipe` holds them; `text` is how the
    cell's setting writes it ("3.25bpw", "1.2MB")."""

    text: str
    target_bpw: float | None = None
    memory_budget: int | None = None


# (wbits, abits), or (wbits, abits, budget) for a mixed-precision cell planned up to wbits.
Setting = tuple[int, int] | tuple[int, int, Budget]


def parse_setting(text: str) -> Setting:
    """'w4a16' or 'W4' -> (4, 16); 'w8a8' -> (8, 8); 'w4a16@3.25' -> (4, 16, 3.25 bits per weight);
    'w4a16@1.2MB' -> (4, 16, 1.2 MB of weights)."""
    match = re.fullmatch(r"w(\d+)(?:a(\d+))?(?:\s*@(.*))?", text.strip(), re.IGNORECASE)
    if not match:
        raise InvalidSettingsError(f"A bit-width setting reads like w4a16 or w8a8, not {text!r}.")
    bits = int(match.group(1)), int(match.group(2) or 16)
    return bits if match.group(3) is None else (*bits, parse_budget(match.group(3)))


def parse_budget(text: str) -> Budget:
    """What follows a setting's '@': a number (optionally 'bpw') is stored bits per weight, a size with a unit
    ('1.2MB', '5GB', '2GiB', '800000B') the bytes of the whole model's weights."""
    from dllm_studio.shards import parse_size

    unclear = InvalidSettingsError(
        f"After '@' a setting takes a mixed-precision budget: stored bits per weight (w4a16@3.25) or the model's "
        f"weight bytes with a unit (w4a16@1.2MB, @5GB, @2GiB), not {text!r}.")
    bare = re.sub(r"\s+", "", text)
    parts = re.fullmatch(r"(\d+(?:\.\d*)?|\.\d+)([a-z]*)", bare, re.IGNORECASE)
    if parts is None:
        raise unclear
    amount, unit = parts.groups()
    if float(amount) <= 0:
        raise InvalidSettingsError(f"A mixed-precision budget must be positive, not {text!r}.")
    if unit.lower() in ("", "bpw"):
        return Budget(f"{float(amount):g}bpw", target_bpw=float(amount))
    try:
        size = parse_size(bare)
    except ExportError:
        raise unclear from None
    # One spelling per unit in the labels: "1.2mb" and "1.2MB" are one setting.
    return Budget(amount + unit.upper().replace("IB", "iB"), memory_budget=size)


def plan(methods: Sequence[str], settings: Sequence[Setting], recipe: dict | None = None) -> list[dict]:
    """The sweep's cells, setting by setting then method by method; a setting the method cannot produce (or
    whose library is missing here, or a budget for a method whose layers cannot each take their own bits) is a
    skipped cell with the reason."""
    from dllm_studio.quant import runtimes
    from dllm_studio.quant.methods import METHODS

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise InvalidSettingsError(f"Unknown method {', '.join(unknown)}; choose from {', '.join(METHODS)}.")
    cells = []
    for wbits, abits, *budget in settings:
        planned = {"target_bpw": budget[0].target_bpw, "memory_budget": budget[0].memory_budget} if budget else {}
        setting = f"W{wbits}A{abits}" + (f"@{budget[0].text}" if budget else "")
        for method in methods:
            cell = {"setting": setting, "method": method.upper(), "label": f"{method.upper()} {setting}",
                    "status": "pending", "reason": "", "recipe": None}
            try:
                fields = {"method": method, "wbits": wbits, "abits": abits, **(recipe or {}), **planned}
                made = QuantRecipe(**fields).validate()  # a budget: refused where layers cannot mix bits
                missing = runtimes.unavailable(method) if method in runtimes.METHODS else None
                if missing:
                    raise InvalidSettingsError(missing)
                cell["recipe"] = made.to_dict()
            except DllmError as exc:
                cell.update(status="skipped", reason=str(exc))
            cells.append(cell)
    return cells


def study(base: Candidate, methods: Sequence[str], settings: Sequence[Setting],
          suites: Sequence[str | Path | Suite], folder: str | Path, *, limit: int | None = None,
          overrides: dict | None = None, split: str = "test", recipe: dict | None = None,
          cancel: CancelToken | None = None, unsafe_code_eval: bool = False) -> Generator[Event, None, dict]:
    """Run the sweep, writing the report into `folder` as it goes; returns the final report.

    Yields a `StudyProgress` per cell stage, the quantizer's and the evaluations' own events, and a
    `SuiteCompared` row per finished (model, suite)."""
    from dllm_studio.quant.budget import budget_plan
    from dllm_studio.quant.pipeline import quantize
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
    _skip_unreachable_budgets(model, cells)
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
        subject, profile, bit_plan = model, None, None
        if recipe_dict is not None and any(c is None for c in cached.values()):
            made = QuantRecipe.from_dict(recipe_dict)
            if made.memory_budget is not None or made.target_bpw is not None:
                # The cache is keyed on this recipe as unplanned: its plan is a function of the model, the
                # recipe and its calibration, all in the key, so a cached cell needs neither planning nor quantizing.
                bit_plan = yield from budget_plan(model, made, cancel)
                made = bit_plan.apply(made)
            done = yield from quantize(model, made, cancel)
            subject, profile = done.model, {"summary": done.summary, "layers": done.layers}
        entry = _with_sizes(model_entry(Candidate(label, profile=profile), subject, base_parameters), profile, bit_plan)
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


def _skip_unreachable_budgets(model: DiffusionLM, cells: list[dict]) -> None:
    """Mark skipped, with the planner's reason, each budget cell whose budget cannot hold this model even with
    every layer at its fewest bits: known from the sizes alone, before any cell runs."""
    from dllm_studio.quant.budget import reachable_sizes

    for cell in cells:
        recipe = cell["recipe"]
        if cell["status"] == "pending" and ("memory_budget" in recipe or "target_bpw" in recipe):
            try:
                reachable_sizes(model, QuantRecipe.from_dict(recipe))
            except QuantizationError as exc:
                cell.update(status="skipped", reason=str(exc))


def _with_sizes(entry: dict, profile: dict | None, bit_plan: BitPlan | None) -> dict:
    """A model's report entry with the bytes its weights take as stored (the bound of a memory budget; the
    held `weight_bytes` also count kernels' unpacked copies) and, for a planned cell, its plan."""
    summary = (profile or {}).get("summary")
    if summary is not None:
        stored = summary["model_bytes_before"] - summary["linear_bytes_before"] + summary["linear_bytes_after"]
    else:  # the base: held as stored, unless it is a quantized folder itself (whose kernels' copies are held too)
        stored = entry["weight_bytes"] if entry["recipe"] is None else None
    entry = {**entry, "stored_bytes": stored}
    if bit_plan is not None:
        counts = Counter(bit_plan.bits.values())
        entry["bit_plan"] = {"target_bpw": bit_plan.target_bpw, "memory_budget": bit_plan.memory_budget,
                             "layers_at_bits": {str(bits): counts[bits] for bits in sorted(counts)},
                             "stored_bytes": bit_plan.total_bytes,
                             "bits_per_weight": round(bit_plan.bits_per_weight, 4)}
    return entry


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
