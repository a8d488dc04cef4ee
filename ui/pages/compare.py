"""Compare: the same task suites on full precision and on a quantized variant, side by side.

The page drives the engine's `compare` job (the CLI's `dllm-studio compare` runs the same one), so its
numbers are the CLI's: full precision is evaluated first, then the variant, and each finished (model, suite)
arrives as a row that survives a cancel. The drop bands are the seed study's (arXiv:2508.14896): under 1%
negligible, 1–4% moderate, over 4% significant, named only when a paired test on the same items tells the drop
from zero (`eval.drop`). The plots are the report's own SVGs (`report.charts`), and a saved report (the CLI's
too) opens here.
"""

from __future__ import annotations

import time
from pathlib import Path

from PySide6.QtCore import QByteArray, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtSvgWidgets import QSvgWidget
from PySide6.QtWidgets import (QCheckBox, QFileDialog, QGroupBox, QHBoxLayout, QHeaderView, QLabel,
                               QProgressBar, QPushButton, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem,
                               QTabWidget, QVBoxLayout, QWidget)

from dllm_studio.compare import Candidate, CompareStage, SuiteCompared, compare, new_report
from dllm_studio.errors import DllmError, SuiteError
from dllm_studio.eval.scoring import code_runner_missing
from dllm_studio.eval.runner import unisolated_code
from dllm_studio.eval.suites import SUITES, load_suite
from dllm_studio.events import EvalProgress
from dllm_studio.memory import size_change
from dllm_studio.report import change_text, charts, points_text, read_report, score_text, write_report
from dllm_studio.speed import simulated, speed_note
from ui.dialogs import ask, show_error
from ui.session import Session
from ui.theme import BAND_COLORS
from ui.widgets import VariantPicker
from ui.workers import stream

DEFAULT_SUITES = ("qa", "math", "code")
# Two-line headers where the cells are narrower than a one-line header: the table fits a 1024-pixel window.
COLUMNS = ("Suite", "Items", "Full\nprecision", "Quantized", "Change\n(95 % CI)", "Verdict", "Agreement",
           "ms/step\nFP", "ms/step\nQ", "Weights")
DROP_COLUMN, VERDICT_COLUMN = COLUMNS.index("Change\n(95 % CI)"), COLUMNS.index("Verdict")
Q_MS_COLUMN, SIZE_COLUMN = COLUMNS.index("ms/step\nQ"), COLUMNS.index("Weights")


def _two_lines(text: str) -> str:
    """The engine's one-line cell with its interval on a second line: the table fits a 1024-pixel window."""
    return text.replace(" [", "\n[", 1)


def _ms(value: float | None) -> str:
    return "—" if value is None else f"{value:.1f}"


def _ms_q(base: dict, row: dict) -> str:
    """The quantized model's step time, and on a second line its ratio to full precision (or, where its
    activation rounding is simulated, that the time says nothing of a real kernel's)."""
    fp, q = base["ms_per_step"], row["ms_per_step"]
    if q and simulated(row["kernels"]):
        return f"{_ms(q)}\naccuracy-only"
    return f"{_ms(q)}\n{q / fp:.2f}× FP" if fp and q else _ms(q)


def _agreement(row: dict) -> str:
    """"85 %" of answers identical, and below it how many items flipped a decision somewhere."""
    if row["agreement"] is None:
        return "—"
    text = f"{100 * row['agreement']:.0f} %"
    return text if row["flipped_items"] is None else f"{text}\n{row['flipped_items']} flipped"


