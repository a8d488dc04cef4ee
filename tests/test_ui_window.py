"""The whole studio window: the user's journey on the demo model, shortcuts, settings, and responsiveness."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PySide6.QtCore import QElapsedTimer, Qt, QTimer
from PySide6.QtGui import QKeySequence
from PySide6.QtWidgets import QDialog
from qt_helpers import shortcut_owners

pytestmark = pytest.mark.gui


@pytest.fixture
def window(qtbot, studio_settings):
    from ui.app import create_window

    w = create_window("demo", studio_settings)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: w.session.model is not None and not w.session.busy, timeout=30_000)
    yield w
    w.session.shutdown()


def small_sampler(chat, length=16):
    chat.gen_length.setValue(length)
    chat.block_length.setValue(length)
    chat.steps.setValue(length)


class StallMeter:
    """Measures how late a 10 ms GUI-thread timer fires: the event loop's stalls."""

    def __init__(self) -> None:
        self.gaps: list[float] = []
        self.clock = QElapsedTimer()
        self.timer = QTimer(interval=10)
        self.timer.timeout.connect(self._tick)

    def start(self):
        self.clock.start()
        self.timer.start()
        return self

    def _tick(self) -> None:
        self.gaps.append(self.clock.restart())

    def stop(self) -> float:
        self.timer.stop()
        return float(np.percentile(np.array(self.gaps[1:]) - 10, 99))


def test_journey_quantize_chat_compare_export_reload(qtbot, window, tmp_path):
    w = window
    # the demo is open and selected
    assert w.session.model.source == "demo" and w.sidebar.currentRow() == 0
    assert "demo" in w.model_label.text() and "RAM" in w.ram_label.text()

    # quantize W4 with GPTQ and watch the charts fill in
    w.show_page("quantize")
    q = w.quantize
    q.method.setCurrentIndex(q.method.findData("gptq"))
    q.bits.setCurrentIndex(q.bits.findData(4))
    q.samples.setValue(8)
    q.seq_len.setValue(128)
    with qtbot.waitSignal(q.finished, timeout=120_000) as done:
        q.start_button.click()
    variant = done.args[0]
    assert len(q.outliers.values) == 7 * w.session.model.num_layers and q.memory_chart.data
    assert variant.name in w.model_label.text()

    # chat: one prompt to both panes, animated frame by frame
    w.show_page("chat")
    chat = w.chat
    small_sampler(chat)
    frames = {"fp": 0, "quant": 0}
    chat.frame_shown.connect(lambda pane, step: frames.__setitem__(pane, frames[pane] + 1))
    finished = {}
    chat.answer_finished.connect(lambda pane, text: finished.__setitem__(pane, text))
    chat.input.setPlainText("What is the capital of France?")
    qtbot.keyClick(chat.input, Qt.Key.Key_Return, Qt.KeyboardModifier.ControlModifier)  # Ctrl+Enter sends
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=60_000)
    assert frames["fp"] >= 16 and frames["quant"] >= 16
    assert finished["fp"] and finished["quant"]
    qtbot.waitUntil(lambda: not w.session.busy, timeout=60_000)  # the turn ends with its decision flips

    # compare on a few items per suite
    w.show_page("compare")
    compare = w.compare
    compare.limit.setValue(2)
    with qtbot.waitSignal(compare.finished, timeout=180_000) as compared:
        compare.run()
    rows = compared.args[0]
    assert {r["suite"] for r in rows} >= {"qa", "math", "code"}

    # export, verified by reloading, then open the folder again: it is the variant already open
    w.show_page("export")
    export = w.export
    out = tmp_path / "demo-gptq-w4"
    export.path.setText(str(out))
    with qtbot.waitSignal(export.exported, timeout=60_000) as exported:
        export.export()
    report = exported.args[1]
    assert (out / "config.json").is_file() and report["max_abs_logit_diff"] == 0.0 and report["argmax_agrees"]
    w.models.open(str(out))  # the exported variant lives there now: selected, not opened a second time
    assert list(w.session.variants) == [variant.name] and variant.folder == out and not w.session.busy
    assert w.export.variant.currentText() == variant.name


