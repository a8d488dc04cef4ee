"""A comparison's or a study's report on disk: report.json (everything), report.csv (the rows) and report.html
(self-contained: tables, the study's grid and the plots inline as SVG, so it opens anywhere, offline).

The cell texts and the plots are made here once: the CLI prints `row_cells`, the HTML lays them out, and the
GUI's Compare page shows the same `charts`, so no face words or draws a number its own way.
"""

from __future__ import annotations

import csv
import html
import io
import json
import math
from pathlib import Path

from dllm_studio import plots
from dllm_studio.errors import ReportError
from dllm_studio.files import atomic_write_text
from dllm_studio.memory import human

FILES = ("report.json", "report.csv", "report.html")
MINUS = "\u2212"  # a real minus sign: "-2.1" reads as a hyphenated fragment in proportional fonts
ROW_FIELDS = ("model", "suite", "metric", "items", "score", "score_low", "score_high", "relative_drop", "drop_low",
              "drop_high", "absolute_drop", "absolute_drop_low", "absolute_drop_high", "p_value", "test", "band", "verdict", "agreement", "flipped_items", "first_flip_mean",
              "ms_per_step", "forward_passes_per_answer", "forward_equivalents_per_answer", "wall_s_per_answer",
              "tokens_per_step", "peak_rss_bytes", "weight_bytes", "bits_per_weight", "bits_per_parameter", "kernels")
TABLE_HEADER = ("model", "suite", "items", "score [95 % CI]", "change [95 % CI]", "points", "verdict", "agree",
                "flipped",
                "ms/step", "passes/answer", "s/answer", "tokens/step", "peak RSS", "weights", "bits/w", "kernels")


# ---- words ----------------------------------------------------------------------------------------------

def score_text(row: dict) -> str:
    if row["score"] is None:
        return "—"
    if row["metric"] == "nll_per_token":
        return f"{row['score']:.3f} nats/token"
    return f"{100 * row['score']:.1f} % [{100 * row['score_low']:.1f}–{100 * row['score_high']:.1f}]"


def change_text(row: dict) -> str:
    """The relative drop shown as the change in quality, so a drop reads as negative (and 0 as +0.0)."""
    if row["relative_drop"] is None:
        return "—" if row["verdict"] == "baseline" else "n/a"
    text = f"{0.0 - 100 * row['relative_drop']:+.1f} %"
    if row["drop_low"] is not None:  # the change's interval is the drop's, mirrored
        text += f" [{0.0 - 100 * row['drop_high']:+.1f}, {0.0 - 100 * row['drop_low']:+.1f}]"
    return text.replace("-", MINUS)


def points_text(row: dict) -> str:
    """The absolute change: accuracy points ("−2.4 pts [−5.1, +0.3]"), or nats per token for the text suite."""
    if row["absolute_drop"] is None:
        return "—"
    scale, unit = (1, " nats") if row["metric"] == "nll_per_token" else (100, " pts")
    text = f"{0.0 - scale * row['absolute_drop']:+.{3 if scale == 1 else 1}f}{unit}"
    if row["absolute_drop_low"] is not None:
        text += f" [{0.0 - scale * row['absolute_drop_high']:+.1f}, {0.0 - scale * row['absolute_drop_low']:+.1f}]"
    return text.replace("-", MINUS)


def _number(value, spec: str, suffix: str = "") -> str:
    return "—" if value is None else f"{value:{spec}}{suffix}"


def row_cells(row: dict) -> tuple[str, ...]:
    """One row in words, column by column as TABLE_HEADER names them."""
    flipped = "—" if row["flipped_items"] is None else f"{row['flipped_items']}/{row['items']}"
    return (row["model"], row["suite"], str(row["items"]), score_text(row), change_text(row), points_text(row),
            row["verdict"],
            _number(row["agreement"] and 100 * row["agreement"], ".0f", " %"), flipped,
            _number(row["ms_per_step"], ".1f"), _number(row["forward_passes_per_answer"], ".1f"),
            _number(row["wall_s_per_answer"], ".2f"), _number(row["tokens_per_step"], ".2f"),
            human(row["peak_rss_bytes"]), human(row["weight_bytes"]), _number(row["bits_per_weight"], ".2f"),
            kernel_text(row["kernels"]) or "—")


def kernel_text(counts: dict[str, int]) -> str:
    """{'int4': 24, 'dequant': 4} -> 'int4 ×24; dequant ×4', the most used first."""
    return "; ".join(f"{name} ×{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


def text_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    """Columns padded to their widest cell: what the CLI prints."""
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (header, *rows))


