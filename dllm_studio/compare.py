"""Compare: the same task suites, items, sampler settings and seeds on a base model and its quantized variants.

`compare` is an event-stream job like `evaluate`, which it runs per (model, suite): the CLI's `compare` command
and the GUI's Compare page both drive it, so the two faces cannot disagree. It yields a `CompareStage` as each
evaluation starts, the evaluation's own `EvalProgress`, and a `SuiteCompared` row as each finishes (a finished
row survives a cancel); it returns the report (`report.write_report` lays it out as JSON, CSV and HTML).

A row holds what the seed study (arXiv:2508.14896) reads, with the statistics a small suite needs: accuracy
with its 95 % Wilson interval; the relative drop against the base with Newcombe's paired interval and the
study's band only where an exact paired test tells it from zero (`eval.drop`); agreement (the share of items
answered identically); cost per answer; memory; weight bytes and bits per weight; the kernel that ran. For
answer suites every item also gets its decision flips against the base (`flips`).

Models are evaluated one after another, each loaded when its turn comes and let go after, so comparing three
variants of a large model never holds more than one of them.
"""

from __future__ import annotations

import gc
import math
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from dllm_studio.errors import InvalidSettingsError
from dllm_studio.eval.drop import compare_results
from dllm_studio.eval.runner import EvalResult, evaluate, suite_config
from dllm_studio.eval.suites import Suite, load_suite
from dllm_studio.events import CancelToken, Event
from dllm_studio.memory import MemorySampler

if TYPE_CHECKING:
    from dllm_studio.models.base import DiffusionLM

REPORT_VERSION = 1


@dataclass
class Candidate:
    """A model to compare: held already (`model`, the GUI's), or loaded when its turn comes (`load`, the CLI's)."""

    label: str
    model: DiffusionLM | None = None
    load: Callable[[], DiffusionLM] | None = None
    profile: dict | None = None  # the quantizer's {"summary", "layers"}; read from the model's folder when it has none

    def open(self) -> DiffusionLM:
        if self.model is not None:
            return self.model
        if self.load is None:
            raise InvalidSettingsError(f"{self.label}: neither a model nor a way to load one.")
        return self.load()


@dataclass(frozen=True)
class CompareStage(Event):
    """Evaluation `index` (1-based) of `total` starts: `suite` on the model labelled `model`."""

    suite: str
    model: str
    index: int
    total: int
    elapsed_s: float
    eta_s: float | None  # None until one evaluation has finished


@dataclass(frozen=True)
class SuiteCompared(Event):
    """A finished row of the comparison (`suite_row`): one model on one suite, against the base."""

    row: dict = field(default_factory=dict)


def compare(candidates: Sequence[Candidate], suites: Sequence[str | Path | Suite], *, limit: int | None = None,
            overrides: dict | None = None, split: str = "test", flips: bool = True, cancel: CancelToken | None = None,
            unsafe_code_eval: bool = False) -> Generator[Event, None, dict]:
    """Evaluate every suite on every candidate (the first is the base) and return the report.

    Suites and sampler settings are checked before any model is touched. `flips`: teacher-force each variant on
    the base's trajectory for every answered item (one more forward per step of the variant).
    """
    if len(candidates) < 2:
        raise InvalidSettingsError("Compare needs a base model and at least one variant.")
    labels = [c.label for c in candidates]
    if len(set(labels)) != len(labels):
        raise InvalidSettingsError(f"Two models share a label: {', '.join(labels)}.")
    loaded = checked_suites(suites, split, overrides)
    if limit is not None and limit < 1:
        raise InvalidSettingsError(f"limit must be at least 1, not {limit}.")

    started, total = time.perf_counter(), len(candidates) * len(loaded)
    report = new_report("compare", labels[0], split=split, limit=limit, overrides=overrides)
    base_results: dict[str, EvalResult] = {}
    base_parameters, base_masked = 0, True
    for index, candidate in enumerate(candidates):
        model = candidate.open()
        base_parameters = base_parameters or model.num_parameters()  # what bits per parameter divide by
        entry = model_entry(candidate, model, base_parameters)
        report["models"].append(entry)
        report.setdefault("machine", machine(model.device))
        # Teacher forcing hands a model masked states: a family with its own sampler (no mask token) has none.
        masked = model.mask_token_id is not None and base_masked
        if index == 0:
            base_masked = masked
        if flips and not masked:
            report["notes"].append(f"{candidate.label}: no decision flips ({model.family} models, or the base, "
                                   "denoise without mask tokens).")
        with MemorySampler() as memory:
            for n, suite in enumerate(loaded):
                done = index * len(loaded) + n
                if suite.name == "text" and model.mask_token_id is None:
                    report["notes"].append(f"{candidate.label}: no text suite ({model.family} models have no mask token).")
                    continue
                base = base_results.get(suite.label)
                if index and base is None:
                    continue  # the base could not score this suite (see notes)
                elapsed = time.perf_counter() - started
                yield CompareStage(suite.label, candidate.label, done + 1, total, elapsed,
                                   elapsed / done * (total - done) if done else None)
                keep = flips and masked and suite.name != "text"
                result = yield from evaluate(model, suite, overrides, limit, cancel, unsafe_code_eval, keep_steps=keep)
                if index == 0:
                    base_results[suite.label] = result
                _add_answers(report, suite.label, candidate.label, result)
                flipped = _add_flips(report, suite, candidate.label, model, base, result, cancel) \
                    if keep and index else None
                row = suite_row(suite.label, candidate.label, result, base, entry, memory.peak, flipped)
                report["rows"].append(row)
                report["settings"].setdefault(suite.label, result.settings)
                yield SuiteCompared(row)
        del model  # a loaded variant is let go before the next one loads
        gc.collect()
    report["suites"] = [s.label for s in loaded]
    report["seconds"] = round(time.perf_counter() - started, 2)
    return report


