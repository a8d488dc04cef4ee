"""The Models and Quantize pages, driven through their real widgets."""

import json

import pytest
from qt_helpers import cancel_at_first, error_dialogs

pytestmark = pytest.mark.gui


@pytest.fixture
def models_page(open_page):
    from ui.pages.models import ModelsPage

    return open_page(ModelsPage)


def test_model_card_shows_the_demo_and_a_badge_per_bit_width(models_page, demo_model):
    table = models_page.memory_table
    assert [table.item(r, 0).text() for r in range(table.rowCount())] == ["bf16", "W8", "W4", "W3", "W2"]
    assert all(table.item(r, 2).text() == "fits" for r in range(table.rowCount()))  # 4 MB on any machine
    labels = [models_page.facts.itemAt(i).widget().text() for i in range(models_page.facts.count())
              if models_page.facts.itemAt(i).widget() is not None]
    assert f"{demo_model.num_parameters():,}" in labels and "llada" in labels


def test_fit_verdicts():
    from dllm_studio.memory import fit

    gb = 10**9
    assert fit(1 * gb, 16 * gb) == "fits"
    assert fit(12 * gb, 16 * gb) == "tight"
    assert fit(15 * gb, 16 * gb) == "won't fit"


def test_a_corrupt_model_folder_is_a_clear_error_dialog(qtbot, models_page, session, tmp_path):
    folder = tmp_path / "broken-llada"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "llada"}))
    (folder / "model.safetensors").write_bytes(b"not really safetensors")
    from ui.dialogs import show_error

    session.job_failed.connect(lambda title, message: show_error(models_page, title, message))
    with qtbot.waitSignal(session.job_failed, timeout=20_000) as failed:
        models_page.open(str(folder))
    title, message = failed.args
    assert "broken-llada" in title and "not a valid safetensors file" in message
    dialogs = error_dialogs()
    assert dialogs and "broken-llada" in dialogs[0].windowTitle() and message in dialogs[0].text()
    dialogs[0].close()
    assert session.model.source == "demo" and not session.busy  # what was open stays open


def test_a_quantized_folder_opens_as_a_variant(qtbot, models_page, session, demo_rtn4, tmp_path):
    from dllm_studio.quant.export import save_quantized

    out = save_quantized(demo_rtn4.model, tmp_path / "demo-rtn4",
                         profile={"summary": demo_rtn4.summary, "layers": demo_rtn4.layers})
    with qtbot.waitSignal(models_page.loaded, timeout=20_000):
        models_page.open(str(out))
    assert list(session.variants) == ["demo-rtn4"]
    variant = session.variants["demo-rtn4"]
    assert variant.summary["bits_per_weight"] == demo_rtn4.summary["bits_per_weight"] and variant.layers
    assert session.model.source == "demo"
    assert "demo-rtn4" in models_page.variant_list.item(0).text()


def test_only_valid_combinations_are_offered(quantize_page):
    page = quantize_page
    from dllm_studio.quant.methods import METHODS

    for method in ("rtn", "gptq", "awq"):
        page.method.setCurrentIndex(page.method.findData(method))
        assert [page.bits.itemData(i) for i in range(page.bits.count())] == [w for w, _ in METHODS[method].settings]
        assert page.act_order.isEnabled() == (method == "gptq")
        assert "seed study" in page.method.toolTip() or method == "rtn"
    page.method.setCurrentIndex(page.method.findData("gptq"))
    page.act_order.setChecked(True)
    page.method.setCurrentIndex(page.method.findData("awq"))
    assert not page.act_order.isChecked()  # switched off with the method, never silently ignored
    assert page.start_button.isEnabled() and "fits" in page.preflight.text()


def test_charts_take_turns_so_one_tick_repaints_at_most_one(quantize_page):
    from ui.pages.quantize import CHARTS

    page = quantize_page
    page.changed = set(CHARTS)
    drawn = []
    for _ in CHARTS:
        before = set(page.changed)
        page.redraw()
        assert len(before - page.changed) == 1
        drawn += before - page.changed
        page.changed |= {"outliers", "channels"}  # they change on every layer event
    assert sorted(drawn) == sorted(CHARTS)  # the busy charts did not starve errors and memory
    page.redraw(every_chart=True)  # as when a job ends
    assert not page.changed


