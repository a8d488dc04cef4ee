"""The Compare and Export pages on the demo model and its RTN W4 variant (offscreen Qt)."""

from __future__ import annotations

import csv
import json

import pytest
from PySide6.QtCore import Qt
from qt_helpers import error_dialogs

pytestmark = pytest.mark.gui

TIMEOUT_MS = 120_000  # two cores shared with other work: generous, but never a sleep


@pytest.fixture
def variant(session, demo_rtn4):
    from ui.session import Variant

    return session.add_variant(Variant("RTN W4", demo_rtn4.model, demo_rtn4.summary, demo_rtn4.layers))


@pytest.fixture
def compare(open_page):
    from ui.pages.compare import ComparePage

    return open_page(ComparePage)


@pytest.fixture
def export_page(open_page):
    from ui.pages.export import ExportPage

    return open_page(ExportPage)


def choose(page, *suites, limit):
    for name, box in page.suite_boxes.items():
        box.setChecked(name in suites)
    page.limit.setValue(limit)


# ---- Compare ---------------------------------------------------------------------------------------

# The row fields that depend neither on timing, nor on the process's memory, nor on what else the model ran before
# (kernels: every token-count bucket it has run): the CLI and the GUI must agree on them.
MEASURED = ("suite", "model", "metric", "items", "score", "score_low", "score_high", "relative_drop", "drop_low",
            "drop_high", "absolute_drop", "absolute_drop_low", "absolute_drop_high", "p_value", "test", "band", "verdict", "agreement", "flipped_items", "first_flip_mean",
            "forward_passes_per_answer", "tokens_per_step", "weight_bytes", "bits_per_weight", "bits_per_parameter")


def test_the_gui_numbers_equal_the_cli_numbers(qtbot, compare, session, variant, demo_rtn4, tmp_path, capsys):
    """The page and `dllm-studio compare` run one engine job: the same items and settings give the same rows."""
    from dllm_studio.cli import main
    from dllm_studio.quant.export import save_quantized
    from dllm_studio.report import charts, read_report, score_text
    from ui.pages.compare import VERDICT_COLUMN

    folder = save_quantized(demo_rtn4.model, tmp_path / "RTN W4", profile={"summary": demo_rtn4.summary,
                                                                          "layers": demo_rtn4.layers})
    assert main(["compare", "demo", str(folder), "--suite", "qa,text", "--limit", "2",
                 "--report", str(tmp_path / "cli")]) == 0
    cli = read_report(tmp_path / "cli")

    assert [n for n, box in compare.suite_boxes.items() if box.isChecked()] == ["qa", "math", "code"]
    choose(compare, "qa", "text", limit=2)
    with qtbot.waitSignal(compare.finished, timeout=TIMEOUT_MS) as done:
        compare.run()
    assert not session.busy and compare.state.text().startswith("Done")
    gui = compare.report
    assert [r["suite"] for r in done.args[0]] == ["qa", "text"] and compare.table.rowCount() == 2
    renamed = {"demo": "full precision", "RTN W4": "RTN W4"}  # the CLI names models by their folders
    for ours, theirs in zip(gui["rows"], cli["rows"], strict=True):
        assert {k: ours[k] for k in MEASURED} == {**{k: theirs[k] for k in MEASURED}, "model": renamed[theirs["model"]]}
    assert gui["items"]["qa"][0]["flips"]["RTN W4"] == cli["items"]["qa"][0]["flips"]["RTN W4"]
    qa = done.args[0][0]
    assert shown(compare, 0, 3) == score_text(qa) and shown(compare, 0, VERDICT_COLUMN) == qa["verdict"]
    assert compare.table.item(1, 2).text().endswith("nats/token")
    # The plots are the report's own SVGs, with the layer profile the variant carries.
    tabs = {compare.plots.tabText(i): compare.plots.widget(i) for i in range(compare.plots.count())}
    assert list(tabs) == list(charts(gui)) and "Layer error" in tabs
    for title, view in tabs.items():
        assert view.svg == charts(gui)[title] and view.renderer().isValid()

    assert compare.save_report(tmp_path / "gui")
    assert read_report(tmp_path / "gui")["rows"] == gui["rows"]
    assert {p.name for p in (tmp_path / "gui").iterdir()} == {"report.json", "report.csv", "report.html"}