class ComparePage(QWidget):
    finished = Signal(list)  # the variant's rows (`compare.suite_row`), one per suite, when a run completes

    def __init__(self, session: Session, settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.job = None
        self.rows: list[dict] = []  # every finished row, full precision's included, as the engine made them
        self.report: dict | None = None  # the finished run's, or the opened file's
        self._held = ""  # the full-precision model's dtype: the baseline the weights column states
        self._base = ""  # the base model's label in the rows

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
        self.flips = QCheckBox("Decision flips", objectName="compareFlips", checked=True)
        self.flips.setToolTip("Also teacher-force the variant on full precision's denoising steps for every item: "
                              "which items it would decide differently somewhere, even where the answer ends the "
                              "same (one more forward per step of the variant).")
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
        suites.addWidget(self.flips)
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
        for column in ("Full\nprecision", "Quantized"):
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
        self.table.horizontalHeaderItem(COLUMNS.index("Agreement")).setToolTip(
            "The share of items the variant answered exactly as full precision did; below it, with decision flips, "
            "the items where the variant, given full precision's state before a step, would commit another token "
            "or another position at some step (teacher-forced), even if its answer ends the same.")
        self.table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.table.verticalHeader().hide()
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.setAccessibleName("Comparison results")
        self.plots = QTabWidget(objectName="comparePlots")
        self.plots.setAccessibleName("Comparison plots")
        self.open_button = QPushButton("Open report…", objectName="compareOpenReport")
        self.open_button.setToolTip("Show a saved report (report.json), the CLI's `dllm-studio compare` or `study` "
                                    "reports too.")
        self.save_button = QPushButton("Save report…", objectName="compareSaveReport", enabled=False)
        self.save_button.setToolTip("Write report.json, report.csv and a self-contained report.html with the plots.")
        results = QWidget()
        results_layout = QVBoxLayout(results)
        results_layout.setContentsMargins(0, 0, 0, 0)
        results_layout.addWidget(self.table, 1)
        save_row = QHBoxLayout()
        save_row.addStretch(1)
        save_row.addWidget(self.open_button)
        save_row.addWidget(self.save_button)
        results_layout.addLayout(save_row)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(results)
        splitter.addWidget(self.plots)
        splitter.setSizes([300, 300])

        layout = QVBoxLayout(self)
        layout.addWidget(controls)
        layout.addWidget(splitter, 1)

        self.add_suite_button.clicked.connect(self._browse_suite)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.session.cancel)
        self.save_button.clicked.connect(self._browse_save)
        self.open_button.clicked.connect(self._browse_open)
        self.variant.currentIndexChanged.connect(self._update_controls)
        session.variants_changed.connect(self._update_controls)
        session.model_changed.connect(self._clear_results)  # rows of another model would mislead
        session.busy_changed.connect(self._update_controls)
        self._update_controls()
        self._draw_plots()

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
        self.save_button.setEnabled(bool(self.rows) and self.job is None)
        self.open_button.setEnabled(self.job is None)

    def _clear_results(self) -> None:
        self.rows, self.report = [], None
        self.table.setRowCount(0)
        self.table.horizontalHeaderItem(0).setText(COLUMNS[0])
        self._draw_plots()
        self._update_controls()

    # ---- running ----------------------------------------------------------------------------------
    def run(self, *, unsafe_code_eval: bool = False) -> None:
        """Evaluate the chosen suites on full precision and on the chosen variant: the engine's `compare` job."""
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
        variant = self.session.variants[self.variant.currentText()]
        fp_model = self.session.model
        self._clear_results()
        self._held, self._base = str(fp_model.dtype).removeprefix("torch."), "full precision"
        candidates = [Candidate(self._base, fp_model),
                      Candidate(variant.name, variant.model, profile={"summary": variant.summary, "layers": variant.layers})]
        sources = [source for _, source in suites]
        limit, flips = self.limit.value() or None, self.flips.isChecked()
        work = stream(lambda cancel: compare(candidates, sources, limit=limit, flips=flips, cancel=cancel,
                                             unsafe_code_eval=unsafe_code_eval))
        self._started = time.perf_counter()
        self.job = self.session.start("Comparing", work, on_event=self._on_event, on_done=self._on_done,
                                      on_failed=lambda message: self._ended("Failed"),
                                      on_cancelled=lambda: self._ended("Cancelled"))
        self._update_controls()

    def _on_event(self, event) -> None:
        if isinstance(event, CompareStage):
            self._stage = event
            self.state.setText(f"{event.index} of {event.total}" + (f", about {event.eta_s:.0f} s left"
                                                                    if event.eta_s is not None else ""))
            self.progress.setRange(0, 0)  # busy until the first item is scored
            self.progress.setFormat(f"{event.suite} on {event.model}: starting…")
        elif isinstance(event, EvalProgress):
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.progress.setFormat(f"{self._stage.suite} on {self._stage.model}: {event.done} / {event.total}")
        elif isinstance(event, SuiteCompared):
            self._add_row(event.row)

    def _on_done(self, report: dict) -> None:
        seconds = time.perf_counter() - self._started
        self.report = report
        self._draw_plots()  # now with the layer profile the finished report holds
        suites = len(report["suites"])
        self._ended(f"Done: {suites} suite{'s' * (suites > 1)} in {seconds:.1f} s", complete=True)
        self.finished.emit([r for r in self.rows if r["model"] != self._base])

    def _ended(self, state: str, complete: bool = False) -> None:
        self.job = None
        self.state.setText(state)
        self.progress.setRange(0, 1)  # full when the run completed, empty when it stopped; the label says how
        self.progress.setValue(1 if complete else 0)
        self.progress.setFormat("done" if complete else "")
        self._update_controls()

    # ---- results ----------------------------------------------------------------------------------
    def _add_row(self, row: dict) -> None:
        """A finished row: full precision's wait for their variant's, which fills the table line."""
        self.rows.append(row)
        if row["model"] != self._base:
            base = next(r for r in self.rows if r["model"] == self._base and r["suite"] == row["suite"])
            self._show(base, row, several=False)
        self._draw_plots()
        self._update_controls()

    def _show(self, base: dict, row: dict, several: bool) -> None:
        cells = (f"{row['model']}\n{row['suite']}" if several else row["suite"], str(row["items"]),
                 _two_lines(score_text(base)), _two_lines(score_text(row)), _two_lines(change_text(row)),
                 row["verdict"].replace(" at n", "\nat n"),
                 _agreement(row),
                 _ms(base["ms_per_step"]), _ms_q(base, row),
                 size_change(base["weight_bytes"], row["weight_bytes"], self._held).replace(" → ", " →\n"))
        r = self.table.rowCount()
        self.table.insertRow(r)
        for column, text in enumerate(cells):
            item = QTableWidgetItem(text)
            if column:
                item.setTextAlignment(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
            self.table.setItem(r, column, item)
        evidence = f"{points_text(row)} against full precision; {row['test']}: p = {row['p_value']:.3g}"
        if row["metric"] == "nll_per_token":
            evidence += "; no interval for a likelihood"
        for column in (DROP_COLUMN, VERDICT_COLUMN):
            self.table.item(r, column).setToolTip(evidence)
        if base["ms_per_step"] and row["ms_per_step"]:  # why the quantized model runs at the speed it does
            note = speed_note(row["model"], base["ms_per_step"], row["ms_per_step"], base["weight_bytes"],
                              row["weight_bytes"], row["kernels"])
            for column in (Q_MS_COLUMN, SIZE_COLUMN):
                self.table.item(r, column).setToolTip(note)
        if row["band"]:  # only a band the items support gets its colour
            tint = QColor(BAND_COLORS[row["band"]])
            tint.setAlpha(90)  # a tint keeps the theme's text colour readable in light and dark palettes
            self.table.item(r, VERDICT_COLUMN).setBackground(tint)

    def _draw_plots(self) -> None:
        """The report's plots, drawn from the same SVG the HTML report holds."""
        report = self.report or self._partial_report()
        current = self.plots.currentIndex()
        self.plots.clear()
        for title, svg in charts(report).items():
            view = QSvgWidget(objectName=f"comparePlot_{title.replace(' ', '_')}")
            view.load(QByteArray(svg.encode()))
            view.renderer().setAspectRatioMode(Qt.AspectRatioMode.KeepAspectRatio)
            view.setAccessibleName(title)
            view.svg = svg  # what it draws, for tests and for copying
            self.plots.addTab(view, title)
        self.plots.setCurrentIndex(max(current, 0))

    # ---- reports ----------------------------------------------------------------------------------
    def _partial_report(self) -> dict:
        """What was finished, as a report: the whole one after a run, the rows so far after a cancel."""
        if self.report is not None:
            return self.report
        return new_report("compare", self._base, limit=self.limit.value() or None, rows=self.rows,
                          suites=list(dict.fromkeys(r["suite"] for r in self.rows)),
                          notes=["Incomplete: the run stopped; only the suites it finished are here."])

    def _browse_save(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Save the report into")
        if folder:
            self.save_report(folder)

    def save_report(self, folder: str | Path) -> bool:
        """Write report.json, report.csv and report.html into `folder`, each all or nothing."""
        try:
            write_report(self._partial_report(), folder)
        except DllmError as exc:
            show_error(self, "Cannot save the report", str(exc))
            return False
        return True

    def _browse_open(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open a report", "", "Reports (report.json);;JSON files (*.json)")
        if path:
            self.open_report(path)

    def open_report(self, path: str | Path) -> bool:
        """Show a saved report: its rows against its base, and its plots."""
        try:
            report = read_report(path)
        except DllmError as exc:
            show_error(self, "Cannot open the report", str(exc))
            return False
        self._clear_results()
        self.report, self.rows, self._base = report, list(report["rows"]), report["base"]
        dtype = next((m.get("dtype") for m in report["models"] if m["label"] == self._base), None)
        self._held = dtype or "full precision"
        bases = {r["suite"]: r for r in self.rows if r["model"] == self._base}
        variants = {r["model"] for r in self.rows} - {self._base}
        self.table.horizontalHeaderItem(0).setText("Variant\nsuite" if len(variants) > 1 else "Suite")
        for row in self.rows:
            if row["model"] != self._base and row["suite"] in bases:
                self._show(bases[row["suite"]], row, several=len(variants) > 1)
        self._draw_plots()
        self.state.setText(f"Opened {Path(path).name if Path(path).is_file() else Path(path).name + '/report.json'}")
        self._update_controls()
        return True