def test_quantize_gptq_w4_fills_the_charts_and_makes_a_variant(qtbot, quantize_page, session):
    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("gptq"))
    page.bits.setCurrentIndex(page.bits.findData(4))
    with qtbot.waitSignal(page.finished, timeout=120_000) as done:
        page.start_button.click()
        assert page.cancel_button.isEnabled()
    variant = done.args[0]
    n_layers = 7 * session.model.num_layers
    assert len(page.outlier_ratios) == n_layers and len(page.layer_errors) == n_layers
    assert len(page.outliers.values) == n_layers and len(page.errors.values) == n_layers  # drawn, not only stored
    assert page.memory_chart.data and page.redraws >= 1
    assert page.progress.value() == page.progress.maximum()
    assert variant.name == "GPTQ W4A16 g128" and session.variants[variant.name] is variant
    assert "bits per weight" in page.result.text() and "4.1" in page.result.text()
    assert not session.busy and not page.cancel_button.isEnabled()




def test_cancel_mid_quantization_keeps_nothing(qtbot, quantize_page, session):
    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("awq"))
    cancel_at_first(qtbot, page, session)
    assert session.variants == {}
    assert page.progress.text().startswith("cancelled")
    assert page.start_button.isEnabled()


def test_result_card_sizes_state_one_baseline(qtbot, quantize_page, demo_model):
    from test_quant_pipeline import assert_sizes_divide

    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("rtn"))
    with qtbot.waitSignal(page.finished, timeout=120_000):
        page.start_button.click()
    # Packed linears against the same linears at bf16, the whole model against itself as held.
    assert assert_sizes_divide(page.result.text()) == ["bf16", str(demo_model.dtype).removeprefix("torch.")]


def test_a_cancelled_run_keeps_the_last_result_marked(qtbot, quantize_page, session):
    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("rtn"))
    cancel_at_first(qtbot, page, session)
    assert page.result.text() == "The run was cancelled; nothing was kept."  # no earlier result to keep

    with qtbot.waitSignal(page.finished, timeout=120_000) as done:
        page.start_button.click()
    card = page.result.text()
    cancel_at_first(qtbot, page, session)
    shown = page.result.text()
    assert shown.endswith(card) and done.args[0].name in shown  # the finished run's card, whole
    assert "<b>Last result</b> (the run after it was cancelled)" in shown  # marked as not the run that just ended
    assert list(session.variants) == [done.args[0].name]