def test_a_saved_report_opens_with_its_rows_and_plots(qtbot, compare, tmp_path):
    from dllm_studio.report import charts, read_report, write_report

    report = {"version": 1, "kind": "compare", "base": "demo", "split": "test", "limit": 5, "suites": ["qa"],
              "models": [], "items": {}, "settings": {}, "notes": [], "rows": [
                  _row("demo", 1.0, None), _row("RTN W3", 0.6, 0.4), _row("RTN W2", 0.2, 0.8)]}
    write_report(report, tmp_path)
    assert compare.open_report(tmp_path / "report.json")
    assert compare.table.rowCount() == 2  # a line per variant, each against the base
    assert shown(compare, 0, 0) == "RTN W3 qa" and shown(compare, 1, 3) == "20.0 % [3.6–62.4]"
    assert [compare.plots.tabText(i) for i in range(compare.plots.count())] == list(charts(read_report(tmp_path)))
    assert compare.state.text() == "Opened report.json"

    (tmp_path / "bad.json").write_text('{"kind": "something else"}')
    assert not compare.open_report(tmp_path / "bad.json")
    (dialog,) = error_dialogs()
    assert "not a dLLM Studio report" in dialog.text() and compare.table.rowCount() == 2  # nothing lost
    dialog.close()


def _row(model, score, drop):
    from dllm_studio.eval.stats import wilson

    low, high = wilson(round(score * 5), 5)
    return {"suite": "qa", "model": model, "metric": "accuracy", "items": 5, "score": score, "score_low": low,
            "score_high": high, "relative_drop": drop, "drop_low": None, "drop_high": None,
            "absolute_drop": None if drop is None else drop * 1.0, "absolute_drop_low": None, "absolute_drop_high": None,
            "p_value": None if drop is None else 0.5, "test": "exact McNemar", "band": "",
            "verdict": "baseline" if drop is None else "not significant at n = 5", "agreement": None,
            "flipped_items": None, "first_flip_mean": None, "ms_per_step": 5.0, "forward_passes_per_answer": 16.0,
            "forward_equivalents_per_answer": 16.0, "wall_s_per_answer": 0.1, "tokens_per_step": 1.0,
            "peak_rss_bytes": 1 << 28, "weight_bytes": 4_000_000 if drop is None else 1_000_000,
            "bits_per_weight": 32 if drop is None else 3.2, "bits_per_parameter": 32.0, "kernels": {}}


def fake_evaluations(monkeypatch, compare, fp_model, fp_correct, q_correct):
    """The engine's `evaluate` answering from fixed per-item correctness, so a test knows the flips."""
    from dllm_studio.eval.runner import EvalResult, ItemRecord
    from dllm_studio.events import EvalProgress

    def evaluate(model, suite, overrides=None, limit=None, cancel=None, unsafe_code_eval=False, keep_steps=False):
        correct = fp_correct if model is fp_model else q_correct
        records = [ItemRecord(f"{suite.name}-{i}", "prompt", "answer", "answer" if c else "wrong", c, "")
                   for i, c in enumerate(correct)]
        for done in range(1, len(records) + 1):
            yield EvalProgress(suite.name, done, len(records), records[done - 1].id, correct[done - 1],
                               sum(correct[:done]) / done)
        return EvalResult(suite.name, "", len(records), sum(correct) / len(records), None, 1.0, 1.0, 0.01, 0,
                          0.05, None, records)

    monkeypatch.setattr("dllm_studio.compare.evaluate", evaluate)
    compare.flips.setChecked(False)  # the fake answers have no denoising steps to teacher-force