def new_report(kind: str, base: str, *, split: str = "test", limit: int | None = None, overrides: dict | None = None,
               suites: Sequence[str] = (), rows: Sequence[dict] = (), notes: Sequence[str] = ()) -> dict:
    """A report's skeleton ("compare" or "study"): what `report.write_report` lays out and `read_report` expects.
    A face that stopped a run early makes its report of the rows it has with it."""
    return {"version": REPORT_VERSION, "kind": kind, "base": base, "split": split, "limit": limit,
            "overrides": dict(overrides or {}), "suites": list(suites), "settings": {}, "models": [],
            "rows": list(rows), "items": {}, "notes": list(notes)}


def checked_suites(suites: Sequence[str | Path | Suite], split: str, overrides: dict | None) -> list[Suite]:
    """The suites loaded, with the sampler settings each would run and a distinct label each, or the error."""
    loaded = [s if isinstance(s, Suite) else load_suite(s, split) for s in suites]
    if not loaded:
        raise InvalidSettingsError("Choose at least one suite.")
    labels = [s.label for s in loaded]
    if len(set(labels)) != len(labels):
        raise InvalidSettingsError(f"Two suites share a name ({', '.join(labels)}); rename a suite file.")
    for suite in loaded:
        suite_config(suite.name, overrides)  # raises for settings the sampler would refuse
    return loaded


def machine(device) -> str:
    """Where the numbers were measured: timings mean nothing without it."""
    from dllm_studio.hardware import cpu_units

    return f"Measured on {cpu_units().line()}, device {device}."


def model_entry(candidate: Candidate, model: DiffusionLM, base_parameters: int | None) -> dict:
    """What the report says of one model: where it came from, how it is stored and how big it is."""
    from dllm_studio.quant.export import read_profile

    recipe = getattr(model, "quantization", None)
    profile = candidate.profile or {}
    if recipe is not None and not profile.get("summary"):  # a folder keeps its profile beside the weights
        profile = read_profile(model.path)
    weight_bytes = model.weight_bytes()
    dtype_bits = model.dtype.itemsize * 8
    summary = profile.get("summary", {})
    return {"label": candidate.label, "source": str(model.source), "family": model.family,
            "dtype": str(model.dtype).removeprefix("torch."),
            "quantization": recipe.label if recipe is not None else None,
            "recipe": recipe.to_dict() if recipe is not None else None,
            "weight_bytes": weight_bytes,
            # Of the quantized linears (the quantizer's count, scales and zeros included); the dtype's without a recipe.
            "bits_per_weight": summary.get("bits_per_weight") if recipe is not None else dtype_bits,
            # Of the whole model: every tensor's bytes over the base's parameters.
            "bits_per_parameter": round(8 * weight_bytes / base_parameters, 3) if base_parameters else dtype_bits,
            "layers": [{k: layer.get(k) for k in ("name", "role", "block", "outlier_ratio", "relative_error")}
                       for layer in profile.get("layers", [])]}


