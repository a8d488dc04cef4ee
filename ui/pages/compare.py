"""Compare: the same task suites on full precision and on a quantized variant, side by side.

One session job evaluates every chosen suite on both models in turn (full precision first), so a
finished suite's row appears while the next one runs and survives a cancel. The drop bands are the
seed study's (arXiv:2508.14896): under 1% negligible, 1–4% moderate, over 4% significant; the engine
(`eval.drop.compare_results`) names one only when a paired test on the same items tells the drop from zero,
and gives the 95 % intervals this page shows.
"""

from __future__ import annotations

import csv
import io
import time
from dataclasses import dataclass
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QGroupBox, QHBoxLayout, QHeaderView, QLabel,
                               QProgressBar, QPushButton, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem,
                               QVBoxLayout, QWidget)

from dllm_studio import jobs
from dllm_studio.errors import SuiteError, WriteError
from dllm_studio.eval.drop import compare_results
from dllm_studio.eval.scoring import code_runner_missing
from dllm_studio.eval.runner import EvalResult, evaluate, unisolated_code
from dllm_studio.eval.suites import SUITES, load_suite
from dllm_studio.events import EvalProgress
from dllm_studio.files import atomic_write_text
from dllm_studio.memory import size_change
from dllm_studio.speed import simulated, speed_note
from ui.charts import GroupedBars
from ui.dialogs import ask, show_error
from ui.session import Session
from ui.theme import BAND_COLORS
from ui.widgets import VariantPicker

DEFAULT_SUITES = ("qa", "math", "code")
COLUMNS = ("Suite", "Items", "Full precision", "Quantized", "Change (95 % CI)", "Verdict", "ms/step FP",
           "ms/step Q", "Weights")
DROP_COLUMN, VERDICT_COLUMN = COLUMNS.index("Change (95 % CI)"), COLUMNS.index("Verdict")
Q_MS_COLUMN, SIZE_COLUMN = COLUMNS.index("ms/step Q"), COLUMNS.index("Weights")
FIELDS = ("suite", "metric", "items", "fp", "fp_low", "fp_high", "q", "q_low", "q_high", "relative_drop",
          "drop_low", "drop_high", "p_value", "test", "band", "verdict", "ms_per_step_fp", "ms_per_step_q",
          "weight_bytes_fp", "weight_bytes_q", "kernels_q")
MINUS = "\u2212"  # a real minus sign: "-2.1" reads as a hyphenated fragment in proportional fonts


# What the job hands the page besides the engine's EvalProgress (they share the job's event channel).
@dataclass(frozen=True)
class Stage:
    suite: str
    model: str  # "full precision" or "quantized"


@dataclass(frozen=True)
class SuitePair:
    suite: str  # the row's label: a shipped suite's name or a suite file's stem
    fp: EvalResult
    q: EvalResult


def row_for(pair: SuitePair, weight_bytes_fp: int, weight_bytes_q: int) -> dict:
    """One table row as plain data: what `finished` carries and the CSV holds."""
    text = pair.fp.accuracy is None  # the text suite scores likelihood, not answers
    fp, q = (pair.fp.nll_per_token, pair.q.nll_per_token) if text else (pair.fp.accuracy, pair.q.accuracy)
    stats = compare_results(pair.fp, pair.q)
    fp_low, fp_high = stats.fp_interval or (None, None)
    q_low, q_high = stats.q_interval or (None, None)
    drop_low, drop_high = stats.drop_interval or (None, None)
    return {"suite": pair.suite, "metric": "nll_per_token" if text else "accuracy", "items": pair.fp.items,
            "fp": fp, "fp_low": fp_low, "fp_high": fp_high, "q": q, "q_low": q_low, "q_high": q_high,
            "relative_drop": stats.drop, "drop_low": drop_low, "drop_high": drop_high, "p_value": stats.p_value,
            "test": stats.test, "band": stats.band or "", "verdict": stats.verdict,
            "ms_per_step_fp": pair.fp.ms_per_step, "ms_per_step_q": pair.q.ms_per_step,
            "weight_bytes_fp": weight_bytes_fp, "weight_bytes_q": weight_bytes_q, "kernels_q": dict(pair.q.kernels)}