def shown(compare, row: int, column: int) -> str:
    """A cell's text as read, whatever lines it is broken into."""
    return " ".join(compare.table.item(row, column).text().split())


def test_the_table_fits_a_1024_pixel_window_unscrolled(qtbot, monkeypatch, compare, variant, demo_model):
    fake_evaluations(monkeypatch, compare, demo_model, [True] * 20, [True] * 17 + [False] * 3)
    choose(compare, "qa", limit=20)
    compare.resize(860, 600)  # the page's width in a 1024-pixel window, beside the sidebar
    compare.show()
    with qtbot.waitSignal(compare.finished, timeout=TIMEOUT_MS):
        compare.run()
    table = compare.table
    qtbot.waitUntil(lambda: table.horizontalHeader().length() > 0, timeout=5_000)
    assert table.horizontalHeader().length() <= table.viewport().width()  # every column visible, no scrolling
    assert shown(compare, 0, 3) == "85.0 % [64.0–94.8]"


def test_one_flipped_item_is_not_significant(qtbot, monkeypatch, compare, variant, demo_model, tmp_path):
    from ui.pages.compare import DROP_COLUMN, VERDICT_COLUMN

    fake_evaluations(monkeypatch, compare, demo_model, [True] * 5, [True] * 4 + [False])
    choose(compare, "qa", limit=5)
    with qtbot.waitSignal(compare.finished, timeout=TIMEOUT_MS) as done:
        compare.run()
    (row,) = done.args[0]
    assert row["relative_drop"] == pytest.approx(0.2) and row["p_value"] == 1.0  # exact McNemar, b = 1, c = 0
    assert row["band"] == "" and row["verdict"] == "not significant at n = 5" and row["agreement"] == 0.8
    verdict = compare.table.item(0, VERDICT_COLUMN)
    assert shown(compare, 0, VERDICT_COLUMN) == "not significant at n = 5"
    assert verdict.background().style() == Qt.BrushStyle.NoBrush  # no band colour for what the items cannot show
    change = shown(compare, 0, DROP_COLUMN)
    assert change.startswith("\u221220.0 % [\u2212") and "+" in change  # the interval straddles no change
    assert shown(compare, 0, 3) == "80.0 % [37.6–96.4]"  # Wilson 4/5
    assert shown(compare, 0, 6) == "80 %"  # agreement, and no flips: none were asked for
    assert "exact McNemar" in verdict.toolTip() and "p = 1" in verdict.toolTip()

    assert compare.save_report(tmp_path)
    saved = {r["model"]: r for r in csv.DictReader((tmp_path / "report.csv").open())}
    assert saved["RTN W4"]["verdict"] == "not significant at n = 5" and float(saved["RTN W4"]["p_value"]) == 1.0
    assert float(saved["RTN W4"]["score_low"]) == pytest.approx(0.3755, abs=1e-4)
    assert float(saved["RTN W4"]["drop_low"]) < 0 < float(saved["RTN W4"]["drop_high"])
    assert not list(tmp_path.glob(".report*"))  # the temporary files were renamed into place

    assert compare.progress.value() == compare.progress.maximum() > 0  # a finished run reads full


def test_ten_flips_in_twenty_are_named_and_tinted(qtbot, monkeypatch, compare, variant, demo_model):
    from ui.pages.compare import VERDICT_COLUMN

    fake_evaluations(monkeypatch, compare, demo_model, [True] * 20, [False] * 10 + [True] * 10)
    choose(compare, "qa", limit=20)
    with qtbot.waitSignal(compare.finished, timeout=TIMEOUT_MS) as done:
        compare.run()
    assert done.args[0][0]["band"] == "significant" and done.args[0][0]["p_value"] == pytest.approx(0.001953125)
    verdict = compare.table.item(0, VERDICT_COLUMN)
    assert verdict.text() == "significant" and verdict.background().style() != Qt.BrushStyle.NoBrush