def study_grid(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """The seed study's layout: a row per method within each bit-width setting, a column per task category;
    a cell is the accuracy, its relative change and its interval (the verdict's band where it is significant)."""
    suites = report["suites"]
    by_cell = {(r["model"], r["suite"]): r for r in report["rows"]}
    lines = [("setting", "method", *suites)]
    base = report["base"]
    lines.append(("full precision", base, *(_grid_cell(by_cell.get((base, s))) for s in suites)))
    for cell in report.get("cells", []):
        if cell["status"] == "skipped":
            continue
        lines.append((cell["setting"], cell["method"], *(_grid_cell(by_cell.get((cell["label"], s))) for s in suites)))
    return lines[0], lines[1:]


def study_sizes(report: dict) -> tuple[tuple[str, ...], list[tuple[str, ...]]]:
    """Beside the grid, each of its models' weights as stored (what a memory budget bounds) and bits per
    quantized weight, so a cell planned to a budget reads against the uniform ones at the same bytes; a planned
    cell also counts its layers per bit-width. A row per model that has run, in the grid's order."""
    entries = {m["label"]: m for m in report["models"]}
    lines = [("full precision", report["base"], report["base"])]
    lines += [(c["setting"], c["method"], c["label"]) for c in report.get("cells", []) if c["status"] != "skipped"]
    rows = []
    for setting, method, label in lines:
        entry = entries.get(label)
        if entry is None:
            continue
        plan = entry.get("bit_plan")
        layers = ", ".join(f"{n} at {bits}" for bits, n in plan["layers_at_bits"].items()) if plan else "—"
        rows.append((setting, method, human(entry["stored_bytes"]) if entry.get("stored_bytes") else "—",
                     _number(entry["bits_per_weight"], ".3f"), layers))
    return ("setting", "method", "weights stored", "bits/w", "layers at bits"), rows


def _grid_cell(row: dict | None) -> str:
    if row is None:
        return "…"  # not run yet (an interrupted study)
    if row["metric"] == "nll_per_token":
        value = f"{row['score']:.3f}"
    else:
        value = f"{100 * row['score']:.1f} [{100 * row['score_low']:.0f}–{100 * row['score_high']:.0f}]"
    if row["relative_drop"] is None:
        return value
    change = f"{0.0 - 100 * row['relative_drop']:+.1f} %".replace("-", MINUS)
    return f"{value} ({change}{', ' + row['band'] if row['band'] else ''})"


# ---- plots ---------------------------------------------------------------------------------------------

def charts(report: dict) -> dict[str, str]:
    """The report's plots as SVG, by title: the HTML inlines them, the Compare page draws them."""
    rows, models = report["rows"], report["models"]
    answer_suites = [s for s in report["suites"] if any(r["suite"] == s and r["metric"] == "accuracy" for r in rows)]
    by = {(r["model"], r["suite"]): r for r in rows}
    labels = list(dict.fromkeys(r["model"] for r in rows))  # the rows alone draw a run still going
    size = {r["model"]: r["weight_bytes"] for r in rows}
    out = {}

    def accuracy(label, suite):
        row = by.get((label, suite))
        return None if row is None else 100 * row["score"]

    def interval(label, suite):
        row = by.get((label, suite))
        return None if row is None else (100 * row["score_low"], 100 * row["score_high"])

    cells = [c for c in report.get("cells", []) if c["status"] != "skipped"]
    if answer_suites and labels and cells:  # a study: per category, a group per setting, a bar per method
        settings = list(dict.fromkeys(c["setting"] for c in cells))
        methods = list(dict.fromkeys(c["method"] for c in cells))
        for suite in answer_suites:
            label = {(c["setting"], c["method"]): c["label"] for c in cells}
            series = {m: [accuracy(label.get((st, m)), suite) for st in settings] for m in methods}
            errors = {m: [interval(label.get((st, m)), suite) for st in settings] for m in methods}
            base = accuracy(report["base"], suite)
            reference = "" if base is None else f"; full precision {base:.1f} %"
            out[f"{suite} by setting"] = plots.bars(
                f"{suite} accuracy by setting and method (95 % intervals{reference}; a gap: a setting it does not make)",
                settings, series, y_label="accuracy (%)", y_max=100, errors=errors, width=960, missing="")
    elif answer_suites and labels:  # a group per category, a bar per model
        series = {m: [accuracy(m, s) for s in answer_suites] for m in labels}
        errors = {m: [interval(m, s) for s in answer_suites] for m in labels}
        out["Accuracy per category"] = plots.bars("Accuracy per category (95 % intervals)", answer_suites, series,
                                                  y_label="accuracy (%)", y_max=100, errors=errors)
    if answer_suites and labels:
        mean_acc, mean_ms = [], []
        for m in labels:
            scores = [accuracy(m, s) for s in answer_suites]
            if all(v is not None for v in scores):
                mean_acc.append((m, size[m], math.fsum(scores) / len(scores)))
            ms = [by[(m, s)]["ms_per_step"] for s in answer_suites if (m, s) in by and by[(m, s)]["ms_per_step"]]
            if ms:
                mean_ms.append((m, size[m], math.fsum(ms) / len(ms)))
        over = ", ".join(answer_suites)
        out["Accuracy vs size"] = plots.scatter(f"Mean accuracy over {over} vs weight bytes (Pareto front)", mean_acc,
                                                x_label="weights held (bytes)", y_label="mean accuracy (%)",
                                                log_x=True, front=True, x_format=human,
                                                front_labels_only=len(mean_acc) > 6)
        out["Latency vs size"] = plots.scatter(f"Time per denoising step vs weight bytes ({over})", mean_ms,
                                               x_label="weights held (bytes)", y_label="ms per step", log_x=True,
                                               x_format=human)
    profiled = [m for m in models if m["layers"]]
    if cells:  # a study's many models: the layers of its last setting (the sweep's hardest, as it is ordered)
        last = {c["label"] for c in cells if c["setting"] == cells[-1]["setting"]}
        profiled = [m for m in profiled if m["label"] in last]
    if profiled:
        names = [layer["name"] for layer in profiled[0]["layers"]]
        short = [_short(n) for n in names]

        def per_layer(key):
            series = {}
            for m in profiled:
                values = {layer["name"]: layer.get(key) for layer in m["layers"]}
                series[m["label"]] = [values.get(n) for n in names]
            return series

        out["Layer outliers"] = plots.lines("Activation outlier ratio per layer (max / median channel |x|)", short,
                                            per_layer("outlier_ratio"), y_label="max / median", log_y=True)
        out["Layer error"] = plots.lines("Quantization error per layer (relative output error on calibration inputs)",
                                         short, per_layer("relative_error"), y_label="relative error")
    return out


def _short(name: str) -> str:
    """'model.transformer.blocks.3.q_proj' -> '3.q_proj': the block and the linear are what tell layers apart."""
    parts = name.split(".")
    numbered = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[numbered[-1]:]) if numbered else parts[-1]