def suite_row(suite: str, label: str, result: EvalResult, base: EvalResult | None, entry: dict,
              peak_rss_bytes: int, flipped: tuple[int, float | None] | None = None) -> dict:
    """One row as plain data (what `SuiteCompared` carries, the CSV holds and the tables show).

    `score` is accuracy (a fraction) or, for the text suite, NLL per token (lower is better). `flipped`: how many
    items had a decision flip, and the mean step of their first one (`_add_flips`)."""
    text = result.accuracy is None
    row = {"suite": suite, "model": label, "metric": "nll_per_token" if text else "accuracy", "items": result.items,
           "score": result.nll_per_token if text else result.accuracy, "score_low": None, "score_high": None,
           "relative_drop": None, "drop_low": None, "drop_high": None, "absolute_drop": None,
           "absolute_drop_low": None, "absolute_drop_high": None, "p_value": None, "test": "", "band": "",
           "verdict": "baseline" if base is None else "", "agreement": None,
           "ms_per_step": result.ms_per_step, "forward_passes_per_answer": result.forward_passes_per_item,
           "forward_equivalents_per_answer": result.forward_equivalents_per_item,
           "wall_s_per_answer": result.wall_time_per_item_s, "tokens_per_step": result.tokens_per_step,
           "peak_rss_bytes": peak_rss_bytes, "weight_bytes": entry["weight_bytes"],
           "bits_per_weight": entry["bits_per_weight"], "bits_per_parameter": entry["bits_per_parameter"],
           "kernels": dict(result.kernels),  # {kernel: layer-bucket pairs} that ran the quantized layers
           "flipped_items": None if flipped is None else flipped[0],
           "first_flip_mean": None if flipped is None else flipped[1]}
    if not text:
        from dllm_studio.eval.stats import wilson

        right = sum(bool(r.correct) for r in result.records)
        row["score_low"], row["score_high"] = wilson(right, len(result.records))
    if base is None:
        return row
    stats = compare_results(base, result)
    row.update(relative_drop=stats.drop, p_value=stats.p_value, test=stats.test, band=stats.band or "",
               verdict=stats.verdict)
    if stats.drop_interval is not None:
        row["drop_low"], row["drop_high"] = stats.drop_interval
    # The drop in the metric's own units (accuracy: a fraction, shown as points; NLL: nats per token, worse > 0);
    # its interval is Newcombe's on the difference itself, before `accuracy_drop` scaled it by the base's accuracy.
    base_score = base.nll_per_token if text else base.accuracy
    if base_score is not None and row["score"] is not None:
        row["absolute_drop"] = row["score"] - base_score if text else base_score - row["score"]
        if stats.drop_interval is not None:
            row["absolute_drop_low"], row["absolute_drop_high"] = (x * base_score for x in stats.drop_interval)
    if not text:
        same = sum(a.generated == b.generated for a, b in zip(base.records, result.records))
        row["agreement"] = same / len(result.records)
    return row


def _add_answers(report: dict, suite: str, label: str, result: EvalResult) -> None:
    """Each item's answer per model, for the per-item view (the text suite: each sentence's NLL)."""
    items = report["items"].setdefault(suite, [])
    if not items:
        items.extend({"id": r.id, "prompt": r.prompt, "expected": r.expected, "answers": {}, "flips": {}}
                     for r in result.records)
    for item, record in zip(items, result.records):
        item["answers"][label] = {"text": record.generated, "correct": record.correct, "reason": record.reason,
                                  "nll_per_token": record.nll_per_token}


def _add_flips(report: dict, suite: Suite, label: str, model: DiffusionLM, base: EvalResult, result: EvalResult,
               cancel: CancelToken | None) -> tuple[int, float | None]:
    """Teacher-force `model` on every item's base trajectory, per item into the report; returns how many items
    flipped somewhere and the mean step of their first flip."""
    from dllm_studio.flips import decision_flips

    config = suite_config(suite.name, report["overrides"])
    items = {item["id"]: item for item in report["items"][suite.label]}
    firsts = []
    for ours, theirs in zip(result.records, base.records):
        flips = decision_flips(model, theirs.prompt_ids, config, theirs.trajectory, ours.trajectory, cancel)
        items[ours.id]["flips"][label] = flips.to_dict()
        if flips.first_flip is not None:
            firsts.append(flips.first_flip)
    return len(firsts), (math.fsum(firsts) / len(firsts) if firsts else None)
