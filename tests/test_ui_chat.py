"""The Chat page: two panes denoising one prompt in turn, drawn step by step, stoppable, replayable and saved."""

import json

import pytest
from PySide6.QtGui import QGuiApplication
from qt_helpers import error_dialogs

from dllm_studio import jobs
from dllm_studio.sampling import GenerationConfig
from ui.pages.chat import QUEUED, ChatPage
from ui.session import Variant

pytestmark = pytest.mark.gui

PROMPT = "What is the capital of France?"
SHORT = {"gen_length": 16, "steps": 16, "block_length": 16}
TIMEOUT = 60_000


def make_page(qtbot, session, settings, rtn4=None, **sampler):
    for name, value in {**SHORT, **sampler}.items():
        settings.set(f"chat/{name}", value)
    page = ChatPage(session, settings)
    qtbot.addWidget(page)
    if rtn4 is not None:
        session.add_variant(Variant("RTN W4", rtn4.model, rtn4.summary))
    return page


def ask(qtbot, page, prompt):
    page.input.setPlainText(prompt)
    with qtbot.waitSignal(page.turn_finished, timeout=TIMEOUT):
        page.send()


def engine_answer(model, messages, **sampler):
    return jobs.run(model.denoise(model.chat_ids(messages), GenerationConfig(**{**SHORT, **sampler}))).text


def test_send_animates_both_panes_in_turn_and_matches_the_engine(qtbot, session, studio_settings, demo_rtn4):
    page = make_page(qtbot, session, studio_settings, demo_rtn4)
    frames, answers = {"fp": [], "quant": []}, {}
    page.frame_shown.connect(lambda pane, step: frames[pane].append(step))
    page.answer_finished.connect(lambda pane, text: answers.__setitem__(pane, text))
    page.input.setPlainText(PROMPT)
    with qtbot.waitSignal(page.turn_finished, timeout=TIMEOUT):
        page.send()
        assert page.quant.status.text() == QUEUED  # one model computes at a time
        assert not page.send_button.isEnabled() and page.stop_button.isEnabled()

    assert frames == {"fp": list(range(1, 17)), "quant": list(range(1, 17))}  # every step drawn, in order
    messages = [{"role": "user", "content": PROMPT}]
    assert answers == {"fp": engine_answer(session.model, messages), "quant": engine_answer(demo_rtn4.model, messages)}
    assert page.fp.last_answer() == answers["fp"]
    assert answers["fp"] in page.fp.browser.toPlainText() and PROMPT in page.fp.browser.toPlainText()
    assert "16 steps" in page.fp.stats.text() and "ms/step" in page.fp.stats.text()
    assert "forward passes" in page.quant.stats.text() and "peak resident memory" in page.quant.stats.toolTip()
    assert "differ" in page.diff_label.text() or "identical" in page.diff_label.text()
    assert page.send_button.isEnabled() and not page.stop_button.isEnabled() and not session.busy

    # replay: step 1 of 16 has committed one token, the rest are still masked
    assert page.fp.replay.isEnabled() and page.fp.replay.maximum() == 16
    with qtbot.waitSignal(page.frame_shown, timeout=1000, check_params_cb=lambda pane, step: (pane, step) == ("fp", 1)):
        page.fp.replay.setValue(1)
    assert page.fp.browser.toPlainText().count("░") >= 14

    page.fp.copy.click()
    assert QGuiApplication.clipboard().text() == answers["fp"]


def test_stop_cancels_the_running_pane_and_the_queued_one(qtbot, session, studio_settings, demo_rtn4):
    page = make_page(qtbot, session, studio_settings, demo_rtn4, gen_length=256, steps=256, block_length=256)
    quant_frames = []
    page.frame_shown.connect(lambda pane, step: pane == "quant" and quant_frames.append(step))
    page.input.setPlainText(PROMPT)
    with qtbot.waitSignal(page.frame_shown, timeout=TIMEOUT):
        page.send()
    with qtbot.waitSignal(page.turn_finished, timeout=TIMEOUT):
        page.stop()

    fp, quant = page.fp.turns[-1], page.quant.turns[-1]
    assert fp.state == "stopped" and 1 <= len(fp.frames) < 256
    assert page.fp.status.text() == f"Stopped at step {len(fp.frames)} of 256."
    assert "(stopped)" in page.fp.browser.toPlainText()  # the partial answer stays
    assert quant.state == "skipped" and not quant.frames and not quant_frames  # the quantized pane never ran
    assert "stopped before it started" in page.quant.status.text()
    assert not session.busy and page.send_button.isEnabled()
    assert page.fp.history() == []  # a stopped answer is not sent back to the model


