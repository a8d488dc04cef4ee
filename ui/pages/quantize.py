"""Quantize: a recipe form that offers only what the engine can do, and a live profile while it runs.

Engine events arrive on the GUI thread at whatever rate the job yields them; they only update
plain data here, and a 10 Hz timer draws the charts from the latest data (never once per event).
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGridLayout, QGroupBox, QHBoxLayout,
                               QLabel, QPlainTextEdit, QProgressBar, QPushButton, QSpinBox, QSplitter, QVBoxLayout,
                               QWidget)

from dllm_studio import memory
from dllm_studio.errors import DllmError
from dllm_studio.events import BlockQuantized, LayerQuantized, LayerStats
from dllm_studio.memory import available_bytes, human
from dllm_studio.profile import OUTLIER_ALARM
from dllm_studio.quant.pipeline import check_supported, quantize, working_set
from dllm_studio.quant import runtimes
from dllm_studio.quant.recipe import ACTIVATION_BITS, METHODS, WEIGHT_BITS, QuantRecipe
from ui.charts import BarChart, ChannelProfile, MemoryChart
from ui.session import Session, Variant
from ui.theme import BAD, FIT_COLORS, WARN
from ui.workers import stream

# What the seed study (arXiv:2508.14896, LLaDA/Dream, asym g128) found about each method.
FINDINGS = {
    "rtn": "Round-to-nearest: no calibration, the baseline the other methods improve on. "
           "Fine at 8 bits; at 4 bits and below it loses most where outlier channels dominate.",
    "gptq": "GPTQ rounds each column using the calibration Hessian and spreads the error over the columns "
            "still to come. The seed study's recommendation for weight-only: about 0.3–1.4% average drop at "
            "W4 on LLaDA; W3 costs 10–16% on math and code.",
    "awq": "AWQ scales the input channels that carry large activations before rounding, then searches a "
           "clipping range. Slightly behind GPTQ on average in the seed study (W4: 0.1–4% drop), relatively "
           "better at W3 on code.",
}
ABITS_ROLE = Qt.ItemDataRole.UserRole + 1  # the bits combo's activation bits, beside the weight bits (UserRole)
GROUP_SIZES = ((128, "128 (default)"), (64, "64"), (32, "32"), (0, "per output channel"))
# The charts take turns: each tick repaints at most one (5-25 ms on 2 cores), since four in one frame stalled the
# window for 50-130 ms. Every changed chart is still repainted within four ticks, whatever the event rate.
REDRAW_MS = 50
CHARTS = ("outliers", "channels", "errors", "memory")  # the order they take turns in
MEMORY_EVERY = 6  # redraw ticks per memory sample (about 3 a second)


class QuantizePage(QWidget):
    finished = Signal(object)  # the Variant made

    def __init__(self, session: Session, settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.job = None
        self._calib_file: str | None = None
        self._last_result: str | None = None  # the result card of the last run that finished, kept past a cancel
        self._reset_data()

        # ---- the recipe ----
        self.method = QComboBox(objectName="methodCombo")
        for i, (name, description) in enumerate(METHODS.items()):
            reason = runtimes.unavailable(name)
            self.method.addItem(name.upper() + (" (not installed)" if reason else ""), name)
            self.method.setItemData(i, method_tooltip(name), Qt.ItemDataRole.ToolTipRole)
            if reason:  # listed, so users see it exists, but not pickable
                self.method.model().item(i).setEnabled(False)
        self.bits = QComboBox(objectName="bitsCombo")
        self.group = QComboBox(objectName="groupCombo")
        for size, label in GROUP_SIZES:
            self.group.addItem(label, size)
        self.symmetric = QCheckBox("Symmetric grid (no zero point)")
        self.act_order = QCheckBox("Act-order (GPTQ: columns by importance)", objectName="actOrder")
        self.calib = QComboBox(objectName="calibCombo")
        self.calib.addItem("Built-in: the demo tasks and text", "builtin")
        self.calib.addItem("A text file…", "file")
        self.samples = QSpinBox(minimum=1, maximum=1024, objectName="samplesSpin")
        self.seq_len = QSpinBox(minimum=8, maximum=8192, singleStep=64, value=256)
        self.masked = QCheckBox("Masked calibration (as while denoising)")
        self.masked.setToolTip("A dLLM never sees clean text while it answers: every step's input is partly masked. "
                               "On: calibration sequences are masked at ratios spread over (0, 1). Off: clean text, "
                               "as the seed study calibrated.")
        self.keep_head = QCheckBox("Keep the LM head in full precision")
        self.keep_head.setChecked(True)
        self.preflight = QLabel(wordWrap=True, objectName="preflightLabel")
        self.start_button = QPushButton("&Start", objectName="startButton")
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton")
        self.cancel_button.setToolTip("Stop after the current layer (Esc); nothing is kept or written.")
        self.cancel_button.setEnabled(False)

        form = QFormLayout()
        for label, widget in (("&Method:", self.method), ("&Weight bits:", self.bits), ("&Group size:", self.group),
                              ("&Calibration:", self.calib), ("Sa&mples:", self.samples),
                              ("Sequence &length:", self.seq_len)):
            caption = QLabel(label)
            caption.setBuddy(widget)
            form.addRow(caption, widget)
        recipe_box = QGroupBox("Recipe")
        box = QVBoxLayout(recipe_box)
        box.addLayout(form)
        for widget in (self.symmetric, self.act_order, self.masked, self.keep_head, self.preflight):
            box.addWidget(widget)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        box.addLayout(buttons)
        self.result = QLabel("Quantize to see the time, size and bits per weight here.", wordWrap=True,
                             objectName="resultCard", textFormat=Qt.TextFormat.RichText,
                             alignment=Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        result_box = QGroupBox("Result")
        QVBoxLayout(result_box).addWidget(self.result)
        side = QVBoxLayout()
        side.addWidget(recipe_box)
        side.addWidget(result_box, 1)

        # ---- the live profile ----
        self.progress = QProgressBar(objectName="quantProgress", textVisible=True)
        self.progress.setFormat("idle")
        self.progress.setValue(0)
        self.outliers = BarChart("Activation outliers per layer", "layer (in quantization order)",
                                 "max / median channel", "Largest input channel magnitude over the median channel, "
                                 f"per quantized layer, on a log scale; red above {OUTLIER_ALARM:g}x.", log_y=True,
                                 alarm=OUTLIER_ALARM)
        self.errors = BarChart("Quantization error per layer", "layer (in quantization order)", "relative error",
                               "‖X·Wqᵀ − X·Wᵀ‖ / ‖X·Wᵀ‖ on the calibration inputs, per layer.")
        self.channels = ChannelProfile()
        self.memory_chart = MemoryChart("Memory (this process)")
        charts = QGridLayout()
        charts.addWidget(self.outliers, 0, 0)
        charts.addWidget(self.channels, 0, 1)
        charts.addWidget(self.errors, 1, 0)
        charts.addWidget(self.memory_chart, 1, 1)
        self.log = QPlainTextEdit(readOnly=True, objectName="quantLog", maximumBlockCount=2000)
        self.log.setAccessibleName("Quantization log")
        live = QWidget()
        live_layout = QVBoxLayout(live)
        live_layout.setContentsMargins(0, 0, 0, 0)
        live_layout.addWidget(self.progress)
        live_layout.addLayout(charts, 1)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(live)
        splitter.addWidget(self.log)
        splitter.setSizes([600, 140])

        layout = QHBoxLayout(self)
        side_widget = QWidget()
        side_widget.setLayout(side)
        side_widget.setMaximumWidth(380)
        layout.addWidget(side_widget)
        layout.addWidget(splitter, 1)

        self.timer = QTimer(self, interval=REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.redraws = self.ticks = self.next_chart = 0

        self._load_settings()
        self.method.currentIndexChanged.connect(self._method_changed)
        for widget in (self.bits, self.group, self.calib):
            widget.currentIndexChanged.connect(self._recipe_changed)
        for widget in (self.samples, self.seq_len):
            widget.valueChanged.connect(self._recipe_changed)
        for widget in (self.symmetric, self.act_order, self.masked, self.keep_head):
            widget.toggled.connect(self._recipe_changed)
        self.calib.activated.connect(self._calib_chosen)
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        session.model_changed.connect(self._recipe_changed)
        session.busy_changed.connect(self._busy_changed)
        self._method_changed()

    # ---- the recipe form ----------------------------------------------------------------------------
    def _load_settings(self) -> None:
        s = self.settings
        self.method.setCurrentIndex(max(self.method.findData(s.get("quantize/method")), 0))
        self._fill_bits(s.get("quantize/wbits"))
        self.group.setCurrentIndex(max(self.group.findData(s.get("quantize/group_size")), 0))
        self.samples.setValue(s.get("quantize/calib_samples"))
        self.masked.setChecked(s.get("quantize/masked_calib"))

    def _fill_bits(self, wanted: int | None = None) -> None:
        """Only the bit-widths the chosen method can produce are offered."""
        wanted = wanted or self.bits.currentData()
        self.bits.blockSignals(True)
        self.bits.clear()
        method = self.method.currentData()
        for bits in WEIGHT_BITS[method]:
            for abits in ACTIVATION_BITS[method]:
                self.bits.addItem(f"{bits}-bit (W{bits}A{abits})", bits)
                self.bits.setItemData(self.bits.count() - 1, abits, ABITS_ROLE)
        self.bits.setCurrentIndex(max(self.bits.findData(wanted), self.bits.findData(4), 0))
        self.bits.blockSignals(False)

    def _method_changed(self) -> None:
        method = self.method.currentData()
        self._fill_bits()
        self.method.setToolTip(method_tooltip(method))
        self.act_order.setEnabled(method == "gptq")  # a GPTQ-only option: disabled, not silently ignored
        if method != "gptq":
            self.act_order.setChecked(False)
        library = method in runtimes.METHODS  # the library chooses its own grid and groups
        self.group.setEnabled(not library)
        self.symmetric.setEnabled(not library)
        if library:
            self.symmetric.setChecked(False)
        self._recipe_changed()

    def _calib_chosen(self) -> None:
        if self.calib.currentData() != "file":
            return
        path, _ = QFileDialog.getOpenFileName(self, "Calibration text (UTF-8)", "", "Text files (*.txt *.md);;All files (*)")
        self.set_calibration_file(path or None)

    def set_calibration_file(self, path: str | None) -> None:
        self._calib_file = path
        if path:
            self.calib.setItemText(1, f"Text file: {Path(path).name}")
            self.calib.setCurrentIndex(1)
        else:
            self.calib.setItemText(1, "A text file…")
            self.calib.setCurrentIndex(0)
        self._recipe_changed()

    def recipe(self) -> QuantRecipe:
        calib = self._calib_file if self.calib.currentData() == "file" and self._calib_file else "builtin"
        library = self.method.currentData() in runtimes.METHODS
        return QuantRecipe(method=self.method.currentData(), wbits=self.bits.currentData(),
                           abits=self.bits.currentData(ABITS_ROLE) or 16,
                           group_size=QuantRecipe.group_size if library else self.group.currentData() or None,
                           symmetric=self.symmetric.isChecked(),
                           act_order=self.act_order.isChecked(), calib=calib, calib_samples=self.samples.value(),
                           seq_len=self.seq_len.value(), masked_calib=self.masked.isChecked(),
                           skip=("head",) if self.keep_head.isChecked() else ())

    def _recipe_changed(self) -> None:
        s = self.settings
        s.set("quantize/method", self.method.currentData())
        s.set("quantize/wbits", self.bits.currentData())
        s.set("quantize/group_size", self.group.currentData())
        s.set("quantize/calib_samples", self.samples.value())
        s.set("quantize/masked_calib", self.masked.isChecked())
        self._check()

    def _check(self) -> bool:
        """Validate the recipe and estimate its memory against free RAM; say what is wrong, before starting."""
        model = self.session.model
        ok = False
        try:
            if model is None:
                raise DllmError("Open a model on the Models page first.")
            recipe = self.recipe().validate()
            check_supported(model)
        except DllmError as exc:
            self.preflight.setText(f"<span style='color:{BAD}'>{exc}</span>")
        else:
            parts = working_set(model, recipe)
            needed = sum(parts.values()) - parts["model"]  # the model itself is already in memory
            free = available_bytes()
            verdict = memory.fit(needed, free)
            colour = FIT_COLORS[verdict]
            self.preflight.setText(
                f"Needs about <b>{human(needed)}</b> more memory; {human(free)} free: "
                f"<span style='color:{colour}'><b>{verdict}</b></span>.<br>Result: {recipe.label}, "
                f"about {human(model.memory_estimate(recipe.wbits, recipe.group_size or 128))} of weights."
                + (f"<br><span style='color:{WARN}'>Note: {note}.</span>" if (note := _note(recipe.method)) else ""))
            self.preflight.setToolTip("\n".join(f"{name}: {human(b)}" for name, b in parts.items()))
            ok = verdict != "won't fit"
        self.start_button.setEnabled(ok and not self.session.busy)
        return ok

    # ---- running ------------------------------------------------------------------------------------
    def start(self) -> None:
        if self.session.busy or not self._check():
            return
        model, recipe = self.session.model, self.recipe()
        self._reset_data()
        self.memory_chart.clear_data()
        self.log.clear()
        self._show_last_result("a new run is under way", "Quantizing: the result appears here when it is done.")
        self.progress.setRange(0, model.num_layers)
        self.progress.setValue(0)
        self.progress.setFormat(f"starting {recipe.label}…")
        self._log(f"{recipe.label} on {model.source}: {model.num_layers} blocks, "
                  f"{recipe.calib_samples} x {recipe.seq_len} calibration tokens"
                  f"{' (masked)' if recipe.masked_calib else ''}")
        self._started = time.perf_counter()
        self.sample_memory()
        self.timer.start()
        self.job = self.session.start(f"Quantizing {recipe.label}", stream(lambda cancel: quantize(model, recipe, cancel)),
                                      on_event=self._on_event, on_done=self._done, on_failed=self._failed,
                                      on_cancelled=self._cancelled)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.progress.setFormat("cancelling after the current layer…")

    def _reset_data(self) -> None:
        self.outlier_ratios: list[float] = []
        self.layer_errors: list[float] = []
        self.current: LayerStats | None = None
        self.last_block: BlockQuantized | None = None
        self.changed = set(CHARTS)  # the charts to repaint

    def _on_event(self, event) -> None:
        if isinstance(event, LayerStats):
            self.outlier_ratios.append(event.outlier_ratio)
            self.current = event
            self.changed |= {"outliers", "channels"}
        elif isinstance(event, LayerQuantized):
            self.layer_errors.append(event.relative_error)
            self.changed.add("errors")
            self._log(f"  {event.name}: error {event.relative_error:.4f} ({event.seconds:.2f} s)  "
                      f"layer {event.layer}/{event.layers}, ETA {event.eta_s:.0f} s")
        elif isinstance(event, BlockQuantized):
            self.last_block = event
            self._log(f"block {event.block}/{event.blocks}: max outlier {event.max_outlier_ratio:.1f}x, "
                      f"mean error {event.mean_relative_error:.4f}, RSS {human(event.rss_bytes)}")

    def sample_memory(self) -> None:
        """A point of the memory timeline (the job runs in this process, so its memory is ours)."""
        rss = memory.rss_bytes()
        self.memory_chart.append(time.perf_counter() - self._started, rss, memory.peak_rss_bytes())
        self.changed.add("memory")

    def redraw(self, every_chart: bool = False) -> None:
        """Repaint a chart whose data changed since it was last drawn: the first in turn from `next_chart`, so
        a chart that changes on every event cannot starve the others (`every_chart`: all of them, at the end)."""
        self.ticks += 1
        if self.timer.isActive() and self.ticks % MEMORY_EVERY == 0:
            self.sample_memory()
        due = sorted(self.changed, key=lambda chart: (CHARTS.index(chart) - self.next_chart) % len(CHARTS))
        for chart in due if every_chart else due[:1]:
            self.changed.discard(chart)
            self.redraws += 1
            self.next_chart = (CHARTS.index(chart) + 1) % len(CHARTS)
            if chart == "outliers":
                self.outliers.set_values(self.outlier_ratios)
            elif chart == "errors":
                self.errors.set_values(self.layer_errors)
            elif chart == "channels" and self.current is not None:
                self.channels.set_profile(self.current.name, self.current.channel_absmax)
            elif chart == "memory":
                self.memory_chart.redraw()
        block = self.last_block
        if block is not None:
            self.progress.setValue(block.block)
            eta = f", about {block.eta_s:.0f} s left" if block.block < block.blocks else ""
            self.progress.setFormat(f"block {block.block} of {block.blocks}{eta}")

    def _stop_live(self, status: str) -> None:
        self.timer.stop()
        self.sample_memory()
        self.redraw(every_chart=True)
        self.job = None
        self.progress.setFormat(status)

    def _done(self, result) -> None:
        s = result.summary
        variant = self.session.add_variant(Variant(result.recipe.label, result.model, s, result.layers))
        self._stop_live(f"done: {s['quantized_layers']} layers in {s['seconds']:.1f} s")
        self.progress.setValue(self.progress.maximum())
        self._log(f"done in {s['seconds']:.1f} s; {variant.name} is ready in Chat, Compare and Export")
        self._last_result = (
            f"<b>{variant.name}</b><br>"
            f"time: {s['seconds']:.1f} s, peak memory {human(s['peak_rss_bytes'])}<br>"
            + "".join(f"{html.escape(line)}<br>" for line in memory.quantized_sizes(s, result.model.dtype)) +
            f"bits per weight: <b>{s['bits_per_weight']:.3f}</b> (storage theory {s['theory_bits_per_weight']:.3f})<br>"
            f"mean layer error: {sum(self.layer_errors) / max(len(self.layer_errors), 1):.4f}<br>"
            "Next: chat with it side by side, compare accuracy, or export it.")
        self.result.setText(self._last_result)
        self.finished.emit(variant)

    def _failed(self, message: str) -> None:
        self._stop_live("failed")
        self._log(f"failed: {message}")
        self._show_last_result("the run after it failed", "The run failed; nothing was kept.")

    def _cancelled(self) -> None:
        self._stop_live("cancelled: nothing was kept")
        self._log("cancelled; the model is unchanged and nothing was written")
        self._show_last_result("the run after it was cancelled", "The run was cancelled; nothing was kept.")

    def _show_last_result(self, since: str, otherwise: str) -> None:
        """The last finished run's card, marked as such so it is not taken for the run that just ended."""
        if self._last_result is None:
            self.result.setText(otherwise)
        else:
            self.result.setText(f"<span style='color:{WARN}'><b>Last result</b> ({since})</span><br>{self._last_result}")

    def _busy_changed(self, busy: bool, _title: str) -> None:
        self.cancel_button.setEnabled(busy and self.timer.isActive())  # only this page's own job
        for widget in (self.method, self.bits, self.calib, self.samples, self.seq_len, self.masked, self.keep_head):
            widget.setEnabled(not busy)
        self.act_order.setEnabled(not busy and self.method.currentData() == "gptq")
        for widget in (self.group, self.symmetric):
            widget.setEnabled(not busy and self.method.currentData() not in runtimes.METHODS)
        self._check()

    def _log(self, line: str) -> None:
        self.log.appendPlainText(line)


def _note(method: str) -> str | None:
    runtime = runtimes.BY_METHOD.get(method)
    return runtime.note if runtime is not None else None


def method_tooltip(method: str) -> str:
    """What the method does, and for a library method whether it can run here and what upstream says of it."""
    if method in FINDINGS:
        return FINDINGS[method]
    lines = [METHODS[method]]
    if note := _note(method):
        lines.append(f"Note: {note}.")
    if reason := runtimes.unavailable(method):
        lines.append(f"Not available: {reason}.")
    return "\n".join(lines)
