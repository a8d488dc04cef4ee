"""The main window: a sidebar of pages, menus with the standard shortcuts, and a status bar with live RAM."""

from __future__ import annotations

from PySide6.QtCore import QSize, Qt, QTimer
from PySide6.QtGui import QAction, QActionGroup, QKeySequence
from PySide6.QtWidgets import (QApplication, QHBoxLayout, QLabel, QListWidget, QListWidgetItem, QMainWindow,
                               QMessageBox, QStackedWidget, QStyle, QWidget)

from dllm_studio import memory
from dllm_studio.memory import human
from ui import theme
from ui.dialogs import show_error
from ui.help import QuickStartDialog
from ui.pages.chat import ChatPage
from ui.pages.compare import ComparePage
from ui.pages.export import ExportPage
from ui.pages.models import ModelsPage
from ui.pages.quantize import QuantizePage
from ui.session import Session
from ui.settings import Settings

PAGES = (  # sidebar label, page class, standard icon
    ("Models", ModelsPage, QStyle.StandardPixmap.SP_DirOpenIcon),
    ("Quantize", QuantizePage, QStyle.StandardPixmap.SP_ArrowDown),
    ("Chat", ChatPage, QStyle.StandardPixmap.SP_MessageBoxInformation),
    ("Compare", ComparePage, QStyle.StandardPixmap.SP_FileDialogDetailedView),
    ("Export", ExportPage, QStyle.StandardPixmap.SP_DialogSaveButton),
)


def distinct_keys(shortcuts) -> list[QKeySequence]:
    """The shortcuts as key sequences, each key once: a standard key and its explicit fallback are the same
    key on most platforms (StandardKey.Quit is Ctrl+Q on X11), and an action holding one key twice makes Qt
    call every press an "ambiguous shortcut overload" and trigger nothing. Empty sequences are dropped."""
    keys: dict[str, QKeySequence] = {}
    for k in shortcuts:
        key = QKeySequence(k)
        if not key.isEmpty():
            keys.setdefault(key.toString(QKeySequence.SequenceFormat.PortableText), key)
    return list(keys.values())


