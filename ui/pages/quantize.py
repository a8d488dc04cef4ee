"""Quantize: a recipe form that offers only what the engine can do, and a live profile while it runs.

Engine events arrive on the GUI thread at whatever rate the job yields them; they only update
plain data here, and a timer draws the charts from the latest data (never once per event) and appends the
Transforms table's new rows (a method's LayerTransformed events). The progress bar shows the engine's work
fraction (`Progress` events) and, between events, fills at the measured rate up to where the unit in flight
should end, while the time left counts down. The pickers read the method table
(`quant.methods.METHODS`): each method's settings, and only the options it reads.
"""

from __future__ import annotations

import html
import time
from dataclasses import replace
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QFrame,
                               QGridLayout, QGroupBox, QHBoxLayout, QLabel, QLineEdit, QPlainTextEdit, QProgressBar,
                               QPushButton, QScrollArea, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QTabWidget,
                               QVBoxLayout, QWidget)

from dllm_studio import memory
from dllm_studio.errors import DllmError, FolderExistsError
from dllm_studio.events import (BlockQuantized, ExportProgress, LayerQuantized, LayerStats, LayerTransformed, Progress,
                                SensitivityProgress, StreamingStarted)
from dllm_studio.memory import RunPeak, human
from dllm_studio.models import open_model
from dllm_studio.profile import OUTLIER_ALARM
from dllm_studio.quant.budget import budget_plan
from dllm_studio.quant.pipeline import check_supported, quantize, working_set
from dllm_studio.quant.streaming import FromShards, quantize_to_folder, streaming_problem
from dllm_studio.quant import kernels, runtimes
from dllm_studio.quant.methods import METHODS as SPECS
from dllm_studio.quant.methods import QUANTIZED_TENSORS
from dllm_studio.quant.recipe import METHODS, QuantRecipe
from ui.bit_map import BitMap
from ui.charts import BarChart, ChannelProfile, MemoryChart
from ui.pages.export import slug
from ui.paths import models_dir
from ui.session import Session, Variant
from ui.theme import BAD, FIT_COLORS, GOOD, WARN
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
    "smoothquant": "SmoothQuant divides activation outliers out per channel and folds the scales into the weights. "
                   "Near-lossless at W8A8 in the seed study (0.2–2.5% drop), but it collapses at W4A4 (29–37% on "
                   "general tasks, near zero on math and code): dLLM outliers span too many tokens.",
    "quarot": "QuaRot rotates the residual stream by a Hadamard so no channel stands out, then rounds weights "
              "with GPTQ. Near-lossless at W8A8; rotation holds up at W4A4 (3.9–6.6% drop) where smoothing fails.",
    "duquant": "DuQuant smooths, rotates in blocks and permutes channels so outliers spread evenly. The seed "
               "study's recommendation for weight-and-activation: W4A4 loses 2.5–5.1% on general tasks, ahead of QuaRot.",
    "tlq": "LRQ-DiT's twin-log weights: log-spaced levels fitted per row, apart for positive and negative weights, "
           "for long-tailed weights. Made for image diffusion transformers, untested on dLLMs: dLLM Studio is first to try it.",
    "ars": "LRQ-DiT's adaptive rotation: per layer a Hadamard where activations are calm, DuQuant's rotation where they "
           "fluctuate (J ≥ 1), over twin-log weights. Untested on dLLMs before: dLLM Studio is first to try it.",
}
ABITS_ROLE = Qt.ItemDataRole.UserRole + 1  # the bits combo's activation bits, beside the weight bits (UserRole)
SORT_ROLE = Qt.ItemDataRole.UserRole  # a Transforms cell's number to sort by
TRANSFORM_COLUMNS = ("Layer", "Role", "Transform", "Kurtosis", "Max / median", "Max |x|", "Detail")
GROUP_SIZES = ((128, "128 (default)"), (64, "64"), (32, "32"), (0, "per output channel"))
# The charts take turns: each tick repaints at most one (5-25 ms on 2 cores), since four in one frame stalled the
# window for 50-130 ms. Every changed chart is still repainted within four ticks, whatever the event rate.
REDRAW_MS = 50
CHARTS = ("outliers", "channels", "errors", "memory")  # the order they take turns in
MEMORY_EVERY = 6  # redraw ticks per memory sample (about 3 a second)
BAR_MS = 250  # the progress bar's fill and countdown between engine events
BAR_STEPS = 1000  # the bar's range: the work fraction in tenths of a percent
# How the layers' bits are chosen: one for all, or planned per layer (`quant.budget`) to a budget of bytes or bits.
PRECISIONS = (("Uniform: every layer at the bits above", "uniform"), ("Memory budget (GB of weights)", "budget"),
              ("Target bits per weight", "bpw"))
STREAM_TIP = ("Read one block at a time from the model's files and write the quantized model straight to the folder: "
              "the memory of one block, not of the whole model. A cancelled run keeps its finished blocks; Start "
              "again with the same recipe and folder resumes.")

