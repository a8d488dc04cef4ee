"""Models: open the bundled demo, a local folder or a hub id, and see what it is and whether it fits."""

from __future__ import annotations

import html
from pathlib import Path

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QHeaderView, QLabel, QLineEdit,
                               QListWidget, QProgressBar, QPushButton, QTableWidget, QTableWidgetItem, QVBoxLayout,
                               QWidget)

from dllm_studio.errors import InsufficientMemoryError, RemoteCodeRefusedError
from dllm_studio.events import DownloadProgress, LoadProgress, LoadWarning
from dllm_studio.hub import DEMO_NAME
from dllm_studio.memory import ACTIVATION_SHARE, HEADROOM, fit, human
from dllm_studio.models import DiffusionLM, open_model
from dllm_studio.quant.export import read_profile
from dllm_studio.quant.streaming import streaming_problem
from ui.dialogs import ask
from ui.session import Session, Variant, is_quantized
from ui.theme import BAD, FIT_COLORS
from ui.workers import stream


class ModelsPage(QWidget):
    loaded = Signal(object)  # the DiffusionLM just opened (full precision or a quantized variant)
    stream_requested = Signal()  # a model too big to load was opened as a description, to quantize streaming

    def __init__(self, session: Session, settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings

        self.demo_button = QPushButton("Bundled &demo model")
        self.demo_button.setToolTip("The small LLaDA-architecture dLLM shipped with the app; works offline.")
        self.folder_button = QPushButton("Open &folder…")
        self.folder_button.setToolTip("A local model folder laid out like a Hugging Face checkpoint "
                                      "(config.json, safetensors, tokenizer), full precision or quantized.")
        self.hub_edit = QLineEdit(placeholderText="org/name, e.g. GSAI-ML/LLaDA-8B-Instruct")
        self.hub_edit.setAccessibleName("Hub model id")
        self.hub_button = QPushButton("Download && open")
        self.progress = QProgressBar(textVisible=True)
        self.progress.setVisible(False)
        self.status = QLabel(wordWrap=True, objectName="modelStatus", textFormat=Qt.TextFormat.RichText)
        self.status.linkActivated.connect(self._stream_described)
        self._described: DiffusionLM | None = None
        self._card_sizes: list[int] = []  # the weight bytes of each row of the card's table, for its fit badges

        source = QGroupBox("Open a model")
        form = QVBoxLayout(source)
        form.addWidget(self.demo_button)
        form.addWidget(self.folder_button)
        hub_row = QHBoxLayout()
        hub_label = QLabel("&Hub id:")
        hub_label.setBuddy(self.hub_edit)
        hub_row.addWidget(hub_label)
        hub_row.addWidget(self.hub_edit, 1)
        hub_row.addWidget(self.hub_button)
        form.addLayout(hub_row)
        form.addWidget(self.progress)
        form.addWidget(self.status)
        form.addStretch(1)

        self.variant_list = QListWidget(objectName="variantList")
        self.variant_list.setAccessibleName("Quantized variants")
        variants = QGroupBox("Quantized variants (this session and opened folders)")
        QVBoxLayout(variants).addWidget(self.variant_list)

        left = QVBoxLayout()
        left.addWidget(source, 0)
        left.addWidget(variants, 1)

        self.card = QGroupBox("Model card")
        self.facts = QFormLayout()
        self.memory_table = QTableWidget(0, 3, objectName="memoryTable")
        self.memory_table.setHorizontalHeaderLabels(["Precision", "Weights (est.)", "On this machine"])
        self.memory_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.memory_table.verticalHeader().setVisible(False)
        self.memory_table.setEditTriggers(QTableWidget.EditTrigger.NoEditTriggers)
        self.memory_table.setAccessibleName("Estimated memory per bit-width")
        self.free_label = QLabel(wordWrap=True)
        card = QVBoxLayout(self.card)
        card.addLayout(self.facts)
        card.addWidget(QLabel("<b>Estimated weight memory</b> (group size 128, fp16 scales; embeddings and "
                              "LM head stay 16-bit)", wordWrap=True))
        card.addWidget(self.memory_table, 1)
        card.addWidget(self.free_label)

        layout = QHBoxLayout(self)
        layout.addLayout(left, 2)
        layout.addWidget(self.card, 3)

        self.demo_button.clicked.connect(lambda: self.open("demo"))
        self.folder_button.clicked.connect(self.choose_folder)
        self.hub_button.clicked.connect(lambda: self.open(self.hub_edit.text().strip()))
        self.hub_edit.returnPressed.connect(lambda: self.open(self.hub_edit.text().strip()))
        session.busy_changed.connect(lambda busy, _title: self._set_enabled(not busy))
        session.model_changed.connect(lambda: self._show_card())
        session.variants_changed.connect(self._show_variants)
        session.free_memory_changed.connect(self._show_fit)
        self._show_card()
        self._show_variants()

    # ---- opening ------------------------------------------------------------------------------------
    def choose_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Open a model folder")
        if folder:
            self.open(folder)

    def open(self, source: str, trust_remote_code: bool = False) -> None:
        """Load `source` ("demo", a folder or a hub id) on a worker; a quantized folder becomes a variant.

        A folder already open (as the full-precision model or a variant) is selected, not loaded twice.
        """
        if not source or self.session.busy:
            return
        folder = Path(source).expanduser()
        if source != DEMO_NAME and folder.is_dir() and (held := self.session.holding(folder)) is not None:
            self._select(held)
            self.settings.add_recent_model(str(folder.resolve()))
            return

        def job(cancel):
            try:
                return (yield from open_model(source, trust_remote_code=trust_remote_code, cancel=cancel))
            except RemoteCodeRefusedError as refused:  # not a failure yet: the user decides
                return refused
            except InsufficientMemoryError as too_big:  # still worth a card: what it is, what would fit
                described = yield from open_model(source, device="meta", trust_remote_code=trust_remote_code,
                                                  cancel=cancel)
                return too_big, described

        self.warnings: list[str] = []  # the engine's LoadWarnings for this open, shown once it is done
        self.progress.setRange(0, 0)
        self.progress.setFormat("")
        self.progress.setVisible(True)
        self.status.setText(f"Opening {source}…")
        self.session.start(f"Opening {source}", stream(job), on_event=self._on_event,
                           on_done=lambda result: self._opened(source, result), on_failed=self._failed,
                           on_cancelled=self._cancelled)

    def _select(self, held) -> None:
        if isinstance(held, Variant):
            self.session.select_variant(held)
            self.variant_list.setCurrentRow(list(self.session.variants).index(held.name))
            self.status.setText(f"{held.folder} is already open as the quantized variant {held.name}; it is selected.")
        else:
            self.status.setText(f"{held.path} is already open as the full-precision model.")

    def _on_event(self, event) -> None:
        if isinstance(event, DownloadProgress):
            if event.total:
                self.progress.setRange(0, 1000)
                self.progress.setValue(int(1000 * event.downloaded / event.total))
            self.progress.setFormat(f"downloading {human(event.downloaded)}"
                                    + (f" of {human(event.total)}" if event.total else ""))
        elif isinstance(event, LoadProgress) and event.total:
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.progress.setFormat(f"{event.stage}: %v of %m tensors")
        elif isinstance(event, LoadProgress):
            self.status.setText(event.stage)
        elif isinstance(event, LoadWarning):
            self.warnings.append(event.message)

    def _opened(self, source: str, result) -> None:
        self.progress.setVisible(False)
        # The load just changed what is free: every face takes the new figure, before the card is drawn with it
        # (and before the other pages see the new model, so none checks it against the figure from before).
        self.session.refresh_free_memory()
        if isinstance(result, RemoteCodeRefusedError):
            self.status.setText("Not opened: the model needs code from its folder.")
            ask(self, "Run the model's own code?",
                f"{result}\n\nThat code runs with your permissions. Run it?",
                lambda: self.open(source, trust_remote_code=True))
            return
        if isinstance(result, tuple):  # too big to load: show its card with the badges, keep what is open
            error, described = result
            self._show_card(described)
            self._described = described
            streams = streaming_problem(described) is None
            self.status.setText(f"<b>Not opened:</b> {error}<br>Its card is shown: pick a bit-width that fits."
                                + ("<br><a href='stream'>Quantize it streaming from its shards</a>: one block in "
                                   "memory at a time, written straight to a folder." if streams else ""))
            return
        model: DiffusionLM = result
        # Folders are remembered by their full path, so Open Recent finds them from any working directory.
        local = source != DEMO_NAME and Path(source).expanduser().is_dir()
        self.settings.add_recent_model(str(Path(model.path).resolve()) if local else source)
        if is_quantized(model):
            folder = Path(model.path)
            profile = read_profile(folder)  # what the quantizer measured, carried into a re-export
            self.session.add_variant(Variant(folder.name, model, profile.get("summary") or {},
                                             profile.get("layers") or [], folder))
            self.status.setText(f"Opened the quantized model {folder.name}; it is ready in Chat, Compare and Export.")
        else:
            self.session.set_model(model)
            self.status.setText(f"Opened {source}.")
        if self.warnings:
            self.status.setText(self.status.text() + "".join(f"<br><span style='color:{BAD}'><b>Warning:</b> "
                                                             f"{html.escape(w)}</span>" for w in self.warnings))
        self.loaded.emit(model)

    def _stream_described(self, _link: str) -> None:
        """Make the model too big to load the session's model, as a description: the Quantize page streams it."""
        if self._described is None or self.session.busy:
            return
        self.session.set_model(self._described)
        self.status.setText(f"{html.escape(str(self._described.source))} is open as a description (no weights read): "
                            "the Quantize page streams it from its shards into a folder; Chat and Compare need "
                            "that folder opened.")
        self.stream_requested.emit()

    def _cancelled(self) -> None:
        self.progress.setVisible(False)
        self.status.setText("Cancelled; nothing was changed.")

    def _failed(self, message: str) -> None:
        self.progress.setVisible(False)
        self.status.setText("Not opened (see the message).")

    def _set_enabled(self, enabled: bool) -> None:
        for widget in (self.demo_button, self.folder_button, self.hub_button, self.hub_edit):
            widget.setEnabled(enabled)

    # ---- the card -----------------------------------------------------------------------------------
    def _show_card(self, model: DiffusionLM | None = None) -> None:
        """The card of `model` (default: the open full-precision model); it may live on the meta device."""
        while self.facts.rowCount():
            self.facts.removeRow(0)
        model = model or self.session.model
        if model is None:
            self.facts.addRow(QLabel("No model open yet."))
            self.memory_table.setRowCount(0)
            self._card_sizes = []
            self.free_label.clear()
            return
        info = model.info()
        mask = info.mask_token_id
        rows = [("Model", info.source), ("Family", info.family), ("Parameters", f"{info.parameters:,}"),
                ("Layers", str(info.layers)), ("Hidden size", str(info.hidden_size)),
                ("Vocabulary", f"{info.vocab_size:,}"),
                ("Mask token", "none" if mask is None else f"{model.tokenizer.convert_ids_to_tokens(mask)} (id {mask})"),
                ("Context", f"{info.context_length:,} tokens"), ("Weights held as", info.dtype_reason or info.dtype),
                ("Folder", info.path)]
        for name, value in rows:
            label = QLabel(value, wordWrap=True, textInteractionFlags=Qt.TextInteractionFlag.TextSelectableByMouse)
            self.facts.addRow(f"{name}:", label)
        self.memory_table.setRowCount(len(info.memory_bytes))
        self._card_sizes = list(info.memory_bytes.values())
        for row, (precision, nbytes) in enumerate(info.memory_bytes.items()):
            for col, text in enumerate((precision, human(nbytes))):
                self.memory_table.setItem(row, col, QTableWidgetItem(text))
        self._show_fit(self.session.free_memory)

    def _show_fit(self, free: int) -> None:
        """The card's fit badges and free-memory line against `free`, the session's figure of the moment."""
        if not self._card_sizes:
            return
        for row, nbytes in enumerate(self._card_sizes):
            needed = nbytes * (1 + ACTIVATION_SHARE)
            badge = fit(int(needed), free)
            item = self.memory_table.item(row, 2)
            if item is None:  # updated in place each second after, so a tooltip being read stays open
                item = QTableWidgetItem()
                self.memory_table.setItem(row, 2, item)
            item.setText(badge)
            item.setBackground(QColor(FIT_COLORS[badge]))
            item.setForeground(QColor("white"))
            item.setToolTip(f"Needs about {human(needed)} with activations and buffers; {human(free)} is free now.")
        self.free_label.setText(f"This machine has {human(free)} of memory free now. <i>fits</i>: under half of it; "
                                f"<i>tight</i>: under {HEADROOM:.0%}; <i>won't fit</i>: more.")

    def _show_variants(self) -> None:
        self.variant_list.clear()
        if not self.session.variants:
            self.variant_list.addItem("None yet: quantize on the Quantize page, or open a quantized folder.")
            self.variant_list.item(0).setFlags(Qt.ItemFlag.NoItemFlags)
        for name, variant in self.session.variants.items():
            where = f" — {variant.folder}" if variant.folder else " — in memory (export it to keep it)"
            self.variant_list.addItem(f"{name}: {human(variant.model.weight_bytes())}{where}")