class MainWindow(QMainWindow):
    def __init__(self, session: Session, settings: Settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.setWindowTitle("dLLM Studio")
        self.setMinimumSize(1000, 640)

        self.sidebar = QListWidget(objectName="sidebar")
        self.sidebar.setAccessibleName("Pages")
        self.sidebar.setIconSize(QSize(22, 22))
        self.sidebar.setFixedWidth(150)
        self.stack = QStackedWidget()
        self.pages = {}
        for label, page_class, icon in PAGES:
            page = page_class(session, settings)
            page.setObjectName(f"{label.lower()}Page")
            self.pages[label.lower()] = page
            self.stack.addWidget(page)
            QListWidgetItem(self.style().standardIcon(icon), label, self.sidebar)
        self.models: ModelsPage = self.pages["models"]
        self.quantize: QuantizePage = self.pages["quantize"]
        self.chat: ChatPage = self.pages["chat"]
        self.compare: ComparePage = self.pages["compare"]
        self.export: ExportPage = self.pages["export"]
        self.sidebar.currentRowChanged.connect(self.stack.setCurrentIndex)
        central = QWidget()
        layout = QHBoxLayout(central)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(self.sidebar)
        layout.addWidget(self.stack, 1)
        self.setCentralWidget(central)

        self.model_label = QLabel(objectName="modelLabel")
        self.job_label = QLabel(objectName="jobLabel")
        self.ram_label = QLabel(objectName="ramLabel")
        self.ram_label.setToolTip("Resident memory of dLLM Studio now, its peak, and the memory free on this machine.")
        for widget in (self.model_label, self.job_label):
            self.statusBar().addWidget(widget)
        self.statusBar().addPermanentWidget(self.ram_label)
        # The one place the free memory is read on a clock: every widget showing it listens to the session.
        session.free_memory_changed.connect(self._show_ram)
        self.ram_timer = QTimer(self, interval=1000)
        self.ram_timer.timeout.connect(session.refresh_free_memory)
        self.ram_timer.start()
        session.refresh_free_memory()

        self._quick_start: QuickStartDialog | None = None
        self._make_menus()
        session.model_changed.connect(self._update_models_label)
        session.variants_changed.connect(self._update_models_label)
        session.busy_changed.connect(self._busy_changed)
        session.job_failed.connect(lambda title, message: show_error(self, title, message))
        self.quantize.open_requested.connect(self.models.open)  # a streamed folder, loaded as the Models page does
        self.models.stream_requested.connect(lambda: self.show_page("quantize"))
        self.quantize.finished.connect(
            lambda variant: self.statusBar().showMessage(f"{variant.name} is ready in Chat, Compare and Export", 8000))
        self._update_models_label()
        self._restore()

    # ---- menus and shortcuts ------------------------------------------------------------------------
    def _action(self, menu, text: str, slot, shortcuts=(), tip: str = "") -> QAction:
        action = QAction(text, self)
        action.setShortcuts(distinct_keys(shortcuts))
        action.setShortcutContext(Qt.ShortcutContext.ApplicationShortcut)
        if tip:
            action.setStatusTip(tip)
        action.triggered.connect(slot)
        menu.addAction(action)
        return action

    def _make_menus(self) -> None:
        bar = self.menuBar()
        file = bar.addMenu("&File")
        self._action(file, "&Open model folder…", self.models.choose_folder, [QKeySequence.StandardKey.Open])
        self._action(file, "Open the &demo model", lambda: self.models.open("demo"))
        self.recent_menu = file.addMenu("Open &recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self._fill_recent()
        file.addSeparator()
        self._action(file, "Open &conversation…", self.chat.choose_open_file)
        self._action(file, "&Save conversation…", self.chat.choose_save_file, [QKeySequence.StandardKey.Save])
        self._action(file, "&Export quantized model…", lambda: self.show_page("export"), ["Ctrl+E"])
        file.addSeparator()
        # StandardKey.Quit is empty on some platforms (and offscreen): Ctrl+Q is added explicitly.
        self.quit_action = self._action(file, "&Quit", self.close, [QKeySequence.StandardKey.Quit, "Ctrl+Q"])

        run = bar.addMenu("&Run")
        self.send_action = self._action(run, "&Send to both models", self.send, ["Ctrl+Return", "Ctrl+Enter"],
                                        "Send the chat prompt to full precision and the quantized model")
        self.stop_action = self._action(run, "S&top", self.stop, ["Esc"], "Stop the running job")
        self.stop_action.setEnabled(self.session.busy)
        self._action(run, "&Start quantization", lambda: (self.show_page("quantize"), self.quantize.start()))

        view = bar.addMenu("&View")
        for i, (label, _page, _icon) in enumerate(PAGES):
            self._action(view, label, lambda _=False, name=label.lower(): self.show_page(name), [f"Ctrl+{i + 1}"])
        view.addSeparator()
        themes = view.addMenu("&Theme")
        group = QActionGroup(self)
        for name in ("system", "light", "dark"):
            action = QAction(name.capitalize(), self, checkable=True, checked=self.settings.get("theme") == name)
            action.triggered.connect(lambda _=False, n=name: self.set_theme(n))
            group.addAction(action)
            themes.addAction(action)

        help_menu = bar.addMenu("&Help")
        self.quick_start_action = self._action(help_menu, "&Quick start", self.show_quick_start,
                                               [QKeySequence.StandardKey.HelpContents, "F1"],
                                               "What each page's charts, colours and verdicts mean")
        self._action(help_menu, "&About dLLM Studio", self._about)

    def _fill_recent(self) -> None:
        """The models opened before, most recent first; each opens as the Models page would open it."""
        self.recent_menu.clear()
        recent = self.settings.recent_models()
        for source in recent:
            self.recent_menu.addAction(source).triggered.connect(lambda _=False, s=source: self.models.open(s))
        self.recent_menu.addSeparator()
        self.recent_menu.addAction("&Clear the list", self.settings.clear_recent_models).setEnabled(bool(recent))

    def show_page(self, name: str) -> None:
        self.sidebar.setCurrentRow(list(self.pages).index(name))

    def send(self) -> None:
        self.show_page("chat")
        self.chat.send()

    def stop(self) -> None:
        """Esc: stop whatever runs (a quantization within a second of work, a generation after its step)."""
        self.chat.stop()
        self.quantize.cancel()
        self.session.cancel()

    def set_theme(self, name: str) -> None:
        self.settings.set("theme", name)
        theme.apply(QApplication.instance(), name)

    def show_quick_start(self) -> None:
        """One non-modal Quick start window, raised again if it is already open."""
        if self._quick_start is None:
            self._quick_start = QuickStartDialog(self)
        self._quick_start.show()
        self._quick_start.raise_()

    def _about(self) -> None:
        QMessageBox.about(self, "About dLLM Studio",
                          "<b>dLLM Studio</b><br>Quantize diffusion language models on your own machine and chat "
                          "with them, full precision and quantized side by side.")

    # ---- status bar ---------------------------------------------------------------------------------
    def _show_ram(self, free: int) -> None:
        self.ram_label.setText(f"RAM {human(memory.rss_bytes())} (peak {human(memory.peak_rss_bytes())}) · "
                               f"{human(free)} free")

    def _update_models_label(self) -> None:
        model = self.session.model
        text = f"Model: {model.source if model else 'none'}"
        if self.session.variants:
            text += f" · quantized: {', '.join(self.session.variants)}"
        self.model_label.setText(text)

    def _busy_changed(self, busy: bool, title: str) -> None:
        self.job_label.setText(f"Running: {title}… (Esc stops)" if busy else "")
        self.stop_action.setEnabled(busy)  # idle, Esc is left to the focused widget

    # ---- persistence --------------------------------------------------------------------------------
    def _restore(self) -> None:
        geometry = self.settings.raw("window/geometry")
        if geometry is not None:
            self.restoreGeometry(geometry)
        else:
            self.resize(1320, 820)
        self.sidebar.setCurrentRow(min(max(self.settings.get("page"), 0), len(PAGES) - 1))

    def closeEvent(self, event) -> None:
        self.settings.set_raw("window/geometry", self.saveGeometry())
        self.settings.set("page", self.sidebar.currentRow())
        self.settings.sync()
        # Cancel the running job and give it 2 s to stop at its next check; one stuck inside a long torch op is
        # left behind (Session.shutdown) rather than freezing the closing window until it returns.
        self.session.shutdown(timeout_ms=2_000)
        super().closeEvent(event)
