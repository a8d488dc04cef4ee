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
    from qt_helpers import cancel_at_first

    page, session = llada_page, llada_page.session
    page.streaming.setChecked(True)
    page.set_output_folder(str(tmp_path / "out"))
    cancel_at_first(qtbot, page, session, "BlockQuantized")
    assert not (tmp_path / "out").exists() and (tmp_path / ".out.partial").is_dir()
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
    from dllm_studio import memory
    from dllm_studio.quant.pipeline import working_set

    page = llada_page
    model, recipe = page.session.model, page.recipe()
    in_memory = working_set(model, recipe)
    needed = sum(in_memory.values()) - in_memory["model"]
    streamed = sum(working_set(model, recipe, streaming=True).values())
    assert streamed < needed  # or there would be nothing to show
    free = int(needed / 0.9) - 1  # the in-memory run just won't fit; the streamed one fits
    assert not page.streaming.isChecked()
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": free)
    page.session.refresh_free_memory()  # the preflight takes the figure every face shows, at once
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


def test_a_budget_plans_a_streamed_model_from_its_shards(qtbot, llada_page, tmp_path, sharded_dir):
    from dllm_studio import jobs
    from dllm_studio.models import load_model
    from dllm_studio.quant.budget import budget_plan

    page = llada_page
    page.method.setCurrentIndex(page.method.findData("gptq"))
    page.precision.setCurrentIndex(page.precision.findData("bpw"))
    page.budget.setValue(3.5)
    assert page.streaming.isEnabled() and page.precision.isEnabled()  # the two go together
    stream_once(qtbot, page, tmp_path / "out")
    expected = jobs.run(budget_plan(load_model(sharded_dir, dtype="float32"), page.recipe()))
    assert page.bit_map.shown_bits() == expected.bits and len(set(expected.bits.values())) > 1
    written = load_model(tmp_path / "out", dtype="float32")
    assert dict(written.quantization.layer_bits) == expected.bits


def test_a_model_too_big_to_load_is_described_and_streamed(qtbot, studio_settings, sharded_dir, monkeypatch, tmp_path):
    from qt_helpers import studio_session

    from dllm_studio import memory
    from dllm_studio.models import load_model
    from ui.pages.models import ModelsPage
    from ui.pages.quantize import QuantizePage

    sessions = studio_session(load_model("demo"))
    session = next(sessions)
    models, page = ModelsPage(session, studio_settings), QuantizePage(session, studio_settings)
    qtbot.addWidget(models), qtbot.addWidget(page)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 100_000)  # nothing fits
    models.open(str(sharded_dir))
    qtbot.waitUntil(lambda: "Quantize it streaming" in models.status.text(), timeout=30_000)
    with qtbot.waitSignal(models.stream_requested):
        models.status.linkActivated.emit("stream")
    assert session.described_only and "only described" in session.unavailable()
    assert page.streaming.isChecked() and not page.streaming.isEnabled() and "too big to load" in page.stream_note.text()
    monkeypatch.undo()
    session.refresh_free_memory()  # the window's clock would read the real figure within a second
    page.method.setCurrentIndex(page.method.findData("rtn"))
    page.samples.setValue(2)
    page.seq_len.setValue(32)
    page.set_output_folder(str(tmp_path / "out"))
    with qtbot.waitSignal(page.streamed, timeout=60_000):
        page.start_button.click()
    assert (tmp_path / "out" / "config.json").is_file()
    next(sessions, None)