# ---- files ---------------------------------------------------------------------------------------------

def write_report(report: dict, folder: str | Path) -> list[Path]:
    """Write report.json, report.csv and report.html into `folder` (created if need be), each all or nothing."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        from dllm_studio.errors import WriteError
        from dllm_studio.files import describe

        raise WriteError(f"Cannot create the report folder {folder}: {describe(exc)}.") from None
    table = io.StringIO()
    writer = csv.DictWriter(table, fieldnames=ROW_FIELDS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows({**row, "kernels": kernel_text(row["kernels"])} for row in report["rows"])
    texts = {"report.json": json.dumps(report, indent=1, ensure_ascii=False) + "\n", "report.csv": table.getvalue(),
             "report.html": to_html(report)}
    for name, text in texts.items():
        atomic_write_text(folder / name, text)
    return [folder / name for name in FILES]


def read_report(path: str | Path) -> dict:
    """The report in `path` (its folder or its report.json), checked enough to be drawn."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    try:
        report = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ReportError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except ValueError as exc:
        raise ReportError(f"{path} is not a dLLM Studio report (not JSON: {exc}).") from None
    if not isinstance(report, dict) or report.get("kind") not in ("compare", "study"):
        raise ReportError(f"{path} is not a dLLM Studio report (no compare or study kind).")
    from dllm_studio.compare import REPORT_VERSION

    if not isinstance(report.get("version"), int) or report["version"] > REPORT_VERSION:
        raise ReportError(f"{path} was written by a newer dLLM Studio (report version {report.get('version')}).")
    missing = [key for key in ("base", "suites", "models", "rows") if key not in report]
    missing += sorted({f for row in report.get("rows", []) for f in ROW_FIELDS if f not in row})
    if missing:
        raise ReportError(f"{path} is not a complete dLLM Studio report (missing {', '.join(missing)}).")
    return report


