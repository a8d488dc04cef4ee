"""The Chat page: two panes denoising one prompt in turn, drawn step by step, stoppable, replayable and saved."""

import json

import pytest
from PySide6.QtCore import QRect, Qt
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import QWidget
from qt_helpers import error_dialogs, studio_session

from dllm_studio import jobs
from dllm_studio.cli import main as cli
from dllm_studio.conversation import SAMPLER_FIELDS, Turn
from dllm_studio.sampling import GenerationConfig
from dllm_studio.memory import human
from ui.pages.chat import BLANK_PROMPT, NO_TEXT, QUEUED, SAMPLER, SINGLE_TURN, ChatPage
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


def engine_result(model, messages, **sampler):
    return jobs.run(model.denoise(model.chat_ids(messages), GenerationConfig(**{**SHORT, **sampler})))


def engine_answer(model, messages, **sampler):
    return engine_result(model, messages, **sampler).text


@pytest.fixture
def llada_session(qtbot, llada):
    """A session on the tiny LLaDA, a multi-turn model (its config does not say single_turn)."""
    yield from studio_session(llada)


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
    identical, speed = page.diff_label.text().split("\n")
    assert answers["fp"] == "Paris" and identical == "Last answers: identical."  # W4 keeps it
    # the speed and size, and why: tests pin the reference kernel (conftest), which dequantizes every step
    assert speed.startswith("RTN W4") and " runs dequant here: " in speed and "dequantize their weights" in speed
    ratio = page.quant.turns[-1].stats["ms_per_step"] / page.fp.turns[-1].stats["ms_per_step"]
    size = session.model.weight_bytes() / demo_rtn4.model.weight_bytes()
    assert f"{size:.1f}× smaller" in speed and (f"{ratio:.1f}× " in speed or "as fast" in speed)
    assert "kernels dequant ×" in page.quant.stats.text() and "kernels" not in page.fp.stats.text()
    assert "<b>dequant</b>: dequantize tiles + dense matmul" in page.quant.stats.toolTip()
    assert "This answer's quantized layers ran" not in page.fp.stats.toolTip()
    assert not page.stop_button.isEnabled() and not session.busy and page.input.toPlainText() == ""
    page.input.setPlainText("And of Germany?")
    assert page.send_button.isEnabled()

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
    page.input.setPlainText(PROMPT)
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


def test_settings_load_on_construction(qtbot, session, studio_settings):
    studio_settings.set("chat/remasking", "margin")
    studio_settings.set("chat/temperature", 0.5)
    page = make_page(qtbot, session, studio_settings, seed=7)
    assert (page.remasking.currentText(), page.temperature.value(), page.seed.value()) == ("margin", 0.5, 7)


def test_a_blank_prompt_disables_send_with_a_hint(qtbot, session, studio_settings):
    page = make_page(qtbot, session, studio_settings)
    page.show()
    for blank in ("", "   \n\t"):
        page.input.setPlainText(blank)
        assert not page.send_button.isEnabled()
        assert page.prompt_hint.isVisible() and page.prompt_hint.text() == BLANK_PROMPT
        page.send()  # what Ctrl+Enter calls: nothing happens
        assert not page.running and not session.busy and page.fp.turns == []
    page.input.setPlainText(" Hi ")
    assert page.send_button.isEnabled() and not page.prompt_hint.isVisible()


def test_without_a_variant_only_the_full_precision_pane_runs(qtbot, session, studio_settings):
    page = make_page(qtbot, session, studio_settings)
    assert page.quant.hint.isVisibleTo(page) and "Quantize page" in page.quant.hint.text()
    answers = []
    page.answer_finished.connect(lambda pane, text: answers.append(pane))
    ask(qtbot, page, PROMPT)
    assert answers == ["fp"]
    assert page.quant.turns[-1].state == "skipped" and page.diff_label.text() == ""


def test_a_multi_turn_model_is_sent_the_whole_history(qtbot, llada_session, studio_settings, llada):
    page = make_page(qtbot, llada_session, studio_settings)
    page.show()
    assert not page.turn_note.isVisible()
    ask(qtbot, page, PROMPT)
    ask(qtbot, page, "And of Germany?")
    first, second = page.fp.turns
    messages = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": first.answer},
                {"role": "user", "content": "And of Germany?"}]
    assert second.prompt_ids == llada.chat_ids(messages)
    assert second.answer == engine_answer(llada, messages)
    text = page.fp.browser.toPlainText()
    assert text.index(PROMPT) < text.index("And of Germany?")
    assert not page.turn_note.isVisible()
    page.new_chat()
    assert page.fp.turns == page.quant.turns == [] and page.fp.browser.toPlainText() == ""
    assert not page.fp.copy.isEnabled() and not page.save_button.isEnabled()


