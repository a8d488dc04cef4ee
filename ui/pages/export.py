"""Export: write a quantized variant to a folder, then prove the folder holds the same model.

The engine writes atomically (a hidden sibling folder renamed into place), so a failed or cancelled export
leaves nothing behind; before the rename it reloads the folder and compares its logits with the in-memory
variant's on a fixed prompt, because a folder that loads but answers differently is worse than no folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from PySide6.QtCore import Qt, QUrl, Signal
from PySide6.QtGui import QDesktopServices
from PySide6.QtWidgets import (QCheckBox, QComboBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QLineEdit, QProgressBar, QPushButton, QVBoxLayout, QWidget)

from dllm_studio.errors import ExportError, FolderExistsError
from dllm_studio.events import ExportProgress, LoadProgress
from dllm_studio.memory import human
from dllm_studio.models import WEIGHTS_STAGE
from dllm_studio.quant.export import VERIFY_MASKS, export, verdict_text
from dllm_studio.quant.recipe import FORMATS
from ui.dialogs import show_error
from ui.paths import models_dir
from ui.session import Session, Variant
from ui.theme import BAD, GOOD
from ui.widgets import VariantPicker
from ui.workers import stream

FORMAT_HELP = {
    "native": "dLLM Studio's packed format; reloads in dLLM Studio.",
    "gptq": "The GPTQ v1 layout (int32 qweight/qzeros, fp16 scales, g_idx) that transformers, GPTQModel "
            "and vLLM read.",
}
PHASES = {"tensors": "Writing tensors", "files": "Writing files", WEIGHTS_STAGE: "Reloading to compare outputs"}


def slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "model"


def verdict(report: dict) -> tuple[str, str]:
    """What the verification means in words (the engine's wording, as the CLI prints it), and its colour."""
    text, ok = verdict_text(report)
    return text, GOOD if ok else BAD


class ExportPage(QWidget):
    exported = Signal(str, dict)  # the folder, the report (see export)

    def __init__(self, session: Session, settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.job = None
        self._parent = models_dir()  # Browse… changes where new folders go
        self._custom_path = False  # the user typed a path: stop suggesting one

        self.variant = VariantPicker(session, objectName="exportVariant")
        self.variant.setMinimumContentsLength(16)
        self.format = QComboBox(objectName="exportFormat")
        for i, fmt in enumerate(FORMATS):
            self.format.addItem(fmt, fmt)
            self.format.setItemData(i, FORMAT_HELP[fmt], Qt.ItemDataRole.ToolTipRole)
        saved = settings.get("export/format")
        self.format.setCurrentIndex(FORMATS.index(saved) if saved in FORMATS else 0)
        self.format_help = QLabel(wordWrap=True, objectName="exportFormatHelp")
        self.path = QLineEdit(objectName="exportPath")
        self.path.setAccessibleName("Output folder")
        self.browse_button = QPushButton("Browse…", objectName="exportBrowse")
        self.browse_button.setToolTip("Choose where to put the new folder; it is named after the variant and format.")
        self.force = QCheckBox("Replace if it exists", objectName="exportForce")
        self.force.setToolTip("The old folder is replaced only once the new one is completely written.")
        self.export_button = QPushButton("&Export", objectName="exportRun")
        self.hint = QLabel(wordWrap=True, objectName="exportHint")
        self.progress = QProgressBar(objectName="exportProgress", textVisible=True)
        self.progress.setFormat("")
        self.progress.setValue(0)
        self.state = QLabel("Ready", objectName="exportState")

        path_row = QHBoxLayout()
        path_row.addWidget(self.path, 1)
        path_row.addWidget(self.browse_button)
        format_row = QHBoxLayout()
        format_row.addWidget(self.format)
        format_row.addWidget(self.format_help, 1)
        form = QFormLayout()
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)  # combos stay compact
        form.addRow(QLabel("&Variant:", buddy=self.variant), self.variant)
        form.addRow(QLabel("&Format:", buddy=self.format), format_row)
        form.addRow(QLabel("&Output folder:", buddy=self.path), path_row)
        form.addRow("", self.force)
        run_row = QHBoxLayout()
        run_row.addWidget(self.export_button)
        run_row.addWidget(self.progress, 1)
        run_row.addWidget(self.state)
        settings_box = QGroupBox("Export a quantized variant")
        box = QVBoxLayout(settings_box)
        box.addLayout(form)
        box.addWidget(self.hint)
        box.addLayout(run_row)

        # ---- the result card ----
        self.result_box = QGroupBox("Exported", objectName="exportResult", visible=False)
        self.folder_label = QLabel(objectName="exportFolder", wordWrap=True)
        self.size_label = QLabel(objectName="exportSize")
        self.files_label = QLabel(objectName="exportFiles", wordWrap=True)
        self.diff_label = QLabel(objectName="exportDiff")
        self.verified = QLabel(objectName="exportVerified")
        for label in (self.folder_label, self.files_label, self.diff_label, self.verified):
            label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.open_button = QPushButton("Open folder", objectName="exportOpenFolder")
        open_row = QHBoxLayout()
        open_row.addWidget(self.open_button)
        open_row.addStretch(1)
        card = QFormLayout(self.result_box)
        card.addRow("Folder:", self.folder_label)
        card.addRow("Size on disk:", self.size_label)
        card.addRow("Files:", self.files_label)
        card.addRow("Max |Δlogit|:", self.diff_label)
        card.addRow("", self.verified)
        card.addRow("", open_row)

        layout = QVBoxLayout(self)
        layout.addWidget(settings_box)
        layout.addWidget(self.result_box)
        layout.addStretch(1)

        self.variant.currentIndexChanged.connect(self._suggest_path)
        self.format.currentIndexChanged.connect(self._format_changed)
        self.path.textEdited.connect(self._path_edited)
        self.browse_button.clicked.connect(self._browse)
        self.export_button.clicked.connect(self.export)
        self.open_button.clicked.connect(self._open_folder)
        session.variants_changed.connect(self._update_controls)  # a new current variant suggests its own path
        session.busy_changed.connect(self._update_controls)
        self._format_changed()  # suggests the first path too

    # ---- choices ----------------------------------------------------------------------------------
    @property
    def fmt(self) -> str:
        return self.format.currentData()

    def _format_changed(self) -> None:
        self.format_help.setText(FORMAT_HELP[self.fmt])
        self.settings.set("export/format", self.fmt)
        self._suggest_path()

    def _path_edited(self, text: str) -> None:
        self._custom_path = bool(text.strip())  # clearing the field brings the suggestion back
        self._update_controls()

    def _suggest_path(self, *_) -> None:
        if not self._custom_path:
            name = self.variant.currentText()
            self.path.setText(str(self._parent / f"{slug(name)}-{self.fmt}") if name else "")
        self._update_controls()

    def _browse(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Export into", str(self._parent))
        if folder:
            self._parent, self._custom_path = Path(folder), False
            self._suggest_path()

    def _blocker(self) -> str | None:
        unavailable = self.session.unavailable(needs_variant=True)
        if unavailable is None and not self.path.text().strip():
            return "Choose an output folder."
        return unavailable

    def _update_controls(self, *_) -> None:
        blocker = self._blocker()
        self.export_button.setEnabled(blocker is None)
        self.export_button.setToolTip(blocker or "Write the folder, reload it and check it gives the same outputs.")
        self.hint.setText(blocker if blocker and not self.session.busy else "")
        self.hint.setVisible(bool(self.hint.text()))

    # ---- exporting --------------------------------------------------------------------------------
    def export(self) -> None:
        """Write the chosen variant to the output folder, reload it and compare outputs (one job)."""
        blocker = self._blocker()
        if blocker is not None:
            show_error(self, "Cannot export yet", blocker)
            return
        variant: Variant = self.session.variants[self.variant.currentText()]
        out, fmt, force = Path(self.path.text().strip()).expanduser().absolute(), self.fmt, self.force.isChecked()
        profile = {"summary": variant.summary, "layers": variant.layers}

        replace = self.force.text()

        def job(cancel):
            try:
                return (yield from export(variant.model, out, fmt=fmt, force=force, profile=profile, check=True,
                                          cancel=cancel))
            except FolderExistsError as exists:  # the engine's message names no control; this page has one
                raise ExportError(f"{exists} Choose another folder, or tick \u201c{replace}\u201d to replace it.") from None

        self.result_box.hide()
        self.state.setText("Exporting…")
        self.job = self.session.start(f"Exporting {variant.name}", stream(job), on_event=self._on_progress,
                                      on_done=lambda report: self._on_done(variant, report),
                                      on_failed=lambda message: self._ended("Export failed"),
                                      on_cancelled=lambda: self._ended("Cancelled; nothing was kept"))

    def _on_progress(self, event) -> None:
        if isinstance(event, (ExportProgress, LoadProgress)) and event.total:
            self.progress.setRange(0, event.total)
            self.progress.setValue(event.done)
            self.progress.setFormat(f"{PHASES.get(event.stage, event.stage)}: %v of %m")

    def _on_done(self, variant: Variant, report: dict) -> None:
        self.session.set_folder(variant, Path(report["path"]))
        text, color = verdict(report)
        self.folder_label.setText(report["path"])
        self.size_label.setText(human(report["total_bytes"]))
        self.files_label.setText("\n".join(f"{name}  ({human(size)})" for name, size in report["files"]))
        self.diff_label.setText(f"{report['max_abs_logit_diff']:.3g} over {report['positions']} positions "
                                f"(a chat prompt and {VERIFY_MASKS} masked answer tokens)")
        self.verified.setText(text)
        self.verified.setStyleSheet(f"color: {color}; font-weight: bold")
        self.result_box.show()
        self._ended(f"Exported ({report['format']})", complete=True)
        self.exported.emit(report["path"], report)

    def _ended(self, state: str, complete: bool = False) -> None:
        self.job = None
        self.state.setText(state)
        self.progress.setRange(0, 1)  # full when the export completed, empty when it stopped; the label says how
        self.progress.setValue(1 if complete else 0)
        self.progress.setFormat("done" if complete else "")
        self._update_controls()

    def _open_folder(self) -> None:
        QDesktopServices.openUrl(QUrl.fromLocalFile(self.folder_label.text()))
