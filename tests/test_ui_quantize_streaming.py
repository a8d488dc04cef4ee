"""The Quantize page for models larger than memory: streaming into a folder (with resume) and a memory budget."""

import pytest
from checkpoints import make_llada
from safetensors.torch import load_file

pytestmark = pytest.mark.gui


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    return make_llada(tmp_path_factory.mktemp("llada-streamed"), shards=3, n_layers=4)


@pytest.fixture
def llada_page(qtbot, studio_settings, sharded_dir):
    """The Quantize page on a session holding the tiny sharded LLaDA, streaming RTN W4 into a fresh folder."""
    from qt_helpers import studio_session

    from dllm_studio.models import load_model
    from ui.pages.quantize import QuantizePage

    sessions = studio_session(load_model(sharded_dir, dtype="float32"))
    session = next(sessions)
    page = QuantizePage(session, studio_settings)
    qtbot.addWidget(page)
    page.method.setCurrentIndex(page.method.findData("rtn"))
    page.samples.setValue(2)
    page.seq_len.setValue(32)
    yield page
    next(sessions, None)


def weights(folder):
    tensors = {}
    for path in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def stream_once(qtbot, page, out):
    page.streaming.setChecked(True)
    page.set_output_folder(str(out))
    assert page.start_button.isEnabled(), page.preflight.text()
    with qtbot.waitSignal(page.streamed, timeout=60_000) as done:
        page.start_button.click()
    return done.args


def test_streaming_writes_the_folder_and_says_from_how_many_shards(qtbot, llada_page, tmp_path):
    page = llada_page
    folder, report = stream_once(qtbot, page, tmp_path / "out")
    assert folder == str(tmp_path / "out") and (tmp_path / "out" / "config.json").is_file()
    assert page.started_streaming.shards == 3 and page.started_streaming.first_block == 1
    assert "streaming from 3 shards: blocks 1-4 of 4" in page.log.toPlainText()
    assert page.progress.text().startswith("done: 28 layers in") and page.progress.text().endswith(", written to out")
    assert f"written to <b>{tmp_path / 'out'}</b>: {report['shards']} shard" in page.result.text()
    assert not page.open_button.isHidden()
    assert len(page.layer_errors) == 7 * 4 and page.memory_chart.data
    assert page.session.variants == {}  # a description on meta: it becomes a variant by opening the folder
    from ui.pages.models import ModelsPage

    models = ModelsPage(page.session, page.settings)
    qtbot.addWidget(models)
    page.open_requested.connect(models.open)  # as the main window wires them
    with qtbot.waitSignal(models.loaded, timeout=30_000):
        page.open_button.click()
    assert list(page.session.variants) == ["out"] and page.session.variants["out"].model.device.type == "cpu"


def test_cancel_keeps_the_blocks_and_start_again_resumes(qtbot, llada_page, tmp_path, sharded_dir):
    from dllm_studio import jobs
    from dllm_studio.models import load_model
    from dllm_studio.quant.streaming import quantize_to_folder

    page, session = llada_page, llada_page.session
    page.streaming.setChecked(True)
    page.set_output_folder(str(tmp_path / "out"))
    cancelled = []

    def on_block(event):
        if type(event).__name__ == "BlockQuantized" and not cancelled:
            cancelled.append(event)
            page.cancel_button.click()

    with qtbot.waitSignal(session.busy_changed, timeout=60_000, check_params_cb=lambda busy, _t: not busy):
        page.start_button.click()
        page.job.event.connect(on_block)
    assert cancelled and not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
    assert page.progress.text() == ("cancelled: the finished blocks are kept; Start again with the same recipe and "
                                    "folder resumes")
    done = page.started_streaming
    with qtbot.waitSignal(page.streamed, timeout=60_000):
        page.start_button.click()
    resumed = page.started_streaming
    assert resumed.first_block > 1 and resumed.note.startswith("resumed: blocks 1-")
    assert f"({resumed.note})" in page.log.toPlainText() and resumed.note in page.result.text()
    assert done.first_block == 1

    whole = jobs.run(quantize_to_folder(load_model(sharded_dir, dtype="float32", device="meta"), page.recipe(),
                                        tmp_path / "whole"))[1]
    ours, theirs = weights(tmp_path / "out"), weights(tmp_path / "whole")
    assert ours.keys() == theirs.keys() and whole["shards"] >= 1
    assert all(ours[k].equal(theirs[k]) for k in ours)