def test_shortcuts_quit_and_escape(qtbot, window):
    w = window
    assert "Ctrl+Q" in [s.toString() for s in w.quit_action.shortcuts()]
    assert "Esc" in [s.toString() for s in w.stop_action.shortcuts()]
    assert not w.stop_action.isEnabled()  # nothing runs: Esc belongs to the focused widget
    with qtbot.waitActive(w):
        w.activateWindow()
    with qtbot.assertNotEmitted(w.stop_action.triggered, wait=100):
        qtbot.keyClick(w, Qt.Key.Key_Escape)


def test_no_two_bindings_share_a_key(window):
    owners = shortcut_owners(window)
    shared = {key: actions for key, actions in owners.items() if len(actions) > 1}
    assert not shared, f"keys bound twice (Qt then triggers neither): {shared}"
    assert owners["Ctrl+Q"] == ["&Quit"] and owners["Esc"] == ["S&top"]


def test_a_standard_key_and_its_fallback_bind_once():
    from ui.main_window import distinct_keys

    keys = distinct_keys([QKeySequence("Ctrl+Q"), "Ctrl+Q", QKeySequence(), "Ctrl+W"])
    assert [k.toString() for k in keys] == ["Ctrl+Q", "Ctrl+W"]


@pytest.mark.skipif(shutil.which("xvfb-run") is None, reason="needs Xvfb (Debian: xvfb) for a real X11 display")
def test_ctrl_q_quits_under_a_real_x11_display(tmp_path):
    """Offscreen, StandardKey.Quit maps to no key, which hid Ctrl+Q being bound twice: under xcb it is Ctrl+Q."""
    env = {**os.environ, "QT_QPA_PLATFORM": "xcb"}
    proc = subprocess.run(["xvfb-run", "-a", "-s", "-screen 0 1280x800x24", sys.executable,
                           str(Path(__file__).with_name("xcb_window_check.py")), str(tmp_path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=Path(__file__).parents[1])
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["platform"] == "xcb"
    shared = {key: actions for key, actions in result["shortcuts"].items() if len(actions) > 1}
    assert not shared, f"keys bound twice under xcb: {shared}"
    assert not [w for w in result["warnings"] if "Ambiguous shortcut" in w]
    assert result["closed"], "Ctrl+Q did not close the window"


def test_escape_stops_a_generation(qtbot, window):
    w = window
    w.show_page("chat")
    chat = w.chat
    chat.gen_length.setValue(256)
    chat.block_length.setValue(256)
    chat.steps.setValue(256)
    chat.input.setPlainText("Tell me a story.")
    with qtbot.waitSignal(chat.frame_shown, timeout=30_000):
        w.send_action.trigger()
    with qtbot.waitSignal(w.session.busy_changed, timeout=30_000, check_params_cb=lambda busy, _t: not busy):
        w.stop_action.trigger()
    assert not w.session.busy


def test_settings_and_geometry_persist(qtbot, studio_settings):
    from ui.app import create_window

    first = create_window(None, studio_settings)
    qtbot.addWidget(first)
    first.show()
    first.resize(1111, 700)
    first.show_page("compare")
    geometry = first.geometry()
    first.close()
    second = create_window(None, studio_settings)
    qtbot.addWidget(second)
    second.show()
    # the offscreen screen is 800 px wide, so restoreGeometry fits the width to it; the height is kept
    assert second.sidebar.currentRow() == 3 and second.height() == geometry.height() == 700


def test_event_loop_never_stalls_while_quantizing_and_generating(qtbot, window):
    w = window
    meter = StallMeter().start()
    q = w.quantize
    q.method.setCurrentIndex(q.method.findData("gptq"))
    w.show_page("quantize")
    with qtbot.waitSignal(q.finished, timeout=180_000):
        q.start_button.click()
    w.show_page("chat")
    chat = w.chat
    small_sampler(chat, 64)
    chat.input.setPlainText("What is 3 plus 4?")
    finished = []
    chat.answer_finished.connect(lambda pane, text: finished.append(pane))
    chat.send()
    qtbot.waitUntil(lambda: len(finished) == 2, timeout=120_000)
    p99 = meter.stop()
    print(f"event-loop stall p99 {p99:.1f} ms over {len(meter.gaps)} ticks")
    assert len(meter.gaps) > 100
    assert p99 < 50


def test_help_quick_start_explains_charts_colours_and_bands(qtbot, window):
    from dllm_studio.profile import OUTLIER_ALARM

    w = window
    help_menu = next(a.menu() for a in w.menuBar().actions() if a.text() == "&Help")
    assert [a.text() for a in help_menu.actions()][0] == "&Quick start"
    w.quick_start_action.trigger()
    dialog = w.findChild(QDialog, "quickStart")
    qtbot.waitUntil(dialog.isVisible, timeout=5_000)
    text = " ".join(dialog.browser.toPlainText().replace("\xa0", " ").split())
    for chart in ("Activation outliers per layer", "Channel magnitudes", "Quantization error per layer", "Memory"):
        assert chart in text
    assert f"above {OUTLIER_ALARM:g}x" in text and w.quantize.outliers.alarm == OUTLIER_ALARM
    assert "negligible under 1%, moderate 1% to 4%, significant over 4%" in text and "not significant" in text
    w.quick_start_action.trigger()  # a second press raises the same window
    assert len(w.findChildren(QDialog, "quickStart")) == 1


def test_recent_list_orders_dedupes_caps_and_prunes(tmp_path):
    from ui.settings import remembered, still_there

    recent = []
    for source in ("demo", "org/name", "demo", *(f"/m{i}" for i in range(12))):
        recent = remembered(recent, source)
    assert recent == [f"/m{i}" for i in range(11, 1, -1)]  # most recent first, ten at most
    assert remembered(["a", "b", "c"], "b") == ["b", "a", "c"]  # a repeat moves to the front, once
    (tmp_path / "here").mkdir()
    assert still_there(["demo", "org/name", str(tmp_path / "gone"), str(tmp_path / "here")]) == [
        "demo", "org/name", str(tmp_path / "here")]


def test_open_recent_survives_a_restart_and_forgets_deleted_folders(qtbot, studio_settings, tmp_path):
    import shutil

    from dllm_studio.hub import DEMO_PATH
    from ui.app import create_window
    from ui.settings import Settings

    first = create_window(None, studio_settings)
    qtbot.addWidget(first)
    folders = [tmp_path / "a", tmp_path / "b"]
    for folder in folders:
        shutil.copytree(DEMO_PATH, folder)
        with qtbot.waitSignal(first.session.busy_changed, timeout=30_000, check_params_cb=lambda busy, _t: not busy):
            first.models.open(str(folder))
    first.close()

    second = create_window(None, Settings())  # a restart: new settings object and window, same settings file
    qtbot.addWidget(second)

    def entries():
        second.recent_menu.aboutToShow.emit()
        return [a.text() for a in second.recent_menu.actions() if not a.isSeparator()]

    assert entries() == [str(folders[1]), str(folders[0]), "&Clear the list"]
    shutil.rmtree(folders[1])
    assert entries() == [str(folders[0]), "&Clear the list"]
    with qtbot.waitSignal(second.models.loaded, timeout=30_000):  # the same path as opening it on the Models page
        second.recent_menu.actions()[0].trigger()
    assert second.session.model.path == folders[0]
    qtbot.waitUntil(lambda: not second.session.busy)
    second.recent_menu.actions()[-1].trigger()  # Clear
    assert entries() == ["&Clear the list"] and not second.recent_menu.actions()[-1].isEnabled()
    second.session.shutdown()