def test_compare_cancel_keeps_finished_rows(qtbot, compare, session, variant, tmp_path):
    from dllm_studio.report import read_report

    finished = []
    compare.finished.connect(finished.append)
    choose(compare, "qa", "math", "code", limit=3)
    compare.run()
    assert compare.cancel_button.isEnabled() and not compare.run_button.isEnabled()
    qtbot.waitUntil(lambda: compare.table.rowCount() >= 1, timeout=TIMEOUT_MS)
    compare.cancel_button.click()
    qtbot.waitUntil(lambda: not session.busy, timeout=TIMEOUT_MS)
    assert compare.state.text() == "Cancelled" and not finished
    assert 1 <= compare.table.rowCount() < 3 and compare.table.item(0, 0).text() == "qa"
    assert compare.run_button.isEnabled() and not compare.cancel_button.isEnabled()
    assert compare.save_button.isEnabled()  # finished rows can still be saved
    assert compare.save_report(tmp_path)
    saved = read_report(tmp_path)
    assert saved["rows"] == compare.rows and saved["notes"][0].startswith("Incomplete")


def test_compare_suite_files(qtbot, compare, tmp_path):
    good = tmp_path / "mine.jsonl"
    good.write_text(json.dumps({"id": "a", "suite": "qa", "prompt": "Capital of France?", "answer": "Paris"}) + "\n")
    assert compare.add_suite_file(good)
    assert compare.suite_boxes[str(good.resolve())].isChecked()
    assert compare.chosen_suites()[-1] == ("mine", good.resolve())

    bad = tmp_path / "broken.jsonl"
    bad.write_text(good.read_text() + '{"id": "b", "suite": "qa", "prompt": \n')
    assert not compare.add_suite_file(bad)
    qtbot.waitUntil(lambda: len(error_dialogs()) == 1, timeout=5000)
    dialog = error_dialogs()[0]
    assert "line 2" in dialog.text()
    dialog.close()
    assert str(bad.resolve()) not in compare.suite_boxes


def test_compare_explains_missing_variant(compare, session):
    assert not compare.run_button.isEnabled()
    assert "Quantize" in compare.hint.text()


# ---- Export ----------------------------------------------------------------------------------------

def export_to(qtbot, page, out, fmt, force=False):
    page.format.setCurrentIndex(page.format.findData(fmt))
    page.path.setText(str(out))
    page.force.setChecked(force)
    with qtbot.waitSignal(page.exported, timeout=TIMEOUT_MS) as done:
        page.export()
    return done.args


@pytest.mark.parametrize("fmt", ["native", "gptq"])
def test_export_writes_and_verifies(qtbot, export_page, session, variant, studio_settings, tmp_path, fmt):
    out = tmp_path / f"demo-{fmt}"
    path, report = export_to(qtbot, export_page, out, fmt)
    assert path == str(out) and not session.busy
    assert {"config.json", "model.safetensors"} <= {name for name, _ in report["files"]}
    assert report["total_bytes"] == sum(p.stat().st_size for p in out.iterdir())
    # Measured: both layouts reload to exactly the in-memory variant's logits on the demo model.
    assert report["max_abs_logit_diff"] == 0.0 and report["argmax_agrees"]
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == {"native": "dllm_studio", "gptq": "gptq"}[fmt]
    assert variant.folder == out
    assert studio_settings.get("export/format") == fmt
    assert export_page.result_box.isVisibleTo(export_page)
    assert export_page.verified.text() == "Verified: reloaded model gives identical outputs"
    assert export_page.progress.value() == export_page.progress.maximum() > 0  # a finished export reads full