def test_streaming_is_checked_for_you_when_memory_is_short(llada_page, monkeypatch):
    import ui.pages.quantize
    from dllm_studio.quant.pipeline import working_set

    page = llada_page
    model, recipe = page.session.model, page.recipe()
    in_memory = working_set(model, recipe)
    needed = sum(in_memory.values()) - in_memory["model"]
    streamed = sum(working_set(model, recipe, streaming=True).values())
    assert streamed < needed  # or there would be nothing to show
    free = int(needed / 0.9) - 1  # the in-memory run just won't fit; the streamed one fits
    monkeypatch.setattr(ui.pages.quantize, "available_bytes", lambda device="cpu": free)
    assert not page.streaming.isChecked()
    page.samples.setValue(3)  # any change runs the preflight again
    page.samples.setValue(2)
    assert page.streaming.isChecked() and "Checked for you" in page.stream_note.text()
    from dllm_studio.memory import human

    assert f"Streaming holds about <b>{human(streamed)}</b>" in page.preflight.text()


def test_a_budget_plans_the_bits_shows_them_and_quantizes_with_them(qtbot, quantize_page, session):
    from dllm_studio import jobs
    from dllm_studio.quant.budget import budget_plan
    from dllm_studio.quant.qlinear import QuantLinear

    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("rtn"))
    page.samples.setValue(2)
    page.seq_len.setValue(32)
    page.precision.setCurrentIndex(page.precision.findData("bpw"))
    page.budget.setValue(3.2)
    recipe = page.recipe()
    assert recipe.target_bpw == 3.2 and page.start_button.isEnabled()
    assert not page.streaming.isEnabled() and "sensitivity pass" in page.streaming.toolTip()
    plan = jobs.run(budget_plan(session.model, recipe))
    assert len(set(plan.bits.values())) > 1  # a real mix, or the map proves little
    with qtbot.waitSignal(page.finished, timeout=60_000) as done:
        page.start_button.click()
    assert page.bit_map.shown_bits() == plan.bits and not page.plan_box.isHidden()
    quantized = {name: m.bits for name, m in done.args[0].model.module.named_modules() if isinstance(m, QuantLinear)}
    assert {name: quantized[name] for name in plan.bits} == plan.bits
    counts = {b: list(plan.bits.values()).count(b) for b in plan.bits.values()}
    assert page.plan_label.text().startswith(", ".join(f"{n} at {b} bits" for b, n in sorted(counts.items())))
    assert page.progress.text().startswith("done")


def test_streaming_and_a_budget_exclude_each_other(quantize_page):
    from ui.pages.quantize import NO_STREAMED_BUDGET

    page = quantize_page
    page.method.setCurrentIndex(page.method.findData("rtn"))
    page.streaming.setChecked(True)
    assert not page.precision.isEnabled() and page.precision.toolTip() == NO_STREAMED_BUDGET
    page.streaming.setChecked(False)
    page.precision.setCurrentIndex(page.precision.findData("budget"))
    assert not page.streaming.isEnabled() and page.streaming.toolTip() == f"Not available: {NO_STREAMED_BUDGET}"
    page.method.setCurrentIndex(page.method.findData("smoothquant"))  # one layer grid: no plan possible
    assert page.precision.currentData() == "uniform" and not page.precision.isEnabled()
    assert "Mixed precision" in page.precision.toolTip() and page.streaming.isEnabled()
