"""Quantize: a recipe form that offers only what the engine can do, and a live profile while it runs.

Engine events arrive on the GUI thread at whatever rate the job yields them; they only update
plain data here, and a timer draws the charts from the latest data (never once per event) and appends the
Transforms table's new rows (a method's LayerTransformed events). The pickers read the method table
(`quant.methods.METHODS`): each method's settings, and only the options it reads.
"""

from __future__ import annotations

import html
import time
from pathlib import Path

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QColor, QFont
from PySide6.QtWidgets import (QAbstractItemView, QCheckBox, QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout,
                               QGridLayout, QGroupBox, QHBoxLayout, QLabel, QPlainTextEdit, QProgressBar,
                               QPushButton, QSpinBox, QSplitter, QTableWidget, QTableWidgetItem, QTabWidget,
                               QVBoxLayout, QWidget)

from dllm_studio import memory
from dllm_studio.errors import DllmError
from dllm_studio.events import BlockQuantized, LayerQuantized, LayerStats, LayerTransformed
from dllm_studio.memory import available_bytes, human
from dllm_studio.profile import OUTLIER_ALARM
from dllm_studio.quant.pipeline import check_supported, quantize, working_set
from dllm_studio.quant import kernels, runtimes
from dllm_studio.quant.methods import METHODS as SPECS
from dllm_studio.quant.methods import QUANTIZED_TENSORS
from dllm_studio.quant.recipe import METHODS, QuantRecipe
from ui.charts import BarChart, ChannelProfile, MemoryChart
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
        self.preflight = QLabel(wordWrap=True, objectName="preflightLabel")
        self.start_button = QPushButton("&Start", objectName="startButton")
        self.cancel_button = QPushButton("Cancel", objectName="cancelButton")
        self.cancel_button.setToolTip("Stop after the current layer (Esc); nothing is kept or written.")
        self.cancel_button.setEnabled(False)

        form = QFormLayout()
        for label, widget in (("&Method:", self.method), ("&Bits:", self.bits),
                              ("Alp&ha (migration):", self.alpha), ("Activation cl&ip:", self.clip),
                              ("&Group size:", self.group), ("&Calibration:", self.calib), ("Sa&mples:", self.samples),
                              ("Sequence &length:", self.seq_len),
                              ("Calibration mas&king:", self.masking)):
            caption = QLabel(label)
            caption.setBuddy(widget)
            form.addRow(caption, widget)
        recipe_box = QGroupBox("Recipe")
        box = QVBoxLayout(recipe_box)
        box.addLayout(form)
        # Below the form, not in a row of it: a wrapped label spanning a form row is clipped to two lines.
        for widget in (self.kernel_note, self.symmetric, self.act_order, self.keep_head, self.preflight):
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
        side_widget.setMaximumWidth(380)
        layout.addWidget(side_widget)
        layout.addWidget(splitter, 1)

        self.timer = QTimer(self, interval=REDRAW_MS)
        self.timer.timeout.connect(self.redraw)
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
        self.start_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        session.model_changed.connect(self._recipe_changed)
        session.busy_changed.connect(self._busy_changed)
        self._sync_options()
        self._recipe_changed()

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
                           skip=("head",) if self.keep_head.isChecked() else ())

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
        self.transforms_table.setRowCount(0)
        self.transforms_table.setVisible(recipe.spec.transforms)
        self.log.clear()
        self._show_last_result("a new run is under way", "Quantizing: the result appears here when it is done.")
        self.progress.setRange(0, model.num_layers)
        self.progress.setValue(0)
        self.progress.setFormat(f"starting {recipe.label}…")
        self._log(f"{recipe.label} on {model.source}: {model.num_layers} blocks, "
                  f"{recipe.calib_samples} x {recipe.seq_len} calibration tokens"
                  f"{f' (masked: {recipe.calib_masking})' if recipe.masked_calib else ''}")
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
        self.transformed: list[LayerTransformed] = []  # in arrival order; the table takes new ones each tick
        self.changed = set(CHARTS)  # the charts to repaint

    def _on_event(self, event) -> None:
        if isinstance(event, LayerStats):
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
        self._append_transforms()
        block = self.last_block
        if block is not None:
            self.progress.setValue(block.block)
            eta = f", about {block.eta_s:.0f} s left" if block.block < block.blocks else ""
            self.progress.setFormat(f"block {block.block} of {block.blocks}{eta}")

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
        for widget in (self.method, self.bits, self.calib, self.samples, self.seq_len, self.masking, self.keep_head):
            widget.setEnabled(not busy)
        self._sync_options()
        self._check()

    def _log(self, line: str) -> None:
        self.log.appendPlainText(line)


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