def test_export_refuses_existing_folder_without_force(qtbot, export_page, session, variant, tmp_path):
    out = tmp_path / "model"
    export_to(qtbot, export_page, out, "native")
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    with qtbot.waitSignal(session.job_failed, timeout=TIMEOUT_MS) as failed:
        export_page.export()
    assert "already exists" in failed.args[1]
    assert export_page.state.text() == "Export failed" and export_page.export_button.isEnabled()
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # nothing partial left

    _, report = export_to(qtbot, export_page, out, "native", force=True)
    assert report["max_abs_logit_diff"] == 0.0


def test_export_suggests_a_folder(export_page, variant):
    assert export_page.path.text().endswith("rtn-w4-native")
    export_page.format.setCurrentIndex(export_page.format.findData("gptq"))
    assert export_page.path.text().endswith("rtn-w4-gptq")
    assert "vLLM" in export_page.format.itemData(1, 3)  # 3: Qt.ToolTipRole


@pytest.fixture
def models_page(open_page):
    from ui.pages.models import ModelsPage

    return open_page(ModelsPage)


def hold_after_first_event(monkeypatch, module, name, pressed):
    """Replace the job `module.name` with one that waits, after its first event, until the test has pressed
    cancel: the worker would otherwise finish a demo-sized job before the GUI thread sees that event."""
    real = getattr(module, name)

    def held(*args, **kwargs):
        job = real(*args, **kwargs)
        yield next(job)
        assert pressed.wait(30)
        return (yield from job)

    monkeypatch.setattr(module, name, held)


def test_cancelling_an_export_keeps_nothing(qtbot, export_page, session, variant, tmp_path, monkeypatch):
    import threading

    import ui.pages.export

    pressed = threading.Event()
    hold_after_first_event(monkeypatch, ui.pages.export, "export", pressed)
    out = tmp_path / "exports" / "model"
    out.parent.mkdir()
    export_page.path.setText(str(out))

    def press_cancel(_event):
        session.cancel()  # what Esc (MainWindow.stop) does
        pressed.set()

    with qtbot.waitSignal(session.busy_changed, timeout=TIMEOUT_MS, check_params_cb=lambda busy, _t: not busy):
        export_page.export()
        export_page.job.event.connect(press_cancel)
    assert export_page.state.text() == "Cancelled; nothing was kept"
    assert export_page.progress.value() == 0  # a stopped export does not read as done
    assert list(out.parent.iterdir()) == []  # no folder, no hidden temporary folder
    assert variant.folder is None and not export_page.result_box.isVisibleTo(export_page)
    assert export_page.export_button.isEnabled()


def test_an_exported_variant_shows_its_folder_and_reopening_it_selects_it(qtbot, export_page, models_page, session,
                                                                         variant, tmp_path):
    def row():
        return models_page.variant_list.item(0).text()

    assert "in memory (export it to keep it)" in row()
    out = tmp_path / "model"
    export_to(qtbot, export_page, out, "native")
    assert row().endswith(f" — {out}") and "in memory" not in row()  # the list follows the export

    export_page.variant.setCurrentIndex(-1)
    (tmp_path / "elsewhere").mkdir()
    models_page.open(str(tmp_path / "elsewhere" / ".." / "model"))  # the same folder, spelled differently
    assert not session.busy and list(session.variants) == ["RTN W4"]  # nothing loaded, no duplicate
    assert export_page.variant.currentText() == "RTN W4" and models_page.variant_list.currentRow() == 0
    assert "already open as the quantized variant RTN W4" in models_page.status.text()


def test_export_over_an_existing_folder_names_the_replace_control(qtbot, export_page, session, variant, tmp_path):
    (tmp_path / "model").mkdir()
    export_page.path.setText(str(tmp_path / "model"))
    with qtbot.waitSignal(session.job_failed, timeout=TIMEOUT_MS) as failed:
        export_page.export()
    message = failed.args[1]
    assert f"\u201c{export_page.force.text()}\u201d" in message and "Replace if it exists" in message
    assert "--" not in message