def _score(row: dict, which: str) -> str:
    value = row[which]
    if value is None:
        return "—"
    if row["metric"] == "nll_per_token":
        return f"{value:.3f} nats/token"
    return f"{100 * value:.1f} %\n({100 * row[which + '_low']:.1f}–{100 * row[which + '_high']:.1f})"


def _ms_q(row: dict) -> str:
    """The quantized model's step time, and on a second line its ratio to full precision (or, where its
    activation rounding is simulated, that the time says nothing of a real kernel's)."""
    fp, q = row["ms_per_step_fp"], row["ms_per_step_q"]
    if q and simulated(row["kernels_q"]):
        return f"{_ms(q)}\naccuracy-only"
    return f"{_ms(q)}\n{q / fp:.2f}× FP" if fp and q else _ms(q)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _change_text(row: dict) -> str:
    """The relative drop shown as the change in quality, so a drop reads as negative (and 0 as +0.0)."""
    if row["relative_drop"] is None:
        return "n/a"
    text = f"{0.0 - 100 * row['relative_drop']:+.1f} %"
    if row["drop_low"] is not None:  # the change's interval is the drop's, mirrored
        text += f"\n({0.0 - 100 * row['drop_high']:+.1f} to {0.0 - 100 * row['drop_low']:+.1f})"
    return text.replace("-", MINUS)