class QuantizePage(QWidget):
    finished = Signal(object)  # the Variant made
    streamed = Signal(str, dict)  # a streaming run's folder and export report
    open_requested = Signal(str)  # a folder to open as the quantized model (the Models page loads it)

    def __init__(self, session: Session, settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.job = None
        self._calib_file: str | None = None
        self._last_result: str | None = None  # the result card of the last run that finished, kept past a cancel
        self._stream_problem: str | None = None  # why the open model cannot stream (`streaming_problem`)
        self._stream_chosen = False  # the user set the streaming box for this model: no longer checked for them
        self._custom_out = False  # the user typed or browsed an output folder: no longer suggested
        self._streamed_folder: str | None = None
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
        self.alpha = QDoubleSpinBox(minimum=0.0, maximum=1.0, singleStep=0.05, decimals=2, objectName="alphaSpin")
        self.clip = QDoubleSpinBox(minimum=0.5, maximum=1.0, singleStep=0.05, decimals=2, objectName="clipSpin")
        self.kernel_note = QLabel(wordWrap=True, objectName="kernelNote", textFormat=Qt.TextFormat.RichText)
        self.calib = QComboBox(objectName="calibCombo")
        self.calib.addItem("Built-in: the demo tasks and text", "builtin")
        self.calib.addItem("A text file…", "file")
        self.samples = QSpinBox(minimum=1, maximum=1024, objectName="samplesSpin")
        self.seq_len = QSpinBox(minimum=8, maximum=8192, singleStep=64, value=256)
        self.masking = QComboBox(objectName="calibMaskingCombo")
        for label, data in (("Stratified ratios over (0, 1)", "stratified"), ("The sampler's timesteps", "timesteps"),
                            ("None (clean text)", "none")):
            self.masking.addItem(label, data)
        self.masking.setToolTip(
            "A dLLM never sees clean text while it answers: every step's input is partly masked, so calibration "
            "masks its inputs too. Stratified ratios: each sequence masked at its own ratio, spread evenly from "
            "0 to 1. The sampler's timesteps: each sequence looks like the answer before one of the sampler's "
            "steps, earlier blocks done, later blocks all masks. None: clean text, as the seed study calibrated.")
        self.keep_head = QCheckBox("Keep the LM head in full precision")
        self.keep_head.setChecked(True)
        self.precision = QComboBox(objectName="precisionCombo")
        for label, data in PRECISIONS:
            self.precision.addItem(label, data)
        self.budget = QDoubleSpinBox(objectName="budgetSpin", minimum=0.001, maximum=10_000.0, decimals=3,
                                     singleStep=0.1, value=4.0)
        self.budget.setAccessibleName("Memory budget or target bits per weight")
        self.streaming = QCheckBox("Stream from the checkpoint's shards into a folder", objectName="streamingCheck")
        self.streaming.setToolTip(STREAM_TIP)
        self.out_edit = QLineEdit(objectName="streamOut")
        self.out_edit.setAccessibleName("Output folder of a streaming run")
        self.browse_button = QPushButton("Browse…", objectName="streamBrowse")
        self.stream_note = QLabel(wordWrap=True, objectName="streamNote", textFormat=Qt.TextFormat.RichText)
        self.preflight = QLabel(wordWrap=True, objectName="preflightLabel")
        self.start_button = QPushButton("&Start", objectName="startButton")
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton")
        self.cancel_button.setToolTip("Stop within a second (Esc); nothing is kept or written (a streaming "
                                      "run keeps its finished blocks for a rerun).")
        self.cancel_button.setEnabled(False)

        form = QFormLayout()
        for label, widget in (("&Method:", self.method), ("&Bits:", self.bits),
                              ("Alp&ha (migration):", self.alpha), ("Activation cl&ip:", self.clip),
                              ("&Group size:", self.group), ("&Calibration:", self.calib), ("Sa&mples:", self.samples),
                              ("Sequence &length:", self.seq_len),
                              ("Calibration mas&king:", self.masking), ("Mi&xed precision:", self.precision),
                              ("Bu&dget:", self.budget)):
            caption = QLabel(label)
            caption.setBuddy(widget)
            form.addRow(caption, widget)
        self.out_row = QWidget()
        out_layout = QHBoxLayout(self.out_row)
        out_layout.setContentsMargins(0, 0, 0, 0)
        out_layout.addWidget(self.out_edit, 1)
        out_layout.addWidget(self.browse_button)
        recipe_box = QGroupBox("Recipe")
        box = QVBoxLayout(recipe_box)
        box.addLayout(form)
        # Below the form, not in a row of it: a wrapped label spanning a form row is clipped to two lines.
        for widget in (self.kernel_note, self.symmetric, self.act_order, self.keep_head, self.streaming, self.out_row,
                       self.stream_note, self.preflight):
            box.addWidget(widget)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_button)
        buttons.addWidget(self.cancel_button)
        box.addLayout(buttons)
        self.result = QLabel("Quantize to see the time, size and bits per weight here.", wordWrap=True,
                             objectName="resultCard", textFormat=Qt.TextFormat.RichText,
                             alignment=Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.result.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_button = QPushButton("Open it for &Chat", objectName="openStreamed", visible=False)
        self.open_button.setToolTip("Load the folder this run wrote as the quantized model (Chat, Compare, Export).")
        result_box = QGroupBox("Result")
        result_layout = QVBoxLayout(result_box)
        result_layout.addWidget(self.result)
        result_layout.addWidget(self.open_button)
        self.bit_map = BitMap()
        self.plan_label = QLabel(wordWrap=True, objectName="planLabel")
        self.plan_box = QGroupBox("Bit plan", objectName="planBox", visible=False)
        plan_layout = QVBoxLayout(self.plan_box)
        plan_layout.addWidget(self.bit_map, 1)
        plan_layout.addWidget(self.plan_label)
        side = QVBoxLayout()
        side.addWidget(recipe_box)
        side.addWidget(self.plan_box)  # as tall as its map: the recipe form above must never be squeezed
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
        profile = QWidget()
        profile.setLayout(charts)
        self.transforms_table = QTableWidget(0, len(TRANSFORM_COLUMNS), objectName="transformsTable")
        self.transforms_table.setHorizontalHeaderLabels(TRANSFORM_COLUMNS)
        self.transforms_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.transforms_table.verticalHeader().setVisible(False)
        self.transforms_table.horizontalHeader().setStretchLastSection(True)
        self.transforms_table.setSortingEnabled(True)
        self.transforms_table.setAccessibleName("Transforms per layer")
        self.transforms_hint = QLabel(wordWrap=True, objectName="transformsHint")
        transforms = QWidget()
        transforms_layout = QVBoxLayout(transforms)
        transforms_layout.addWidget(self.transforms_hint)
        transforms_layout.addWidget(self.transforms_table, 1)
        self.live_tabs = QTabWidget(objectName="liveTabs")
        self.live_tabs.addTab(profile, "&Profile")
        self.live_tabs.addTab(transforms, "&Transforms")
        live_layout.addWidget(self.live_tabs, 1)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(live)
        splitter.addWidget(self.log)
        splitter.setSizes([600, 140])

        layout = QHBoxLayout(self)
        side_widget = QWidget()
        side_widget.setLayout(side)
        # Scrolled, not squeezed, when the recipe, the bit plan and the result are taller than the window.
        side_scroll = QScrollArea(widgetResizable=True, frameShape=QFrame.Shape.NoFrame)
        side_scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
        side_scroll.setWidget(side_widget)
        side_widget.setMaximumWidth(380)
        side_scroll.setFixedWidth(380 + side_scroll.verticalScrollBar().sizeHint().width())
        layout.addWidget(side_scroll)
        layout.addWidget(splitter, 1)

        self.timer = QTimer(self, interval=REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
        self.bar_timer = QTimer(self, interval=BAR_MS)
        self.bar_timer.timeout.connect(self._advance_bar)
        self.redraws = self.ticks = self.next_chart = 0

        self._load_settings()
        self.method.currentIndexChanged.connect(self._method_changed)
        self.bits.currentIndexChanged.connect(self._setting_changed)
        for widget in (self.group, self.calib, self.masking):
            widget.currentIndexChanged.connect(self._recipe_changed)
        for widget in (self.samples, self.seq_len, self.alpha, self.clip):
            widget.valueChanged.connect(self._recipe_changed)
        for widget in (self.symmetric, self.act_order, self.keep_head):
            widget.toggled.connect(self._recipe_changed)
        self.calib.activated.connect(self._calib_chosen)
        self.precision.currentIndexChanged.connect(self._precision_changed)
        self.budget.valueChanged.connect(self._recipe_changed)
        self.streaming.clicked.connect(self._streaming_chosen)  # clicked: the user's choice, not the auto-check
        self.streaming.toggled.connect(self._recipe_changed)
        self.out_edit.textEdited.connect(self._out_edited)
        self.browse_button.clicked.connect(self._browse_out)
        self.open_button.clicked.connect(lambda: self.open_requested.emit(self._streamed_folder))
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        session.model_changed.connect(self._model_changed)
        session.busy_changed.connect(self._busy_changed)
        # The preflight shows the free memory every face shows; while a job runs it keeps the figure it started on.
        session.free_memory_changed.connect(lambda _free: self.session.busy or self._check())
        self._precision_changed()
        self._model_changed()

    # ---- the recipe form ----------------------------------------------------------------------------
    def _load_settings(self) -> None:
        s = self.settings
        self.method.setCurrentIndex(max(self.method.findData(s.get("quantize/method")), 0))
        self._fill_bits(s.get("quantize/wbits"), s.get("quantize/abits"))
        self._show_defaults()
        for key, box in (("quantize/alpha", self.alpha), ("quantize/clip", self.clip)):
            if stored := s.get(key):  # "" keeps the method's default
                box.setValue(float(stored))
        self.group.setCurrentIndex(max(self.group.findData(s.get("quantize/group_size")), 0))
        self.samples.setValue(s.get("quantize/calib_samples"))
        masking = s.get("quantize/calib_masking") if s.get("quantize/masked_calib") else "none"
        self.masking.setCurrentIndex(max(self.masking.findData(masking), 0))

    @property
    def spec(self):
        return SPECS[self.method.currentData()]

    def _fill_bits(self, wbits: int | None = None, abits: int | None = None) -> None:
        """Exactly the (weight, activation) bit settings the chosen method produces."""
        wbits, abits = wbits or self.bits.currentData(), abits or self.bits.currentData(ABITS_ROLE)
        spec = self.spec
        self.bits.blockSignals(True)
        self.bits.clear()
        for w, a in spec.settings:
            self.bits.addItem(setting_text(spec, w, a), w)
            self.bits.setItemData(self.bits.count() - 1, a, ABITS_ROLE)
        same = [i for i, setting in enumerate(spec.settings) if setting == (wbits, abits)]
        self.bits.setCurrentIndex(same[0] if same else max(self.bits.findData(wbits), self.bits.findData(4), 0))
        self.bits.blockSignals(False)

    def _show_defaults(self, *boxes: QDoubleSpinBox) -> None:
        """The method's own alpha and clip (a method without a migration strength migrates nothing: 0)."""
        defaults = {self.alpha: self.spec.alpha or 0.0, self.clip: self._default_clip()}
        for box in boxes or defaults:
            box.blockSignals(True)
            box.setValue(defaults[box])
            box.blockSignals(False)

    def _method_changed(self) -> None:
        self._fill_bits()
        self._show_defaults()
        if "act_order" not in self.spec.options:
            self.act_order.setChecked(False)  # an option the method lacks: disabled, not silently ignored
        self._sync_options()
        self._recipe_changed()

    def _default_clip(self) -> float:
        return self.spec.default_clip(self.bits.currentData(ABITS_ROLE) or 16)

    def _setting_changed(self) -> None:
        self._show_defaults(self.clip)  # the default depends on the activation bits
        self._sync_options()
        self._recipe_changed()

    def _clip_applies(self) -> bool:
        return self.spec.reads_clip(self.bits.currentData(ABITS_ROLE) or 16)

    def _grid_fixed(self) -> str | None:
        """Why the group size and symmetry do not apply to the chosen setting (the engine's reason), or None."""
        spec, wbits, abits = self.spec, self.bits.currentData(), self.bits.currentData(ABITS_ROLE) or 16
        fixed = spec.fixed_grid(wbits, abits)
        return fixed and f"{spec.name.upper()} W{wbits}A{abits} rounds weights with {fixed}"

    def _sync_options(self) -> None:
        """Enable exactly the options the chosen method and setting read, saying why the others do not apply."""
        spec, busy = self.spec, self.session.busy
        name = spec.name.upper()
        self.method.setToolTip(method_tooltip(spec.name))
        self.act_order.setEnabled(not busy and "act_order" in spec.options)
        alpha, clip = "alpha" in spec.options, self._clip_applies()
        self.alpha.setEnabled(not busy and alpha)
        self.alpha.setToolTip(f"Migration strength: 0 leaves the activations' outliers, 1 moves all of their range "
                              f"into the weights ({name}'s default: {spec.alpha:g})." if alpha
                              else f"{name} migrates nothing from activations into weights.")
        self.clip.setEnabled(not busy and clip)
        self.clip.setToolTip(f"Each token's activation scale covers this share of its largest magnitude; larger "
                             f"values saturate ({name}'s default here: {self._default_clip():g})." if clip
                             else "This setting quantizes no activations to clip.")
        fixed = self._grid_fixed()
        for widget, what in ((self.group, "the group size"), (self.symmetric, "the symmetric grid option")):
            widget.setEnabled(not busy and fixed is None)
            widget.setToolTip(f"{fixed}; {what} does not apply." if fixed else "")
        if spec.transforms:
            self.transforms_hint.setText(f"What {name}'s transform did to each layer's input before rounding, as "
                                         "layers are quantized: kurtosis of the channel RMS, largest over median "
                                         f"channel, largest |x|; <span style='color:{GOOD}'><b>green</b></span>: "
                                         "reduced.")
        else:
            self.transforms_hint.setText(f"{name} rounds each layer as it is: no transform changes its inputs, so "
                                         "there is nothing to show here.")
        self.transforms_table.setVisible(spec.transforms)
        self._sync_mixed_and_streaming()

    def _sync_mixed_and_streaming(self) -> None:
        """Mixed precision only where the method takes it (the engine's `check_mixed_bits` says why not), streaming
        only where the model can stream (`streaming_problem`), and always for a model only described (too big to
        load)."""
        busy, planned = self.session.busy, self.precision.currentData() != "uniform"
        try:
            replace(self.recipe(uniform=True), target_bpw=1.0).check_mixed_bits()
            mixed_problem = None
        except DllmError as exc:
            mixed_problem = str(exc)
        if mixed_problem and planned:
            self.precision.setCurrentIndex(0)  # an option that cannot apply is switched off, never ignored
            return  # _precision_changed syncs again
        self.precision.setEnabled(not busy and not mixed_problem)
        self.precision.setToolTip(mixed_problem or "Each layer gets the bits that cost the least error for the "
                                                   "bytes allowed, measured on the calibration set first.")
        self.budget.setEnabled(not busy and planned)
        problem = self._stream_problem
        # A model too big to load is only described: streaming is the one way to quantize it.
        self.streaming.setEnabled(not busy and problem is None and not self.session.described_only)
        self.streaming.setToolTip(f"Not available: {problem}" if problem else STREAM_TIP)
        if problem and self.streaming.isChecked():
            self.streaming.setChecked(False)
        self.out_row.setVisible(self.streaming.isChecked())
        self.stream_note.setVisible(bool(self.stream_note.text()))
        self.out_edit.setEnabled(not busy)
        self.browse_button.setEnabled(not busy)

    def _precision_changed(self) -> None:
        mode = self.precision.currentData()
        self.budget.blockSignals(True)
        if mode == "bpw":
            self.budget.setSuffix(" bits")
            self.budget.setDecimals(2)
            self.budget.setValue(max(min(self.spec.weight_bits), self.bits.currentData() - 1))
        else:
            self.budget.setSuffix(" GB")
            self.budget.setDecimals(3)
            model = self.session.model
            if model is not None and mode == "budget":  # start below the uniform size, so the plan has work
                self.budget.setValue(round(0.85 * model.memory_estimate(self.bits.currentData(), 128) / 1e9, 3))
        self.budget.blockSignals(False)
        self._sync_options()
        self._recipe_changed()

    def _model_changed(self) -> None:
        model = self.session.model
        try:
            self._stream_problem = (streaming_problem(model) if model is not None else "no model is open")
        except DllmError as exc:
            self._stream_problem = str(exc)
        except (OSError, ValueError):  # a model not loaded from a folder of safetensors
            self._stream_problem = "its weights are not in a folder of safetensors files"
        self._stream_chosen = False
        described = self.session.described_only and not self._stream_problem
        self.streaming.setChecked(described)
        self.stream_note.setText(f"<span style='color:{WARN}'>{html.escape(str(model.source))} is too big to load "
                                 "here, so it is only described: its blocks stream from the checkpoint's files one at "
                                 "a time, into the folder below.</span>" if described else "")
        self._sync_options()
        self._recipe_changed()

    def _streaming_chosen(self) -> None:
        self._stream_chosen = True
        self.stream_note.clear()

    def _out_edited(self, text: str) -> None:
        self._custom_out = bool(text.strip())  # clearing the field brings the suggestion back
        self._check()

    def _browse_out(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Write the quantized model into", str(models_dir()))
        if folder:
            self.set_output_folder(folder)

    def set_output_folder(self, folder: str) -> None:
        self.out_edit.setText(folder)
        self._out_edited(folder)

    def _suggest_out(self, recipe: QuantRecipe) -> None:
        model = self.session.model
        if not self._custom_out and model is not None:
            self.out_edit.setText(str(models_dir() / f"{slug(Path(model.path).name)}-{slug(recipe.label)}"))

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

    def recipe(self, uniform: bool = False) -> QuantRecipe:
        """The recipe the form describes (`uniform`: without the mixed-precision budget)."""
        mode = "uniform" if uniform else self.precision.currentData()
        calib = self._calib_file if self.calib.currentData() == "file" and self._calib_file else "builtin"
        masking = self.masking.currentData()
        spec, fixed = self.spec, self._grid_fixed() is not None
        alpha, clip = round(self.alpha.value(), 2), round(self.clip.value(), 2)
        return QuantRecipe(method=spec.name, wbits=self.bits.currentData(),
                           abits=self.bits.currentData(ABITS_ROLE) or 16,
                           group_size=QuantRecipe.group_size if fixed else self.group.currentData() or None,
                           symmetric=self.symmetric.isChecked() and not fixed,
                           act_order=self.act_order.isChecked() and "act_order" in spec.options,
                           # only what the user changed: None leaves the method's default to the engine
                           alpha=alpha if "alpha" in spec.options and alpha != spec.alpha else None,
                           clip=clip if self._clip_applies() and clip != self._default_clip() else None,
                           calib=calib, calib_samples=self.samples.value(),
                           seq_len=self.seq_len.value(), masked_calib=masking != "none",
                           calib_masking=QuantRecipe.calib_masking if masking == "none" else masking,
                           skip=("head",) if self.keep_head.isChecked() else (),
                           memory_budget=round(self.budget.value() * 1e9) if mode == "budget" else None,
                           target_bpw=round(self.budget.value(), 2) if mode == "bpw" else None)

    def _recipe_changed(self) -> None:
        s, recipe = self.settings, self.recipe()
        s.set("quantize/method", recipe.method)
        s.set("quantize/wbits", recipe.wbits)
        s.set("quantize/abits", recipe.abits)
        s.set("quantize/alpha", "" if recipe.alpha is None else str(recipe.alpha))
        s.set("quantize/clip", "" if recipe.clip is None else str(recipe.clip))
        s.set("quantize/group_size", self.group.currentData())
        s.set("quantize/calib_samples", self.samples.value())
        s.set("quantize/masked_calib", recipe.masked_calib)
        s.set("quantize/calib_masking", recipe.calib_masking)
        self._show_kernel_note(recipe)
        self._suggest_out(recipe)
        self._sync_mixed_and_streaming()
        self._check()

    def _show_kernel_note(self, recipe: QuantRecipe) -> None:
        """For a setting that quantizes activations: how they run on this machine, and which tensors they are."""
        model = self.session.model
        how = kernels.activation_kernel(recipe, model.device if model is not None else "cpu")
        self.kernel_note.setVisible(bool(how))
        self.kernel_note.setText(f"{_kernel_line(recipe, how)}<br>{_sentence(QUANTIZED_TENSORS)}" if how else "")

    def _check(self) -> bool:
        """Validate the recipe and estimate its memory against free RAM; say what is wrong, before starting."""
        model = self.session.model
        ok = False
        try:
            if model is None:
                raise DllmError("Open a model on the Models page first.")
            recipe = self.recipe().validate()
            check_supported(model, weights=False)  # the run checks the weights, off this thread
        except DllmError as exc:
            self.preflight.setText(f"<span style='color:{BAD}'>{exc}</span>")
        else:
            parts = working_set(model, recipe)
            needed = sum(parts.values()) - parts["model"]  # the model itself is already in memory
            free = self.session.free_memory
            verdict = memory.fit(needed, free)
            if verdict == "won't fit":
                self._stream_instead(needed, free, recipe)
            streaming = self.streaming.isChecked()
            if streaming:  # at most one block of it is ever held (the open model is not used)
                parts = working_set(model, recipe, streaming=True)
                needed = sum(parts.values())
                verdict = memory.fit(needed, free)
            colour = FIT_COLORS[verdict]
            problem = self._output_problem() if streaming else None
            largest = memory.largest_part({p: b for p, b in parts.items() if streaming or p != "model"})
            self.preflight.setText(
                (f"Streaming holds about <b>{human(needed)}</b> at most (one block at a time; " if streaming else
                 f"Needs about <b>{human(needed)}</b> more memory (") + f"{largest}); "
                f"{human(free)} free: "
                f"<span style='color:{colour}'><b>{verdict}</b></span>.<br>Result: {recipe.label}, "
                + (f"bits planned per layer to {_target(recipe)} before quantizing."
                   if recipe.memory_budget is not None or recipe.target_bpw is not None else
                   f"about {human(model.memory_estimate(recipe.wbits, recipe.group_size or 128))} of weights.")
                + (f"<br><span style='color:{WARN}'>Note: {note}.</span>" if (note := _note(recipe.method)) else "")
                + (f"<br><span style='color:{BAD}'>{html.escape(problem)}</span>" if problem else ""))
            self.preflight.setToolTip("\n".join(f"{name}: {human(b)}" for name, b in parts.items()))
            ok = verdict != "won't fit" and problem is None
        self.start_button.setEnabled(ok and not self.session.busy)
        return ok

    def _stream_instead(self, needed: int, free: int, recipe: QuantRecipe) -> None:
        """Check streaming for the user, saying why, when the in-memory run would not fit and the model can stream
        (unless they set the box themselves, or plan a budget, which streaming cannot take yet)."""
        if self._stream_chosen or self._stream_problem or self.streaming.isChecked():
            return
        self.streaming.blockSignals(True)  # _check is running: no second pass through _recipe_changed
        self.streaming.setChecked(True)
        self.streaming.blockSignals(False)
        self._sync_mixed_and_streaming()
        self.stream_note.setText(f"<span style='color:{WARN}'>Checked for you: quantizing in memory would need about "
                                 f"{human(needed)} more and {human(free)} is free, so the blocks stream from the "
                                 "checkpoint's files one at a time instead.</span>")
        self.stream_note.setVisible(True)

    def _output_problem(self) -> str | None:
        text = self.out_edit.text().strip()
        if not text:
            return "Choose an output folder for the streamed model."
        if Path(text).expanduser().exists():
            return f"{FolderExistsError(Path(text).expanduser())}"
        return None

    # ---- running ------------------------------------------------------------------------------------
    def start(self) -> None:
        """Quantize: streaming into a folder, planned to a budget first, or in memory (see the module docstring)."""
        if self.session.busy:
            return
        self.session.refresh_free_memory()  # decide on what is free now (every face shows the figure read here)
        if not self._check():
            return
        model, recipe = self.session.model, self.recipe()
        self._begin(model, recipe)
        streaming = self.streaming.isChecked()
        out = Path(self.out_edit.text().strip()).expanduser()
        then = ((lambda planned: self._start_streaming(model, planned, out)) if streaming
                else (lambda planned: self._start_quantize(model, planned)))
        if recipe.memory_budget is not None or recipe.target_bpw is not None:
            self._start_plan(model, recipe, then, streaming)
        else:
            self.plan_box.setVisible(False)  # an earlier plan's map would be taken for this run's bits
            then(recipe)

    def _begin(self, model, recipe: QuantRecipe) -> None:
        """A new run's blank charts, log and progress."""
        self._reset_data()
        self.memory_chart.start_run()
        self._run_peak = RunPeak()  # the chart's dashed line: this run's peak, not the process's
        self.transforms_table.setRowCount(0)
        self.transforms_table.setVisible(recipe.spec.transforms)
        self.log.clear()
        self._show_last_result("a new run is under way", "Quantizing: the result appears here when it is done.")
        self.open_button.setVisible(False)
        self.progress.setRange(0, BAR_STEPS)
        self.progress.setValue(0)
        self.progress.setFormat(f"starting {recipe.label}…")
        self._log(f"{recipe.label} on {model.source}: {model.num_layers} blocks, "
                  f"{recipe.calib_samples} x {recipe.seq_len} calibration tokens"
                  f"{f' (masked: {recipe.calib_masking})' if recipe.masked_calib else ''}")
        self._started = time.perf_counter()
        self.sample_memory()
        self.timer.start()
        self.bar_timer.start()

    def _run(self, title: str, make_job, on_done) -> None:
        self.job = self.session.start(title, stream(make_job), on_event=self._on_event, on_done=on_done,
                                      on_failed=self._failed, on_cancelled=self._cancelled)

    def _start_quantize(self, model, recipe: QuantRecipe) -> None:
        self._run(f"Quantizing {recipe.label}", lambda cancel: quantize(model, recipe, cancel), self._done)

    def _start_plan(self, model, recipe: QuantRecipe, then, streaming: bool) -> None:
        """Measure each layer's sensitivity and plan its bits (`budget_plan`; streaming, with the blocks read from
        the shards), then `then(planned recipe)` quantizes with the plan."""
        self.plan_box.setVisible(True)
        self.plan_box.setTitle("Bit plan: measuring sensitivity…")
        self.progress.setFormat("measuring sensitivity…")

        def job(cancel):
            if not streaming:
                return (yield from budget_plan(model, recipe, cancel))
            described = yield from self._described(model, cancel)
            return (yield from budget_plan(described, recipe, cancel, store=FromShards(described)))

        self._run(f"Planning bits for {recipe.label}", job, lambda plan: self._planned(recipe, plan, then))

    def _planned(self, recipe: QuantRecipe, plan, then) -> None:
        self.bit_map.set_plan(plan)
        counts = {}
        for bits in plan.bits.values():
            counts[bits] = counts.get(bits, 0) + 1
        target = (f"target {plan.target_bpw:g} bits per weight" if plan.target_bpw is not None
                  else f"budget {human(plan.memory_budget)}")
        self.plan_box.setTitle("Bit plan")
        self.plan_label.setText(f"{', '.join(f'{n} at {b} bits' for b, n in sorted(counts.items()))}; weights "
                                f"<b>{human(plan.total_bytes)}</b> ({target}); {plan.bits_per_weight:.3f} bits per "
                                "quantized weight.")
        self._log(plan.text())
        self.progress.setFormat("quantizing with the plan…")
        then(plan.apply(recipe))

    def _described(self, model, cancel):
        """The open model described again from its folder on meta (no weight read), at the dtype it runs at; one
        too big to load at all, at the fast dtype here, since streaming never holds it whole."""
        whole = not self.session.described_only
        return open_model(model.path, dtype=model.dtype if whole else "auto", device="meta", check_memory=whole,
                          cancel=cancel)

    def _start_streaming(self, model, recipe: QuantRecipe, out: Path) -> None:
        """Describe the open model again from its folder on meta (no weight read) and stream it into `out`."""
        self._stream_out = out
        self.result.setText(f"Streaming into {html.escape(str(out))}: the result appears here when it is written.")

        def job(cancel):
            described = yield from self._described(model, cancel)
            return (yield from quantize_to_folder(described, recipe, out, cancel=cancel))

        self._run(f"Quantizing {recipe.label} into {out.name}", job, self._streamed)

    def cancel(self) -> None:
        if self.job is not None:
            self.job.cancel()
            self.bar_timer.stop()  # its text would replace this one
            self.progress.setFormat("cancelling…")

    def _reset_data(self) -> None:
        self.outlier_ratios: list[float] = []
        self.layer_errors: list[float] = []
        self.current: LayerStats | None = None
        self.started_streaming: StreamingStarted | None = None
        self.export_progress: ExportProgress | None = None
        self.work: Progress | None = None  # the latest, and when it came (the bar fills on from there)
        self.work_at = 0.0
        self.transformed: list[LayerTransformed] = []  # in arrival order; the table takes new ones each tick
        self.changed = set(CHARTS)  # the charts to repaint

    def _on_event(self, event) -> None:
        if isinstance(event, StreamingStarted):
            self.started_streaming = event
            self.progress.setFormat(f"streaming from {event.shards} shards…")
            self._log(f"streaming from {event.shards} shard{'s' * (event.shards != 1)}: blocks {event.first_block}-"
                      f"{event.blocks} of {event.blocks}" + (f" ({event.note})" if event.note else ""))
        elif isinstance(event, SensitivityProgress):  # one per block: cheap enough to show at once
            self.progress.setRange(0, event.blocks)
            self.progress.setValue(event.block)
            self.progress.setFormat(f"measuring sensitivity, block {event.block} of {event.blocks}")
        elif isinstance(event, ExportProgress):
            self.export_progress = event
        elif isinstance(event, Progress):
            if self.work is None:  # a bit plan's sensitivity pass counted blocks on this bar
                self.progress.setRange(0, BAR_STEPS)
                self.progress.setValue(0)
            self.work, self.work_at = event, time.perf_counter()
            self._advance_bar()
        elif isinstance(event, LayerStats):
            self.outlier_ratios.append(event.outlier_ratio)
            self.current = event
            self.changed |= {"outliers", "channels"}
        elif isinstance(event, LayerTransformed):
            self.transformed.append(event)
            self._log(f"  {event.name}: {event.transform}, kurtosis {event.kurtosis_before:.3g} → "
                      f"{event.kurtosis_after:.3g}, max/median {event.outlier_ratio_before:.3g} → "
                      f"{event.outlier_ratio_after:.3g}{f' ({event.detail})' if event.detail else ''}")
        elif isinstance(event, LayerQuantized):
            self.layer_errors.append(event.relative_error)
            self.changed.add("errors")
            self._log(f"  {event.name}: error {event.relative_error:.4f} ({event.seconds:.2f} s)  "
                      f"layer {event.layer}/{event.layers}, ETA {event.eta_s:.0f} s")
        elif isinstance(event, BlockQuantized):
            self._log(f"block {event.block}/{event.blocks}: max outlier {event.max_outlier_ratio:.1f}x, "
                      f"mean error {event.mean_relative_error:.4f}, RSS {human(event.rss_bytes)}")

    def sample_memory(self) -> None:
        """A point of the memory timeline (the job runs in this process, so its memory is ours)."""
        rss = memory.rss_bytes()
        self.memory_chart.append(time.perf_counter() - self._started, rss, self._run_peak.sample(rss))
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
        self._append_transforms()
        writing = self.export_progress
        if writing is not None:
            self.progress.setFormat(f"writing the folder: {writing.stage} {writing.done} of {writing.total}")

    def _advance_bar(self) -> None:
        """The bar at the latest work fraction, moved on by the time since at the measured rate (the rest of the
        work over the time left), but never past the end of the unit in flight; the time left counted down."""
        work = self.work
        if work is None or self.export_progress is not None or not self.bar_timer.isActive():
            return
        since = time.perf_counter() - self.work_at
        fraction = work.fraction
        if work.eta_s:
            fraction = min(fraction + since * (1 - fraction) / work.eta_s, work.until)
        self.progress.setValue(max(self.progress.value(), round(fraction * BAR_STEPS)))
        left = ("estimating the time left" if work.eta_s is None
                else f"about {max(work.eta_s - since, 0):.0f} s left")
        source = f"streaming from {self.started_streaming.shards} shards: " if self.started_streaming else ""
        self.progress.setFormat(f"{source}{work.doing}: {self.progress.value() / BAR_STEPS:.0%}, {left}")

    def _append_transforms(self) -> None:
        """The Transforms table's rows for the events that arrived since the last tick (a few per tick)."""
        table = self.transforms_table
        first = table.rowCount()
        if first >= len(self.transformed):
            return
        table.setSortingEnabled(False)  # rows inserted under a sort would land wherever it puts them
        table.setRowCount(len(self.transformed))
        for row, event in enumerate(self.transformed[first:], first):
            short = event.name if event.block is None else f"{event.block}.{event.name.rsplit('.', 1)[-1]}"
            layer = _Cell(short, row)  # sorts back into quantization order
            layer.setToolTip(event.name)
            detail = _Cell(event.detail)
            detail.setToolTip(event.detail)
            cells = (layer, _Cell(event.role), _Cell(event.transform),
                     _change(event.kurtosis_before, event.kurtosis_after),
                     _change(event.outlier_ratio_before, event.outlier_ratio_after),
                     _change(event.absmax_before, event.absmax_after), detail)
            for column, cell in enumerate(cells):
                table.setItem(row, column, cell)
        if first == 0:  # sized once, not on every row (that cost 8-27 ms a tick), wide enough for later names
            table.resizeColumnsToContents()
            metrics, pad = table.fontMetrics(), 16
            for column, widest in ((0, "00.attn_out"), (1, "gate_up")):
                table.setColumnWidth(column, max(table.columnWidth(column), metrics.horizontalAdvance(widest) + pad))
        table.setSortingEnabled(True)

    def _stop_live(self, status: str) -> None:
        self.timer.stop()
        self.bar_timer.stop()
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
            + _activations_line(result) +
            "Next: chat with it side by side, compare accuracy, or export it.")
        self.result.setText(self._last_result)
        self.finished.emit(variant)

    def _streamed(self, result) -> None:
        """A streaming run wrote its folder: say where, and offer to open it (its model in memory is only a
        description on meta, so it becomes a variant by loading the folder)."""
        quantized, report = result
        s, folder = quantized.summary, report["path"]
        self._streamed_folder = folder
        self._stop_live(f"done: {s['quantized_layers']} layers in {s['seconds']:.1f} s, written to {Path(folder).name}")
        self.progress.setValue(self.progress.maximum())
        shards = report.get("shards", 1)
        self._log(f"done in {s['seconds']:.1f} s; wrote {folder} ({shards} shard{'s' * (shards != 1)}, "
                  f"{human(report['total_bytes'])})")
        note = self.started_streaming.note if self.started_streaming is not None else ""
        self._last_result = (
            f"<b>{html.escape(quantized.recipe.label)}</b>, streamed<br>"
            f"written to <b>{html.escape(folder)}</b>: {shards} shard{'s' * (shards != 1)}, "
            f"{human(report['total_bytes'])} in all<br>"
            f"time: {s['seconds']:.1f} s, peak memory {human(s['peak_rss_bytes'])}"
            + (f" ({html.escape(note)})" if note else "") + "<br>"
            f"bits per weight: <b>{s['bits_per_weight']:.3f}</b> (storage theory {s['theory_bits_per_weight']:.3f})<br>"
            f"mean layer error: {sum(self.layer_errors) / max(len(self.layer_errors), 1):.4f}<br>"
            "Next: open it for Chat, Compare and Export.")
        self.result.setText(self._last_result)
        self.open_button.setVisible(True)
        self.streamed.emit(folder, report)

    def _failed(self, message: str) -> None:
        self._stop_live("failed")
        self._log(f"failed: {message}")
        self._show_last_result("the run after it failed", "The run failed; nothing was kept.")

    def _cancelled(self) -> None:
        if self.started_streaming is not None:  # the engine keeps the finished blocks beside the output folder
            kept = "the finished blocks are kept; Start again with the same recipe and folder resumes"
            self._stop_live(f"cancelled: {kept}")
            self._log(f"cancelled; {kept} (they are in .{self._stream_out.name}.partial beside the folder)")
            self._show_last_result("the run after it was cancelled", f"The run was cancelled; {kept}.")
            return
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
        for widget in (self.method, self.bits, self.calib, self.samples, self.seq_len, self.masking, self.keep_head):
            widget.setEnabled(not busy)  # the mixed-precision and streaming controls: _sync_options
        self._sync_options()
        self._check()

    def _log(self, line: str) -> None:
        self.log.appendPlainText(line)


def _target(recipe: QuantRecipe) -> str:
    """What a mixed-precision plan is made for, in words."""
    if recipe.target_bpw is not None:
        return f"{recipe.target_bpw:g} bits per weight"
    return f"a {human(recipe.memory_budget)} memory budget"


def _note(method: str) -> str | None:
    runtime = runtimes.BY_METHOD.get(method)
    return runtime.note if runtime is not None else None


def setting_text(spec, wbits: int, abits: int) -> str:
    """A bits-combo entry: "W4A4 (4-bit weights, 4-bit activations)", marked where beyond the seed study."""
    code = f"W{wbits}A{abits}"
    return f"{code} ({wbits}-bit weights, {abits}-bit activations){spec.setting_label(wbits, abits)[len(code):]}"


def _kernel_line(recipe: QuantRecipe, how: str) -> str:
    """How a W-A setting's activations run (`kernels.activation_kernel`'s answer), as rich text."""
    setting = f"W{recipe.wbits}A{recipe.abits}"
    if how == kernels.SIMULATED_NOTE:
        return (f"<span style='color:{WARN}'><b>{setting}: {how}</b></span> (activations rounded in floating "
                "point: the quantized model's accuracy, not its speed).")
    return f"{setting} has an integer kernel here: {html.escape(how)}."


def _activations_line(result) -> str:
    """The result card's account of the activations: their bits and clip, which tensors, and how they run here
    (the kernels chosen at load, `kernels.plan`; accuracy-only where any layer simulates its rounding)."""
    recipe = result.recipe
    if recipe.abits == 16:
        return "activations: full precision (weight-only)<br>"
    clip = f", clip {recipe.activation_clip:g}" if recipe.activation_clip != 1 else ""
    line = f"activations: <b>A{recipe.abits}</b> per token{clip}; {html.escape(QUANTIZED_TENSORS, quote=False)}<br>"
    if not kernels.activation_kernel(recipe, result.model.device):  # a library's own kernels
        return line
    plan = kernels.plan(result.model.module, result.model.device, result.model.dtype)
    if any(row["simulated"] for row in plan):
        return line + f"<span style='color:{WARN}'><b>{kernels.SIMULATED_NOTE}</b></span><br>"
    chosen = sorted({kernels.KERNELS[name].label for row in plan for name in row["chosen"].values() if name})
    return line + f"runs on {html.escape(', '.join(chosen))}<br>"


class _Cell(QTableWidgetItem):
    """A Transforms cell that sorts by its number (SORT_ROLE) where it has one, else by its text."""

    def __init__(self, text: str, key: float | None = None) -> None:
        super().__init__(text)
        if key is not None:
            self.setData(SORT_ROLE, key)

    def __lt__(self, other) -> bool:
        mine, theirs = self.data(SORT_ROLE), other.data(SORT_ROLE)
        return mine < theirs if mine is not None and theirs is not None else super().__lt__(other)


def _change(before: float, after: float) -> _Cell:
    """ "before → after", sorted by after; a reduction in bold green."""
    cell = _Cell(f"{before:.3g} → {after:.3g}", after)
    if after < before:
        font = QFont()
        font.setBold(True)
        cell.setFont(font)
        cell.setForeground(QColor(GOOD))
    return cell


def _sentence(text: str) -> str:
    return f"{text[:1].upper()}{text[1:]}."


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