def test_a_hub_id_offline_says_so(qtbot, models_page, session, tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    models_page.hub_edit.setText("GSAI-ML/LLaDA-8B-Instruct")
    with qtbot.waitSignal(session.job_failed, timeout=20_000) as failed:
        models_page.hub_button.click()
    assert "Cannot download GSAI-ML/LLaDA-8B-Instruct" in failed.args[1] and "no copy is cached" in failed.args[1]
    assert session.model.source == "demo"


def test_a_hub_download_shows_progress_then_opens(qtbot, models_page, session, tmp_path, monkeypatch):
    import shutil

    import huggingface_hub

    from dllm_studio.hub import DEMO_PATH

    snapshot = tmp_path / "snapshot"
    shutil.copytree(DEMO_PATH, snapshot)
    seen = []

    def snapshot_download(repo_id, *, tqdm_class=None, local_files_only=False, **kwargs):
        bar = tqdm_class(total=1000, initial=0, unit="B", desc="Reconstructing")
        for _ in range(4):
            bar.update(250)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    models_page.progress.valueChanged.connect(seen.append)
    monkeypatch.chdir(tmp_path)
    with qtbot.waitSignal(models_page.loaded, timeout=30_000):
        models_page.open("someone/tiny-llada")
    assert 1000 in seen  # the bar reached the end
    assert session.model.source == "someone/tiny-llada" and not models_page.progress.isVisible()


def test_a_model_too_big_for_memory_shows_its_card_and_stays_closed(qtbot, models_page, session, monkeypatch):
    import dllm_studio.memory

    free = 1_000_000  # 1 MB free: the 4 MB demo cannot load
    monkeypatch.setattr(dllm_studio.memory, "available_bytes", lambda device="cpu": free)
    opened = session.model
    with qtbot.waitSignal(session.busy_changed, timeout=20_000, check_params_cb=lambda busy, _t: not busy):
        models_page.open("demo")
    assert session.model is opened  # nothing replaced
    assert "Not opened" in models_page.status.text() and "free" in models_page.status.text()
    assert "--" not in models_page.status.text()  # no CLI flag; the card offers what fits instead
    table = models_page.memory_table
    assert [table.item(r, 2).text() for r in range(table.rowCount())] == ["won't fit"] * 5


def test_charts_take_a_new_theme_at_once(qtbot, qapp, quantize_page):
    import pyqtgraph as pg
    from PySide6.QtGui import QColor

    from ui import theme

    page = quantize_page
    page.show()  # as in the window: hidden widgets get their palette only when shown
    qtbot.waitExposed(page)
    charts = (page.outliers, page.channels, page.errors, page.memory_chart)
    saved = {key: pg.getConfigOption(key) for key in ("background", "foreground")}
    style, palette = qapp.style().name(), qapp.palette()
    try:
        for name, background, foreground in (("dark", "#1e1f22", "#dddddd"), ("light", "#ffffff", "#000000")):
            theme.apply(qapp, name)  # as View → Theme does, with the charts already open
            qapp.processEvents()  # Qt hands the new palette to child widgets through the event loop
            for chart in charts:
                assert chart.backgroundBrush().color() == QColor(background), (name, chart.accessibleName())
                assert chart.getAxis("left").pen().color() == QColor(foreground), (name, chart.accessibleName())
                assert chart.getAxis("bottom").textPen().color() == QColor(foreground), (name, chart.accessibleName())
    finally:
        pg.setConfigOptions(**saved)
        qapp.setStyle(style)
        qapp.setPalette(palette)


def test_a_long_chart_title_is_elided_with_the_full_title_in_the_tooltip(qtbot, quantize_page):
    chart = quantize_page.channels
    quantize_page.show()  # a hidden widget gets its resize events only when shown
    full = "Channel magnitudes: model.transformer.blocks.0.attn_out"
    chart.resize(220, 200)
    chart.set_profile("model.transformer.blocks.0.attn_out", [1.0, 2.0, 30.0])
    shown = chart.plotItem.titleLabel.text
    assert shown.endswith("…") and full.startswith(shown[:-1]) and len(shown) < len(full)
    qtbot.waitUntil(lambda: chart.plotItem.titleLabel.item.sceneBoundingRect().width() > 0, timeout=5_000)
    title = chart.plotItem.titleLabel.item.sceneBoundingRect()  # where the text is drawn, in widget pixels
    assert 0 <= title.left() and title.right() <= chart.width()  # all of it on the chart: nothing clipped
    assert chart.toolTip().startswith(full) and chart.description in chart.toolTip()

    chart.resize(900, 200)  # wide enough again: the whole title, the plain tooltip
    assert chart.plotItem.titleLabel.text == full and chart.toolTip() == chart.description


def test_cancelling_an_open_keeps_the_model_that_was_open(qtbot, models_page, session, studio_settings, tmp_path,
                                                           monkeypatch):
    import shutil
    import threading

    import ui.pages.models
    from dllm_studio.hub import DEMO_PATH

    folder = tmp_path / "copy"
    shutil.copytree(DEMO_PATH, folder)
    real, pressed = ui.pages.models.open_model, threading.Event()

    def held(*args, **kwargs):  # waits after its first event until cancel is pressed (the demo loads too fast)
        job = real(*args, **kwargs)
        yield next(job)
        assert pressed.wait(30)
        return (yield from job)

    def press_cancel(_event):
        session.cancel()  # what Esc (MainWindow.stop) does
        pressed.set()

    monkeypatch.setattr(ui.pages.models, "open_model", held)
    opened = session.model
    with qtbot.waitSignal(session.busy_changed, timeout=20_000, check_params_cb=lambda busy, _t: not busy):
        models_page.open(str(folder))
        session.job.event.connect(press_cancel)
    assert session.model is opened and session.variants == {}
    assert models_page.status.text() == "Cancelled; nothing was changed."
    assert not models_page.progress.isVisible() and models_page.demo_button.isEnabled()
    assert studio_settings.recent_models() == []


def test_reopening_the_open_folder_selects_it(models_page, session):
    from dllm_studio.hub import DEMO_PATH

    models_page.open(str(DEMO_PATH))
    assert not session.busy  # nothing loaded again
    assert models_page.status.text() == f"{DEMO_PATH} is already open as the full-precision model."


def test_a_model_needing_its_own_code_asks_without_cli_flags(qtbot, models_page, session, tmp_path):
    from PySide6.QtWidgets import QApplication

    folder = tmp_path / "custom"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "custom", "auto_map": {"AutoModel": "modeling_custom.M"}}))
    with qtbot.waitSignal(session.busy_changed, timeout=20_000, check_params_cb=lambda busy, _t: not busy):
        models_page.open(str(folder))
    questions = [w for w in QApplication.topLevelWidgets() if w.objectName() == "questionDialog" and w.isVisible()]
    assert questions and "modeling_custom.py" in questions[0].text() and questions[0].text().endswith("Run it?")
    assert "--" not in questions[0].text()
    questions[0].close()