def test_the_single_turn_demo_is_sent_only_the_latest_message(qtbot, session, studio_settings, demo_rtn4):
    """Trained on single exchanges, the demo answered a second turn with its history as nonsense."""
    page = make_page(qtbot, session, studio_settings, demo_rtn4)
    page.show()
    assert page.turn_note.isVisible() and page.turn_note.text() == SINGLE_TURN
    ask(qtbot, page, PROMPT)
    ask(qtbot, page, "What is 7 + 5?")
    latest = [{"role": "user", "content": "What is 7 + 5?"}]
    for pane, model in ((page.fp, session.model), (page.quant, demo_rtn4.model)):
        first, second = pane.turns
        assert first.answer == "Paris"
        assert second.prompt_ids == model.chat_ids(latest)  # exactly a fresh chat's prompt
        assert second.answer == "7 + 5 = 12"
        text = pane.browser.toPlainText()  # the whole conversation stays on screen
        assert text.index(PROMPT) < text.index("Paris") < text.index("What is 7 + 5?") < text.index("7 + 5 = 12")
    assert page.turn_note.isVisible()


def test_template_tokens_never_show_in_the_answer_but_the_replay_marks_them(qtbot, session, studio_settings):
    """The demo commits <|start_header_id|> after its answer "d" to this prompt (see test_sampling)."""
    page = make_page(qtbot, session, studio_settings, gen_length=256, steps=256, block_length=32)
    ask(qtbot, page, "Tell me about Paris.")
    turn = page.fp.turns[-1]
    header = session.model.tokenizer.convert_tokens_to_ids("<|start_header_id|>")
    assert turn.answer == "d" and header in turn.token_ids
    assert page.fp.browser.toPlainText() == "You: Tell me about Paris.\nFull precision: d"
    step = next(f.step for f in turn.frames if any(c.token_id == header for c in f.committed))
    page.fp.replay.setValue(step)  # the step that committed it: drawn as a token with no text
    shown = page.fp.browser.toPlainText()
    assert "<|" not in shown and NO_TEXT in shown


def test_save_then_open_round_trips(qtbot, session, studio_settings, demo_rtn4, tmp_path):
    page = make_page(qtbot, session, studio_settings, demo_rtn4)
    ask(qtbot, page, PROMPT)
    (tmp_path / "saved").mkdir()
    path = tmp_path / "saved" / "conversation.json"
    assert page.save_conversation(path)
    assert [p.name for p in path.parent.iterdir()] == ["conversation.json"]  # no temporary file left behind
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["version"] == 2 and data["variant"] == "RTN W4" and data["sampler"]["steps"] == 16
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


def test_the_panel_offers_the_sampler_fields_a_conversation_records():
    assert tuple(SAMPLER) == SAMPLER_FIELDS


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