def to_html(report: dict) -> str:
    """The report as one self-contained HTML page."""
    e = html.escape
    title = "dLLM Studio study" if report["kind"] == "study" else "dLLM Studio comparison"
    parts = [f"<!doctype html><html lang='en'><head><meta charset='utf-8'><title>{e(title)}: {e(report['base'])}</title>",
             "<style>body{font:14px/1.4 system-ui,sans-serif;margin:2em;max-width:1200px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 6px;text-align:right}"
             "td:first-child,th:first-child,td:nth-child(2){text-align:left}th{background:#f3f3f3}"
             ".significant{background:#fbd3c4}.moderate{background:#fdeeb8}.negligible{background:#d8efd3}"
             "figure{margin:1em 0}svg{max-width:100%;height:auto}details{margin:.5em 0}</style></head><body>",
             f"<h1>{e(title)}</h1>", f"<p>Base: <b>{e(report['base'])}</b>. Suites: {e(', '.join(report['suites']))} "
             f"({e(report['split'])} split{', first ' + str(report['limit']) + ' items' if report['limit'] else ''}). "
             f"{e(report.get('machine', ''))}</p>",
             "<p>Scores are accuracy with 95 % Wilson intervals (the text suite: masked-diffusion NLL per token, lower "
             "is better). Changes are relative to the base with Newcombe's paired 95 % interval; the seed study's band "
             "(under 1 % negligible, 1–4 % moderate, over 4 % significant) is named only where an exact paired test "
             "gives p &lt; 0.05. Agreement: items answered identically. Flipped: items where, teacher-forced on the "
             "base's trajectory, the model would commit another token or position at some step.</p>"]
    if report["kind"] == "study":
        header, grid = study_grid(report)
        parts.append("<h2>Accuracy by bit-width, method and category</h2>" + _html_table(header, grid, report))
        header, sizes = study_sizes(report)
        parts.append("<h2>Weights stored per model</h2>" + _html_table(header, sizes))
        skipped = [c for c in report.get("cells", []) if c["status"] == "skipped"]
        if skipped:
            parts.append("<details><summary>Skipped settings</summary><ul>" + "".join(
                f"<li>{e(c['label'])}: {e(c['reason'])}</li>" for c in skipped) + "</ul></details>")
    parts.append("<h2>Every model on every suite</h2>" + _html_table(TABLE_HEADER, [row_cells(r) for r in report["rows"]]))
    for name, svg in charts(report).items():
        parts.append(f"<figure><figcaption><b>{e(name)}</b></figcaption>{svg}</figure>")
    parts += _html_items(report)
    parts += [f"<p>{e(note)}</p>" for note in report.get("notes", [])]
    parts.append(f"<details><summary>Sampler settings per suite</summary><pre>"
                 f"{e(json.dumps(report.get('settings', {}), indent=1))}</pre></details></body></html>")
    return "\n".join(parts) + "\n"


def _html_table(header, rows, report: dict | None = None) -> str:
    e = html.escape
    bands = {}
    if report is not None:  # the study grid: a cell's colour is its band, where the items support one
        for r in report["rows"]:
            bands[(r["model"], r["suite"])] = r["band"]
    out = ["<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = []
        for i, cell in enumerate(row):
            band = bands.get((_label_of(row, report), header[i])) if report is not None and i >= 2 else ""
            cells.append(f"<td class='{band}'>{e(cell)}</td>" if band else f"<td>{e(cell)}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "".join(out) + "</table>"


def _label_of(grid_row: tuple, report: dict) -> str:
    setting, method = grid_row[0], grid_row[1]
    cell = next((c for c in report.get("cells", []) if c["setting"] == setting and c["method"] == method), None)
    return cell["label"] if cell else method


def _html_items(report: dict) -> list[str]:
    """Per suite, the items whose answers differ between models, with each model's first decision flip."""
    e = html.escape
    out = []
    for suite, items in report.get("items", {}).items():
        differing = [i for i in items if len({a["text"] for a in i["answers"].values()}) > 1]
        if not differing:
            continue
        labels = list(differing[0]["answers"])
        rows = []
        for item in differing:
            cells = [item["id"], item["expected"]]
            for label in labels:
                answer = item["answers"].get(label, {})
                flip = item.get("flips", {}).get(label)
                mark = "✓" if answer.get("correct") else "✗"
                first = f" (first flip: step {flip['first_flip']})" if flip and flip["first_flip"] else ""
                cells.append(f"{mark} {answer.get('text', '')}{first}")
            rows.append(tuple(cells))
        out.append(f"<details><summary>{e(suite)}: {len(differing)} of {len(items)} items answered differently"
                   f"</summary>{_html_table(('item', 'expected', *labels), rows)}</details>")
    return out