class ComparePage(QWidget):
    finished = Signal(list)  # row dicts (see row_for), one per suite, when a run completes

    def __init__(self, session: Session, settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.job = None
        self.rows: list[dict] = []
        self._weights = (0, 0)  # weight bytes of both models, read when a run starts
        self._held = ""  # the full-precision model's dtype: the baseline the weights column states
        self._stage = Stage("", "")  # which suite and model the progress events are about

        # ---- what to compare ----
        self.variant = VariantPicker(session, objectName="compareVariant")
        self.variant.setMinimumContentsLength(16)
        self.variant.setAccessibleName("Quantized variant")
        self.hint = QLabel(wordWrap=True, objectName="compareHint")
        self.suite_row = QHBoxLayout()
        self.suite_boxes: dict[str, QCheckBox] = {}  # key: a shipped suite's name or a suite file's path
        self._sources: dict[str, str | Path] = {}
        for name in SUITES:
            self._add_suite_box(name, name, name, checked=name in DEFAULT_SUITES)
        self.add_suite_button = QPushButton("Add suite file…", objectName="compareAddSuite")
        self.add_suite_button.setToolTip("A JSONL file of qa, math, code or text items in the shipped suites' format.")
        self.limit = QSpinBox(minimum=0, maximum=100_000, value=20, objectName="compareLimit")
        self.limit.setSpecialValueText("all")  # shown at 0
        self.limit.setToolTip("The first N items of each suite; 0 runs them all.")
        self.run_button = QPushButton("&Run", objectName="compareRun")
        self.cancel_button = QPushButton("Cancel", objectName="compareCancel", enabled=False)
        self.cancel_button.setToolTip("Stop after the current step; suites already finished stay in the table.")
        self.progress = QProgressBar(objectName="compareProgress", textVisible=True)
        self.progress.setFormat("")
        self.progress.setValue(0)
        self.state = QLabel("Ready", objectName="compareState")

        controls = QGroupBox("Compare full precision with")
        controls_layout = QVBoxLayout(controls)
        top = QHBoxLayout()
        top.addWidget(QLabel("&Variant:", buddy=self.variant))
        top.addWidget(self.variant)
        top.addWidget(self.hint, 1)
        controls_layout.addLayout(top)
        suites = QHBoxLayout()
        suites.addWidget(QLabel("Suites:"))
        suites.addLayout(self.suite_row)
        suites.addWidget(self.add_suite_button)
        suites.addStretch(1)
        suites.addWidget(QLabel("&Items per suite:", buddy=self.limit))
        suites.addWidget(self.limit)
        controls_layout.addLayout(suites)
        run = QHBoxLayout()
        run.addWidget(self.run_button)
        run.addWidget(self.cancel_button)
        run.addWidget(self.progress, 1)
        run.addWidget(self.state)
        controls_layout.addLayout(run)

        # ---- results ----
        self.table = QTableWidget(0, len(COLUMNS), objectName="compareTable")
        self.table.setHorizontalHeaderLabels(COLUMNS)
        for column in ("Full precision", "Quantized"):
            self.table.horizontalHeaderItem(COLUMNS.index(column)).setToolTip(
                "Accuracy with its 95 % Wilson score interval in brackets (the text suite: NLL per token, "
                "lower is better, no interval).")
        self.table.horizontalHeaderItem(DROP_COLUMN).setToolTip(
            "The change in quality relative to full precision, (Q − FP) / FP for accuracy and (FP − Q) / FP for "
            "the text suite's NLL, with its 95 % interval: Newcombe's paired interval on the same items. "
            "A likelihood gets no interval.")
        self.table.horizontalHeaderItem(VERDICT_COLUMN).setToolTip(
            "The seed study's band for the drop (under 1% negligible, 1–4% moderate, over 4% significant), named "
            "only when a paired test on the same items (exact McNemar; a sign test for NLL) gives p < 0.05.")
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setAccessibleName("Comparison results")
        self.chart = GroupedBars("Accuracy per suite", "accuracy (%)",
                                 "Share of items answered correctly, full precision (blue) beside quantized "
                                 "(orange). The text suite scores likelihood (NLL) and is in the table only.")
        self.chart.setObjectName("compareChart")
        self.save_button = QPushButton("Save table as CSV…", objectName="compareSaveCsv", enabled=False)
        results = QWidget()
        results_layout = QVBoxLayout(results)
        results_layout.setContentsMargins(0, 0, 0, 0)
        results_layout.addWidget(self.table, 1)
        save_row = QHBoxLayout()
        save_row.addStretch(1)
        save_row.addWidget(self.save_button)
        results_layout.addLayout(save_row)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(results)
        splitter.addWidget(self.chart)
        splitter.setSizes([300, 300])

        layout = QVBoxLayout(self)
        layout.addWidget(controls)
        layout.addWidget(splitter, 1)

        self.add_suite_button.clicked.connect(self._browse_suite)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.session.cancel)
        self.save_button.clicked.connect(self._browse_csv)
        self.variant.currentIndexChanged.connect(self._update_controls)
        session.variants_changed.connect(self._update_controls)
        session.model_changed.connect(self._clear_results)  # rows of another model would mislead
        session.busy_changed.connect(self._update_controls)
        self._update_controls()
        self._draw_chart()

    # ---- suites -----------------------------------------------------------------------------------
    def _add_suite_box(self, key: str, label: str, source: str | Path, checked: bool) -> QCheckBox:
        box = QCheckBox(label, objectName=f"compareSuite_{label}", checked=checked)
        unavailable = code_runner_missing() if key == "code" else None
        if unavailable:  # e.g. in the frozen app: say why rather than fail halfway through a run
            box.setChecked(False)
            box.setEnabled(False)
            box.setToolTip(unavailable)
        box.toggled.connect(self._update_controls)
        self.suite_boxes[key] = box
        self._sources[key] = source
        self.suite_row.addWidget(box)
        return box

    def _browse_suite(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Add a suite file", "", "Task suites (*.jsonl);;All files (*)")
        if path:
            self.add_suite_file(path)

    def add_suite_file(self, path: str | Path) -> bool:
        """Offer the JSONL suite at `path` (checked); an error dialog names the bad line if it is malformed."""
        path = Path(path).expanduser().resolve()
        try:
            suite = load_suite(path)  # a Path is always read as a file, even one named "qa"
        except SuiteError as exc:
            show_error(self, "Cannot use this suite file", str(exc))
            return False
        key = str(path)
        if key not in self.suite_boxes:
            box = self._add_suite_box(key, path.stem, path, checked=True)
            box.setToolTip(f"{path}\n{len(suite)} {suite.name} items")
        self.suite_boxes[key].setChecked(True)  # adding a file twice chooses it again
        return True

    def chosen_suites(self) -> list[tuple[str, str | Path]]:
        return [(box.text(), self._sources[key]) for key, box in self.suite_boxes.items() if box.isChecked()]

    # ---- state ------------------------------------------------------------------------------------
    def _blocker(self) -> str | None:
        """Why a run cannot start now, or None."""
        if not self.chosen_suites():
            return "Choose at least one suite."
        return self.session.unavailable(needs_variant=True)

    def _update_controls(self, *_) -> None:
        blocker = self._blocker()
        self.run_button.setEnabled(blocker is None)
        self.run_button.setToolTip(blocker or "Evaluate each chosen suite on full precision, then on the variant.")
        # The hint explains only what the user has to go and do elsewhere; a busy session explains itself.
        self.hint.setText(blocker if blocker and not self.session.busy else "")
        self.cancel_button.setEnabled(self.job is not None)
        self.save_button.setEnabled(bool(self.rows))

    def _clear_results(self) -> None:
        self.rows = []
        self.table.setRowCount(0)
        self._draw_chart()
        self._update_controls()

    # ---- running ----------------------------------------------------------------------------------
    def run(self, *, unsafe_code_eval: bool = False) -> None:
        """Evaluate the chosen suites on full precision and on the chosen variant, as one job."""
        blocker = self._blocker()
        if blocker is not None:
            show_error(self, "Cannot compare yet", blocker)
            return
        suites = self.chosen_suites()
        try:
            unsandboxed = None if unsafe_code_eval else unisolated_code([source for _, source in suites])
        except SuiteError:  # a suite file gone since it was added: the job reports it
            unsandboxed = None
        if unsandboxed:  # the engine would refuse; only the user can agree to run the code without isolation
            ask(self, "Run generated code without a sandbox?",
                f"{unsandboxed}\n\nThe code suite runs code the model wrote. Without a sandbox it can read, change "
                "or delete your files and reach the network. Run it anyway?",
                lambda: self.run(unsafe_code_eval=True))
            return
        fp_model = self.session.model
        q_model = self.session.variants[self.variant.currentText()].model
        limit = self.limit.value() or None
        self._clear_results()
        self._weights = (fp_model.weight_bytes(), q_model.weight_bytes())
        self._held = str(fp_model.dtype).removeprefix("torch.")

        def work(emit, cancel) -> list[SuitePair]:
            pairs = []
            for label, source in suites:
                fp_q = []
                for which, model in (("full precision", fp_model), ("quantized", q_model)):
                    emit(Stage(label, which))
                    fp_q.append(jobs.run(evaluate(model, source, limit=limit, cancel=cancel,
                                                  unsafe_code_eval=unsafe_code_eval), emit))
                pairs.append(SuitePair(label, *fp_q))
                emit(pairs[-1])  # the row can be shown (and kept on cancel) before the next suite starts
            return pairs

        self._started, self._suite_count = time.perf_counter(), len(suites)
        self.job = self.session.start("Comparing", work, on_event=self._on_event, on_done=self._on_done,
                                      on_failed=lambda message: self._ended("Failed"),
                                      on_cancelled=lambda: self._ended("Cancelled"))
        self._update_controls()

    def _on_event(self, event) -> None:
        if isinstance(event, Stage):
            self._stage = event
            self.state.setText(f"Suite {len(self.rows) + 1} of {self._suite_count}")
            self.progress.setRange(0, 0)  # busy until the first item is scored
            self.progress.setFormat(f"{event.suite} on {event.model}: starting…")
        elif isinstance(event, EvalProgress):
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.progress.setFormat(f"{self._stage.suite} on {self._stage.model}: {event.done} / {event.total}")
        elif isinstance(event, SuitePair):
            self._add_row(row_for(event, *self._weights))

    def _on_done(self, pairs: list[SuitePair]) -> None:
        seconds = time.perf_counter() - self._started
        self._ended(f"Done: {len(pairs)} suite{'s' * (len(pairs) > 1)} in {seconds:.1f} s", complete=True)
        self.finished.emit(list(self.rows))

    def _ended(self, state: str, complete: bool = False) -> None:
        self.job = None
        self.state.setText(state)
        self.progress.setRange(0, 1)  # full when the run completed, empty when it stopped; the label says how
        self.progress.setValue(1 if complete else 0)
        self.progress.setFormat("done" if complete else "")
        self._update_controls()

    # ---- results ----------------------------------------------------------------------------------
    def _add_row(self, row: dict) -> None:
        self.rows.append(row)
        # Two lines a cell (value, then its interval or baseline): the table fits a 1024-pixel window unscrolled.
        cells = (row["suite"], str(row["items"]), _score(row, "fp"), _score(row, "q"), _change_text(row),
                 row["verdict"].replace(" at n", "\nat n"), _ms(row["ms_per_step_fp"]), _ms_q(row),
                 size_change(row["weight_bytes_fp"], row["weight_bytes_q"], self._held).replace(" → ", " →\n"))
        r = self.table.rowCount()
        self.table.insertRow(r)
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if column:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.table.setItem(r, column, item)
        evidence = f"{row['test']}: p = {row['p_value']:.3g}"
        if row["metric"] == "nll_per_token":
            evidence += "; no interval for a likelihood"
        for column in (DROP_COLUMN, VERDICT_COLUMN):
            self.table.item(r, column).setToolTip(evidence)
        if row["ms_per_step_fp"] and row["ms_per_step_q"]:  # why the quantized model runs at the speed it does
            note = speed_note(self.variant.currentText() or "Quantized", row["ms_per_step_fp"], row["ms_per_step_q"],
                              row["weight_bytes_fp"], row["weight_bytes_q"], row["kernels_q"])
            for column in (Q_MS_COLUMN, SIZE_COLUMN):
                self.table.item(r, column).setToolTip(note)
        if row["band"]:  # only a band the items support gets its colour
            tint = QColor(BAND_COLORS[row["band"]])
            tint.setAlpha(90)  # a tint keeps the theme's text colour readable in light and dark palettes
            self.table.item(r, VERDICT_COLUMN).setBackground(tint)
        self._draw_chart()
        self._update_controls()

    def _draw_chart(self) -> None:
        accuracy = [x for x in self.rows if x["metric"] == "accuracy"]
        self.chart.set_values([x["suite"] for x in accuracy], [100 * x["fp"] for x in accuracy],
                              [100 * x["q"] for x in accuracy])
        self.chart.setYRange(0, 105, padding=0)

    def _browse_csv(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Save the comparison", "comparison.csv", "CSV files (*.csv)")
        if path:
            self.save_csv(path)

    def save_csv(self, path: str | Path) -> bool:
        """Write the table's rows (raw numbers, accuracy as a fraction) to `path`, all or nothing."""
        table = io.StringIO()
        writer = csv.DictWriter(table, fieldnames=FIELDS)
        writer.writeheader()
        writer.writerows(self.rows)
        try:
            atomic_write_text(path, table.getvalue())
        except WriteError as exc:
            show_error(self, "Cannot save the table", str(exc))
            return False
        return True