def test_a_sequence_longer_than_the_context_is_explained_without_cli_flags(qtbot, quantize_page, session):
    quantize_page.seq_len.setValue(session.model.context_length + 8)
    with qtbot.waitSignal(session.job_failed, timeout=20_000) as failed:
        quantize_page.start_button.click()
    message = failed.args[1]
    assert f"sequence length of {session.model.context_length + 8} tokens exceeds" in message
    assert "--" not in message


def test_a_load_warning_is_shown_on_the_page(qtbot, models_page, session, tmp_path, llada_dir):
    import shutil

    from test_checkpoint import poison

    folder = shutil.copytree(llada_dir, tmp_path / "nan-model")
    poison(folder)
    with qtbot.waitSignal(models_page.loaded, timeout=30_000):
        models_page.open(str(folder))
    text = models_page.status.text()
    assert text.startswith(f"Opened {folder}.") and "<b>Warning:</b>" in text
    assert "tensor model.transformer.blocks.0.q_proj.weight and 1 more holds NaN or infinite values" in text


def test_a_library_method_without_its_library_is_listed_disabled_with_the_reason(monkeypatch, open_page):
    import sys

    from PySide6.QtCore import Qt

    from dllm_studio.quant import runtimes
    from ui.pages.quantize import QuantizePage

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as on a machine without the runtimes extra
    page = open_page(QuantizePage)
    for method in ("bnb-nf4", "bnb-fp4", "bnb-int8"):
        i = page.method.findData(method)
        assert not page.method.model().item(i).isEnabled()
        assert "not installed" in page.method.itemText(i)
        assert 'bitsandbytes is not installed: pip install -e ".[runtimes]"' in page.method.itemData(
            i, Qt.ItemDataRole.ToolTipRole)
    assert page.method.model().item(page.method.findData("rtn")).isEnabled()
    if runtimes.unavailable("quanto") is None:
        page.method.setCurrentIndex(page.method.findData("quanto"))
        assert "maintenance mode" in page.method.toolTip() and "maintenance mode" in page.preflight.text()


def test_a_library_method_offers_its_activation_bits_and_no_grid_options(quantize_page):
    pytest.importorskip("torchao")
    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("torchao"))
    assert [page.bits.itemText(i) for i in range(page.bits.count())] == ["W8A16 (8-bit weights, 16-bit activations)",
                                                                     "W8A8 (8-bit weights, 8-bit activations)"]
    assert not page.group.isEnabled() and not page.symmetric.isEnabled()
    page.bits.setCurrentIndex(1)
    recipe = page.recipe()
    assert (recipe.method, recipe.wbits, recipe.abits) == ("torchao", 8, 8)
    assert page.start_button.isEnabled() and "TORCHAO W8A8" in page.preflight.text()
    page.method.setCurrentIndex(page.method.findData("gptq"))
    assert page.group.isEnabled() and page.symmetric.isEnabled()


def test_the_preflight_says_which_part_dominates(quantize_page):
    from dllm_studio.memory import human
    from dllm_studio.quant.pipeline import working_set

    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("gptq"))
    parts = working_set(page.session.model, page.recipe().validate())
    del parts["model"]  # resident already
    largest = max(parts, key=parts.get)
    assert f"more memory (mostly {largest}, {human(parts[largest])})" in page.preflight.text()


def test_the_preflight_never_reads_the_weights_on_the_window_thread(qtbot, models_page, open_page, session, tmp_path,
                                                                    llada_dir, monkeypatch):
    import shutil
    import threading

    from dllm_studio import checkpoint
    from test_checkpoint import poison
    from ui.pages.quantize import QuantizePage

    folder = shutil.copytree(llada_dir, tmp_path / "nan-model")
    poison(folder)
    with qtbot.waitSignal(models_page.loaded, timeout=30_000):
        models_page.open(str(folder))
    scans, real = [], checkpoint.nonfinite_tensors

    def scan(tensors):  # reading every weight: seconds for an 8B, a frozen window if done on its thread
        scans.append(threading.current_thread() is threading.main_thread())
        return real(tensors)

    monkeypatch.setattr("dllm_studio.quant.pipeline.nonfinite_tensors", scan)
    page = open_page(QuantizePage)
    page.samples.setValue(4)
    page.seq_len.setValue(32)
    assert scans == [] and "Needs about" in page.preflight.text()
    with qtbot.waitSignal(session.job_failed, timeout=30_000) as failed:
        page.start_button.click()
    assert "holds NaN or infinite values" in failed.args[1]  # the run refused it, from its own thread
    assert scans == [False]