def test_invalid_settings_are_shown_inline_and_nothing_is_sent(qtbot, session, studio_settings):
    page = make_page(qtbot, session, studio_settings)
    page.gen_length.setValue(10)
    page.block_length.setValue(4)
    assert page.sampler_error.isVisibleTo(page) and "multiple" in page.sampler_error.text()
    page.input.setPlainText(PROMPT)
    page.send()
    assert not page.running and not session.busy and page.fp.turns == []
    page.block_length.setValue(5)
    page.steps.setValue(16)
    assert not page.sampler_error.isVisibleTo(page)
    assert (studio_settings.get("chat/gen_length"), studio_settings.get("chat/block_length")) == (10, 5)  # saved


def test_settings_load_on_construction_and_empty_prompts_do_nothing(qtbot, session, studio_settings):
    studio_settings.set("chat/remasking", "margin")
    studio_settings.set("chat/temperature", 0.5)
    page = make_page(qtbot, session, studio_settings, seed=7)
    assert (page.remasking.currentText(), page.temperature.value(), page.seed.value()) == ("margin", 0.5, 7)
    page.input.setPlainText("   \n")
    page.send()
    assert not page.running and not session.busy


def test_without_a_variant_only_the_full_precision_pane_runs(qtbot, session, studio_settings):
    page = make_page(qtbot, session, studio_settings)
    assert page.quant.hint.isVisibleTo(page) and "Quantize page" in page.quant.hint.text()
    answers = []
    page.answer_finished.connect(lambda pane, text: answers.append(pane))
    ask(qtbot, page, PROMPT)
    assert answers == ["fp"]
    assert page.quant.turns[-1].state == "skipped" and page.diff_label.text() == ""


def test_multi_turn_sends_each_pane_its_own_history(qtbot, session, studio_settings, demo_rtn4):
    page = make_page(qtbot, session, studio_settings, demo_rtn4)
    ask(qtbot, page, PROMPT)
    ask(qtbot, page, "And of Germany?")
    for pane, model in ((page.fp, session.model), (page.quant, demo_rtn4.model)):
        first, second = pane.turns
        messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.answer},
                    {"role": "user", "content": "And of Germany?"}]
        assert second.prompt_ids == model.chat_ids(messages)
        assert second.answer == engine_answer(model, messages)
        text = pane.browser.toPlainText()
        assert text.index(PROMPT) < text.index("And of Germany?")
    page.new_chat()
    assert page.fp.turns == page.quant.turns == [] and page.fp.browser.toPlainText() == ""
    assert not page.fp.copy.isEnabled() and not page.save_button.isEnabled()


def test_save_then_open_round_trips(qtbot, session, studio_settings, demo_rtn4, tmp_path):
    page = make_page(qtbot, session, studio_settings, demo_rtn4)
    ask(qtbot, page, PROMPT)
    (tmp_path / "saved").mkdir()
    path = tmp_path / "saved" / "conversation.json"
    assert page.save_conversation(path)
    assert [p.name for p in path.parent.iterdir()] == ["conversation.json"]  # no temporary file left behind
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == 1 and data["variant"] == "RTN W4" and data["sampler"]["steps"] == 16
    assert len(data["panes"]["fp"][0]["steps"]) == 16

    studio_settings.set("chat/steps", 8)
    other = make_page(qtbot, session, studio_settings, steps=8)
    assert other.open_conversation(path)
    assert other.steps.value() == 16  # the conversation's sampler settings come back
    for old, new in zip(page.panes, other.panes):
        assert new.last_answer() == old.last_answer()
        assert new.browser.toPlainText() == old.browser.toPlainText()
        assert new.stats.text() == old.stats.text()
        assert new.replay.isEnabled() and new.replay.maximum() == 16
    assert other.diff_label.text() == page.diff_label.text()
    other.fp.replay.setValue(1)
    assert other.fp.browser.toPlainText().count("░") >= 14


@pytest.mark.parametrize("content", ["{not json", '{"version": 1, "panes": {"fp": [{"prompt": 3}]}}', "[1, 2]"])
def test_a_malformed_conversation_gives_an_error_dialog(qtbot, session, studio_settings, tmp_path, content):
    page = make_page(qtbot, session, studio_settings)
    path = tmp_path / "broken.json"
    path.write_text(content, encoding="utf-8")
    assert not page.open_conversation(path)
    dialogs = error_dialogs()
    assert len(dialogs) == 1 and "not a dLLM Studio conversation" in dialogs[0].text()
    dialogs[0].close()
    assert page.fp.turns == []
