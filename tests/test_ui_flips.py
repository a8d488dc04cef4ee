"""The Chat page's decision-flip strip: after a turn, the engine's `decision_flips`, one cell per step."""

import pytest
from PySide6.QtCore import QEvent
from PySide6.QtGui import QColor, QHelpEvent
from PySide6.QtWidgets import QApplication, QToolTip
from test_ui_chat import PROMPT, SHORT, TIMEOUT, ask, engine_result, make_page

from dllm_studio import jobs
from dllm_studio.events import Commit
from dllm_studio.flips import StepDecision, decision_flips
from dllm_studio.sampling import GenerationConfig
from ui.flip_strip import TEACHER_FORCING, cell_kind, cell_tip
from ui.session import Variant
from ui.theme import FLIP_POSITION, FLIP_TOKEN

pytestmark = pytest.mark.gui

NONE = "Decision flips: none — the quantized model makes every full-precision decision"


@pytest.fixture(scope="module")
def demo_rtn2(demo_model):
    """RTN W2: on PROMPT it answers "P is" for "Paris", moving commits at 6 steps and changing a token at the last."""
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    return jobs.run(quantize(demo_model, QuantRecipe(method="rtn", wbits=2, calib_samples=4, seq_len=64)))


def page_with(qtbot, session, settings, name, model):
    page = make_page(qtbot, session, settings)
    session.add_variant(Variant(name, model))
    page.resize(1000, 700)
    page.show()
    return page


def test_the_strip_shows_the_engines_decision_flips(qtbot, session, studio_settings, demo_rtn2):
    page = page_with(qtbot, session, studio_settings, "RTN W2", demo_rtn2.model)
    page.input.setPlainText(PROMPT)
    with qtbot.waitSignal(page.turn_finished, timeout=TIMEOUT):
        page.send()
        assert not page.flips.isVisible()  # hidden while the turn runs
    assert page.fp.last_answer() == "Paris" and page.quant.last_answer() == "P is"

    messages = [{"role": "user", "content": PROMPT}]  # computed here from the engine alone
    fp, quant = (engine_result(m, messages).steps for m in (session.model, demo_rtn2.model))
    expected = decision_flips(demo_rtn2.model, session.model.chat_ids(messages), GenerationConfig(**SHORT), fp, quant)
    strip = page.flips.strip
    assert page.flips.isVisible() and strip.flips == expected
    assert strip.cells == [cell_kind(d) for d in expected.steps] and len(strip.cells) == 16
    assert {"position", "token"} <= set(strip.cells) and "same" in strip.cells
    # (the padding after "Paris", committed in another order from step 1, is no flip)
    assert (expected.flipped_steps, expected.first_flip, expected.first_divergence) == (3, 11, 11)
    assert page.flips.label.text() == "Decision flips: 3 of 16 steps (first at step 11); answers diverge from step 11"
    assert page.flips.label.toolTip() == TEACHER_FORCING and strip.accessibleName()

    # the last step commits another token at the same position: the tooltip names both pieces
    last = expected.steps[-1]
    (ours,), (theirs,) = last.reference, last.candidate
    fp_piece, q_piece = session.model.token_pieces([ours.token_id, theirs.token_id])
    assert strip.cell_tip(15) == (f"Step 16 (block 0): full precision commits '{fp_piece}' at {ours.position}; "
                                  f"quantized would commit '{q_piece}' at {theirs.position}")

    centre = strip._cell_rect(15).center().toPoint()  # hovering the cell shows it
    QApplication.sendEvent(strip, QHelpEvent(QEvent.Type.ToolTip, centre, strip.mapToGlobal(centre)))
    assert QToolTip.text() == f"<qt>{strip.cell_tip(15)}</qt>"

    # painted as told: each kind's colour in its cell (a "both" cell's lower half moved), the marker at step 11
    image = strip.grab().toImage()
    colors = {"token": FLIP_TOKEN, "position": FLIP_POSITION, "both": FLIP_POSITION}
    for i, kind in enumerate(strip.cells):
        rect = strip._cell_rect(i)
        pixel = image.pixelColor(int(rect.center().x() + 2), int(rect.bottom() - 2))
        if kind in colors:
            assert pixel == QColor(colors[kind])
        else:
            assert pixel not in (QColor(FLIP_TOKEN), QColor(FLIP_POSITION))
    assert strip.divergence_x() == strip._cell_rect(10).left()

    assert not session.busy and not page.running
    page.input.setPlainText("What is 7 + 5?")
    assert page.send_button.isEnabled()
    page.new_chat()
    assert not page.flips.isVisible()


def test_a_variant_that_is_full_precision_itself_flips_nothing(qtbot, session, studio_settings):
    page = page_with(qtbot, session, studio_settings, "Itself", session.model)
    ask(qtbot, page, PROMPT)
    strip = page.flips.strip
    assert page.flips.isVisible() and page.flips.label.text() == NONE
    assert strip.cells == ["same"] * 16 and strip.divergence_x() is None


def test_no_strip_without_a_variant_or_for_an_opened_conversation(qtbot, session, studio_settings, demo_rtn2,
                                                                   tmp_path):
    page = make_page(qtbot, session, studio_settings)
    page.show()
    ask(qtbot, page, PROMPT)
    assert not page.flips.isVisible()  # no quantized turn: nothing to ask

    session.add_variant(Variant("RTN W2", demo_rtn2.model))
    ask(qtbot, page, PROMPT)
    assert page.flips.isVisible()
    path = tmp_path / "conversation.json"
    assert page.save_conversation(path) and page.open_conversation(path)
    assert not page.flips.isVisible()  # no models answered it here


def test_stopping_the_flips_job_leaves_the_page_usable(qtbot, session, studio_settings, demo_rtn2):
    page = page_with(qtbot, session, studio_settings, "RTN W2", demo_rtn2.model)
    # as Esc does (the page's Stop, the session's Cancel); busy_changed comes before the job's thread starts, so
    # the cancel is seen at its first step
    session.busy_changed.connect(lambda busy, title: busy and title == "Finding decision flips"
                                 and (page.stop(), session.cancel()))
    ask(qtbot, page, PROMPT)
    assert page.quant.last_answer() == "P is" and not page.flips.isVisible()
    assert not page.running and not session.busy and not page.stop_button.isEnabled()
    page.input.setPlainText(PROMPT)
    assert page.send_button.isEnabled() and page.new_button.isEnabled()


def test_tooltips_name_each_decision():
    same = StepDecision(2, 0, (Commit(1, 7, 0.9),), (Commit(1, 7, 0.8),))
    token = StepDecision(3, 0, (Commit(2, 7, 0.9),), (Commit(2, 8, 0.5),))
    moved = StepDecision(4, 1, (Commit(0, 7, 0.9), Commit(5, 9, 0.9)), (Commit(0, 8, 0.9), Commit(3, 9, 0.9)))
    pieces = {7: "Paris", 8: "Rome", 9: ""}
    assert cell_tip(token, pieces) == ("Step 3 (block 0): full precision commits 'Paris' at 2; "
                                       "quantized would commit 'Rome' at 2")
    assert cell_tip(same, pieces) == "Step 2 (block 0): both commit 'Paris' at 1"
    assert cell_tip(moved, pieces) == ("Step 4 (block 1): full precision commits 'Paris' at 0, ∅ at 5; "
                                       "quantized would commit 'Rome' at 0, ∅ at 3")
    assert [cell_kind(d) for d in (same, token, moved)] == ["same", "token", "both"]