def test_a_format_1_conversation_opens_with_its_stats(qtbot, session, studio_settings, tmp_path):
    page = make_page(qtbot, session, studio_settings)
    ask(qtbot, page, PROMPT)
    path = tmp_path / "conversation.json"
    assert page.save_conversation(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    stats = data["panes"]["fp"][0]["stats"]  # format 1 named the same two numbers tokens and tokens_per_s
    stats["tokens"], stats["tokens_per_s"] = stats.pop("answer_tokens"), stats.pop("answer_tokens_per_s")
    path.write_text(json.dumps({**data, "version": 1}), encoding="utf-8")
    other = make_page(qtbot, session, studio_settings)
    assert other.open_conversation(path)
    assert other.fp.stats.text() == page.fp.stats.text()


def test_the_pane_and_the_cli_count_the_same_answer_tokens(qtbot, session, studio_settings, capsys):
    """"Paris" ends at token 3 of 16: both faces count 3 answer tokens and divide those by the wall time."""
    page = make_page(qtbot, session, studio_settings)
    ask(qtbot, page, PROMPT)
    assert cli(["generate", "demo", "--prompt", PROMPT, "--gen-length", "16", "--steps", "16", "--block-length", "16",
                "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    pane, engine = page.fp.turns[-1].stats, data["stats"]
    assert data["text"] == page.fp.last_answer() == "Paris"
    assert pane["answer_tokens"] == engine["answer_tokens"] == page.fp.turns[-1].length == 3
    for stats in (pane, engine):
        assert stats["answer_tokens_per_s"] == pytest.approx(3 / stats["wall_time_s"])
    assert "3 answer tokens" in page.fp.stats.text()
    assert f"{pane['answer_tokens_per_s']:.1f} tokens/s" in page.fp.stats.text()


def test_stats_wrap_in_a_narrow_pane_and_every_line_is_visible(qtbot, session, studio_settings):
    """At a 1024 x 700 window the stats were clipped ("32 forward passe")."""
    for name, value in SHORT.items():
        studio_settings.set(f"chat/{name}", value)
    window = QWidget()  # as in the main window, the page gets the space there is, not its size hint
    qtbot.addWidget(window)
    page = ChatPage(session, studio_settings, window)
    window.resize(760, 640)
    page.setGeometry(0, 0, 760, 640)
    window.show()
    ask(qtbot, page, PROMPT)
    label = page.fp.stats

    def every_line_visible():
        area, metrics, text = label.contentsRect(), label.fontMetrics(), label.text()
        wrapped = metrics.boundingRect(QRect(0, 0, area.width(), 10_000), Qt.TextFlag.TextWordWrap, text)
        widest_word = max(metrics.horizontalAdvance(word) for word in text.split())
        return widest_word <= area.width() and wrapped.height() <= area.height()

    qtbot.waitUntil(every_line_visible, timeout=2000)  # once the layout has given the label its wrapped height
    longest = max(label.fontMetrics().horizontalAdvance(line) for line in label.text().splitlines())
    assert longest > label.contentsRect().width()  # the pane is narrow: the lines had to wrap


# ---- Fast-dLLM: the KV cache and parallel decoding ------------------------------------------------
BIRDS = "There were 15 birds on a tree and 2 flew away. How many birds are left?"
FAST = {"cache": "dual", "threshold": 0.9}


def test_cache_and_threshold_answer_as_the_engine_in_fewer_steps_and_replay(qtbot, session, studio_settings):
    """Two blocks of 8: the demo commits 8, then 7 and 1, so 3 frames stand for a ceiling of 16 steps."""
    page = make_page(qtbot, session, studio_settings, block_length=8)
    page.cache.setCurrentText("dual")  # through the panel, as a person would
    page.threshold.setValue(0.9)
    frames = []
    page.frame_shown.connect(lambda pane, step: pane == "fp" and frames.append(step))
    ask(qtbot, page, BIRDS)

    engine = engine_result(session.model, [{"role": "user", "content": BIRDS}], block_length=8, **FAST)
    s, turn = engine.stats, page.fp.turns[-1]
    assert [len(e.committed) for e in engine.steps] == [8, 7, 1] and s.cache_refreshes == 2
    assert turn.answer == engine.text == "15 - 2 = 13" and turn.token_ids == engine.token_ids
    assert frames == [1, 2, 3]  # every frame drawn, however many tokens it committed
    assert [f.refreshed for f in turn.frames] == [e.refreshed for e in engine.steps] == [True, True, False]
    stats = page.fp.stats.text()
    assert stats.startswith(f"3 steps · 5.3 tokens/step · {turn.stats['ms_per_step']:.1f} ms/step\n")
    assert f"\n3 forward passes ({s.forward_equivalents:.1f} full-sequence) · 2 cache refreshes\n" in stats
    assert f"\nKV cache {human(s.cache_bytes)} · peak memory" in stats and s.forward_equivalents < 3
    assert "full-sequence</b>" in page.fp.stats.toolTip() and "tokens/step</b>" in page.fp.stats.toolTip()
    assert page.fp.status.text() == f"Done: {turn.length} tokens in 3 steps (at most 16)."

    assert page.fp.replay.maximum() == 3 and page.fp.replay_label.text() == "Step 3 of 3"
    page.fp.replay.setValue(1)  # the first step committed a whole block at once
    assert page.fp.replay_label.text() == "Step 1 of 3"
    assert page.fp.browser.toPlainText().count("░") == len(engine.steps[0].masked) == 8
    page.fp.replay.setValue(3)
    assert page.fp.browser.toPlainText().endswith(f"Full precision: {engine.text}")


def test_a_stopped_parallel_answer_counts_against_its_ceiling():
    turn = Turn("q", 16, 16, 0, adaptive=True, state="stopped")
    assert turn.step_of(2) == "2 of at most 16"
    assert Turn("q", 16, 16, 0, state="stopped").step_of(2) == "2 of 16"


def test_cache_and_threshold_persist_and_off_means_none(qtbot, session, studio_settings):
    page = make_page(qtbot, session, studio_settings)
    assert (page.cache.currentText(), page.threshold.text(), page.config().threshold) == ("none", "off", None)
    page.cache.setCurrentText("prefix")
    page.threshold.setValue(0.85)
    assert (studio_settings.get("chat/cache"), studio_settings.get("chat/threshold")) == ("prefix", 0.85)
    reopened = make_page(qtbot, session, studio_settings)
    config = reopened.config()
    assert (reopened.cache.currentText(), reopened.threshold.value()) == ("prefix", 0.85)
    assert (config.cache, config.threshold) == ("prefix", 0.85) and config.parallel
    assert "0.9 lost under 1 point of GSM8K" in reopened.threshold.toolTip()
    assert "differ slightly from none" in reopened.cache.toolTip()


def test_a_threshold_with_random_remasking_is_refused_inline(qtbot, session, studio_settings):
    page = make_page(qtbot, session, studio_settings, remasking="random")
    assert not page.sampler_error.isVisibleTo(page)
    page.threshold.setValue(0.9)
    assert page.sampler_error.isVisibleTo(page) and "random remasking" in page.sampler_error.text()
    page.input.setPlainText(PROMPT)
    page.send()
    assert not page.running and page.fp.turns == []
    page.remasking.setCurrentText("margin")
    assert not page.sampler_error.isVisibleTo(page)


def test_a_family_without_a_kv_cache_is_told_before_sending(qtbot, session, studio_settings, monkeypatch):
    monkeypatch.setattr(type(session.model), "no_kv_cache", "its forward takes no past keys")
    page = make_page(qtbot, session, studio_settings, cache="dual")
    reason = (f"The dual cache needs a model whose forward takes a KV cache, and this {session.model.family} "
              "model's does not: its forward takes no past keys. Use cache none.")
    assert page.sampler_error.isVisibleTo(page) and page.sampler_error.text() == reason
    assert f"Not for {session.model.family}: its forward takes no past keys." in page.cache.toolTip()
    page.input.setPlainText(PROMPT)
    page.send()
    assert not page.running and page.fp.turns == []
    page.cache.setCurrentText("none")
    assert not page.sampler_error.isVisibleTo(page)


def test_a_fast_conversation_round_trips_and_one_saved_before_opens(qtbot, session, studio_settings, tmp_path):
    page = make_page(qtbot, session, studio_settings, block_length=8, **FAST)
    ask(qtbot, page, BIRDS)
    path = tmp_path / "fast.json"
    assert page.save_conversation(path)
    other = make_page(qtbot, session, studio_settings)
    assert other.open_conversation(path)
    assert (other.cache.currentText(), other.threshold.value()) == ("dual", 0.9)
    new, old = other.fp, page.fp
    assert [f.refreshed for f in new.turns[-1].frames] == [f.refreshed for f in old.turns[-1].frames]
    assert (new.stats.text(), new.status.text(), new.replay_label.text()) == (
        old.stats.text(), old.status.text(), "Step 3 of 3")

    # as saved before caches and thresholds existed: none of their keys
    data = json.loads(path.read_text(encoding="utf-8"))
    for key in ("cache", "threshold"):
        del data["sampler"][key]
    for turn in data["panes"]["fp"]:
        del turn["adaptive"]
        for key in ("forward_equivalents", "tokens_per_step", "cache_refreshes", "cache_bytes"):
            del turn["stats"][key]
        for step in turn["steps"]:
            del step["refreshed"]
    path.write_text(json.dumps(data), encoding="utf-8")
    before = make_page(qtbot, session, studio_settings, **FAST)
    assert before.open_conversation(path)
    assert (before.cache.currentText(), before.threshold.text()) == ("none", "off")  # GenerationConfig's defaults
    assert before.fp.last_answer() == old.last_answer()
    ms_per_step = old.turns[-1].stats["ms_per_step"]  # the figures it has, and none of those it lacks
    lines = before.fp.stats.text().split("\n")
    assert (lines[0], lines[2]) == (f"3 steps · {ms_per_step:.1f} ms/step", "3 forward passes")
    assert "cache" not in before.fp.stats.text()
    assert not any(f.refreshed for f in before.fp.turns[-1].frames)
    before.fp.replay.setValue(1)
    assert before.fp.replay_label.text() == "Step 1 of 3"
