"""Chat: one prompt answered by the full-precision model and a quantized variant, side by side, step by step.

The panes run one after the other (the session runs one job at a time): full precision first, then the
quantized variant, chained from the first one's end. Engine steps can come faster than the eye follows
(the demo model takes a few ms a step), so frames are stored as they arrive and a 30 ms timer draws them
one step per tick: every step is seen, however fast the model. Once both have answered, a third short job
teacher-forces the variant on full precision's steps, and the strip under the panes shows where it would have
decided otherwise (`dllm_studio.flips`).
"""

from __future__ import annotations

import html
import math

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QGuiApplication
from PySide6.QtWidgets import (QComboBox, QDoubleSpinBox, QFileDialog, QFormLayout, QGroupBox, QHBoxLayout, QLabel,
                               QPlainTextEdit, QPushButton, QSlider, QSpinBox, QSplitter, QTextBrowser, QVBoxLayout,
                               QWidget)

from dllm_studio.conversation import (LATER_STATS, STATS, Conversation, Turn, load_conversation,
                                      save_conversation)
from dllm_studio.errors import ConversationError, DllmError, InvalidSettingsError, WriteError
from dllm_studio.events import DenoiseStep
from dllm_studio.flips import DecisionFlips, decision_flips
from dllm_studio.memory import human, peak_rss_bytes
from dllm_studio.quant.kernels import KERNELS
from dllm_studio.sampling import CACHES, REMASKING, GenerationConfig, check_prompt
from dllm_studio.speed import speed_note
from ui.dialogs import show_error
from ui.flip_strip import FlipPanel
from ui.paths import conversations_dir
from ui.session import Session
from ui.settings import Settings
from ui.theme import BAD, FP_COLOR, QUANT_COLOR
from ui.widgets import VariantPicker
from ui.workers import stream

FRAME_MS = 30  # one denoising step drawn per tick: fast enough to watch, slow enough to see each step
MASK = '<span style="color:#9a9ea6">░</span>'
ENDED = "∎"  # drawn where one answer stopped and the other went on
# A committed stop or other special token has no text; while denoising it is drawn, or the span would seem to
# shrink (and a template token's own text, e.g. <|start_header_id|>, is never shown).
NO_TEXT = "∅"
END_TOKEN = f'<span style="color:#9a9ea6">{NO_TEXT}</span>'
DIFFER_STYLE = "text-decoration: underline; background: #d9c8f5; color: #000"
QUEUED = "Queued: runs after the full-precision pane (one model computes at a time on this machine)."
NO_VARIANT = ("No quantized variant yet. Quantize this model on the Quantize page, or open a quantized folder on "
              "the Models page. Until then, Send runs the full-precision pane only.")
STATS_HELP = (
    "<b>steps</b>: denoising steps run; with a threshold, fewer than the Steps setting when tokens were "
    "committed in parallel.<br>"
    "<b>forward passes</b> (NFE): model evaluations, each a whole sequence or a cached window; 2 per step with "
    "classifier-free guidance.<br>"
    "<b>full-sequence</b>: the same counted in whole sequences, shown when a cache ran: a step over a 32-token "
    "window of a 320-token sequence counts 0.1. The compute the cache saved.<br>"
    "<b>tokens/step</b>: tokens committed per step: generation length ÷ steps with the fixed schedule, more "
    "with a threshold.<br>"
    "<b>ms/step</b>: wall time ÷ steps.<br>"
    "<b>total</b>: wall time from the generate call until the last token was committed, model loading excluded.<br>"
    "<b>answer tokens</b>: tokens up to, not including, the first end-of-answer token (not the generation "
    "length: the padding after the answer is not counted).<br>"
    "<b>tokens/s</b>: answer tokens ÷ wall time, as the CLI's <tt>answer_tokens_per_s</tt>. "
    "Masked diffusion commits tokens in parallel, so this is not an autoregressive decode rate.<br>"
    "<b>cache refreshes</b>: forwards over the whole sequence that refilled the KV cache, one per block.<br>"
    "<b>KV cache</b>: the most the cache held.<br>"
    "<b>peak memory</b>: this process's peak resident memory (RSS) so far, read after the run.<br>"
    "<b>kernels</b>: how the quantized layers ran, measured fastest for their shape on this machine.")


def threshold_or_off(value) -> float | None:
    """The threshold box's value as GenerationConfig's threshold: its 0 ("off", None in files) is None."""
    return float(value) if value else None


# The sampler fields the panel offers: GenerationConfig name -> (the panel's value -> the config's, label, help);
# saved as "chat/<name>".
SAMPLER = {
    "gen_length": (int, "&Generation length", "Answer tokens generated; all start masked."),
    "steps": (int, "S&teps", "Denoising steps. Fewer steps commit more tokens per step: faster, usually worse."),
    "block_length": (int, "&Block length", "Semi-autoregressive blocks, decoded left to right. The generation "
                     "length must be a multiple of it; equal to the generation length means one block."),
    "remasking": (str, "&Remasking", "Which predictions are committed first: the most probable (low_confidence), "
                  "the widest top-2 margin, the lowest entropy, or at random."),
    "temperature": (float, "Te&mperature", "0 = greedy: the same prompt, seed and settings give the same answer."),
    "seed": (int, "See&d", "Seeds sampling at temperature > 0 and random remasking; both panes get the same seed."),
    "cache": (str, "&Cache", "Reuse the model's keys and values within a block (Fast-dLLM): faster, but "
              "approximate. A block's first step runs the whole sequence; its other steps run only a window "
              "against keys and values refreshed once per block, so answers may differ slightly from none. "
              "prefix caches the prompt and finished blocks; dual also the masked rest, fastest."),
    "threshold": (threshold_or_off, "Thr&eshold", "Parallel decoding (Fast-dLLM): a step also commits every "
                  "masked token of the block at least this confident, so fewer steps run (Steps becomes a "
                  "ceiling). Lower is faster and riskier: tokens committed together are predicted independently "
                  "of each other. Fast-dLLM's 0.9 lost under 1 point of GSM8K accuracy on LLaDA-8B. "
                  "off: the fixed schedule. Needs low_confidence or margin remasking."),
}
SINGLE_TURN = ("This model was trained on single exchanges: only your latest message is sent to it. The earlier "
               "turns stay on screen but are not part of its prompt.")
BLANK_PROMPT = "Type a prompt to send it."


def _text(s: str) -> str:
    return html.escape(s).replace("\n", "<br>")


def heat(confidence: float) -> str:
    """Red (unsure) through yellow to green (sure), pale enough for black text in either theme."""
    c = confidence if confidence >= 0 else math.exp(confidence)  # entropy remasking scores are -entropy
    c = min(max(c, 0.0), 1.0)
    stops = ((0xf2, 0x9e, 0x9b), (0xf5, 0xdc, 0x7a), (0x9c, 0xd9, 0xa6))
    i, t = (0, 2 * c) if c < 0.5 else (1, 2 * c - 1)
    return "#" + "".join(f"{round(a + (b - a) * t):02x}" for a, b in zip(stops[i], stops[i + 1]))


def frame_html(frame: DenoiseStep, pieces: dict[int, str], *, fresh: bool, differ=frozenset(),
               ended: int | None = None) -> str:
    """One answer span: masks as placeholders, this step's commits coloured by confidence, the rest settled.

    `ended`: the answer's length; a final answer is drawn up to it (what follows its first stop token is not
    part of it), with the end marked when the other pane's answer goes on there.
    """
    new = {c.position: c.confidence for c in frame.committed} if fresh else {}
    masked = set(frame.masked)
    out = []
    for i, tid in enumerate(frame.tokens):
        if ended is not None and i >= ended:
            if i in differ:
                out.append(f'<span style="{DIFFER_STYLE}">{ENDED}</span>')
            break
        piece = _text(pieces.get(tid, ""))
        if i in masked:
            out.append(MASK)
        elif i in new:  # an empty piece (a stop or special token) still shows as a coloured cell
            out.append(f'<span style="background:{heat(new[i])}; color:#000">{piece or NO_TEXT}</span>')
        elif i in differ and piece:
            out.append(f'<span style="{DIFFER_STYLE}">{piece}</span>')
        else:
            out.append(piece or (END_TOKEN if fresh else ""))
    return f'<span style="white-space: pre-wrap">{"".join(out)}</span>'


def count(n: int, one: str, many: str = "") -> str:
    """"1 step", "3 steps": a threshold often finishes a block in one step."""
    return f"{n} {one if n == 1 else many or one + 's'}"


def stats_text(s: dict) -> str:
    """Four lines under an answer: the schedule, the answer, the compute, the memory.

    The figures a file saved before them lacks are left out."""
    passes = count(s["forward_passes"], "forward pass", "forward passes")
    if s.get("forward_equivalents", s["forward_passes"]) != s["forward_passes"]:  # a cache ran windows
        passes += f" ({s['forward_equivalents']:.1f} full-sequence)"
    schedule = [count(s["steps"], "step"), f"{s['ms_per_step']:.1f} ms/step"]
    if "tokens_per_step" in s:
        schedule.insert(1, f"{s['tokens_per_step']:.1f} tokens/step")
    compute, memory = [passes], [f"peak memory {human(s['peak_rss_bytes'])}"]
    if s.get("cache_refreshes"):
        compute.append(count(s["cache_refreshes"], "cache refresh", "cache refreshes"))
        memory.insert(0, f"KV cache {human(s['cache_bytes'])}")
    if s.get("kernels"):
        memory.append(f"kernels {kernel_text(s['kernels'])}")
    answer = [f"{s['wall_time_s']:.2f} s total", f"{s['answer_tokens']} answer tokens",
              f"{s['answer_tokens_per_s']:.1f} tokens/s"]
    return "\n".join(" · ".join(line) for line in (schedule, answer, compute, memory))


def kernel_help(counts: dict) -> str:
    """What each kernel that ran this answer is, for the stats tooltip."""
    lines = [f"<b>{name}</b>: {KERNELS[name].label}" for name in counts if name in KERNELS]
    return "<br><br>This answer's quantized layers ran:<br>" + "<br>".join(lines) if lines else ""


def kernel_text(counts: dict) -> str:
    return ", ".join(f"{name} ×{n}" for name, n in sorted(counts.items(), key=lambda kv: -kv[1]))


class Pane(QGroupBox):
    """One side of the comparison: its own conversation, the answer being drawn, a replay slider and stats."""

    drawn = Signal(int)  # the step whose frame was just drawn

    def __init__(self, key: str, title: str, color: str, parent=None) -> None:
        super().__init__(title, parent)
        self.key, self.title, self.color = key, title, color
        self.setObjectName(f"{key}Pane")
        self.turns: list[Turn] = []
        self.shown = 0  # frames of the last turn drawn so far
        self.settled = True  # the last answer is final and its last frame has been shown
        self.hurry = False  # Stop was pressed: jump to the latest frame
        self.differ: set[int] = set()  # positions of the last answer that differ from the other pane's

        self.header = QHBoxLayout()  # the quantized pane's variant chooser goes here
        self.hint = QLabel(wordWrap=True, objectName=f"{key}Hint", visible=False)
        self.browser = QTextBrowser(objectName=f"{key}Answer", openLinks=False)
        self.browser.setAccessibleName(f"{title} conversation")
        self.status = QLabel(wordWrap=True, objectName=f"{key}Status")
        self.replay = QSlider(Qt.Orientation.Horizontal, objectName=f"{key}Replay", enabled=False, minimum=1)
        self.replay.setAccessibleName(f"{title}: replay denoising step")
        self.replay.setToolTip("Drag to see the answer at any denoising step.")
        self.replay_label = QLabel("Replay", minimumWidth=110)
        # wrapped, so a narrow pane (a 1024 px window) shows every number rather than clipping the lines
        self.stats = QLabel(objectName=f"{key}Stats", toolTip=STATS_HELP, wordWrap=True)
        self.stats.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        # four lines reserved up front (a splitter does not re-lay its panes when a label grows); a narrow
        # pane wraps them into more, which the label's height-for-width then claims from the answer above
        self.stats.setMinimumHeight(4 * self.stats.fontMetrics().lineSpacing() + 4)
        self.copy = QPushButton("Copy", objectName=f"{key}Copy", enabled=False)
        self.copy.setAccessibleName(f"Copy the {title.lower()} answer")
        self.copy.clicked.connect(lambda: QGuiApplication.clipboard().setText(self.last_answer() or ""))
        self.replay.valueChanged.connect(self._replayed)

        replay_row = QHBoxLayout()
        replay_row.addWidget(self.replay_label)
        replay_row.addWidget(self.replay, 1)
        stats_row = QHBoxLayout()
        stats_row.addWidget(self.stats, 1)
        stats_row.addWidget(self.copy, 0, Qt.AlignmentFlag.AlignTop)
        layout = QVBoxLayout(self)
        layout.addLayout(self.header)
        layout.addWidget(self.hint)
        layout.addWidget(self.browser, 1)
        layout.addWidget(self.status)
        layout.addLayout(replay_row)
        layout.addLayout(stats_row)

    # ---- conversation -------------------------------------------------------------------------------
    def history(self) -> list[dict]:
        """The conversation as messages: finished turns only (a stopped answer is not history).

        What the model is then shown of it is the engine's call (`DiffusionLM.chat_messages`)."""
        messages = []
        for turn in self.turns:
            if turn.answer is not None:
                messages += [{"role": "user", "content": turn.prompt}, {"role": "assistant", "content": turn.answer}]
        return messages

    def last_answer(self) -> str | None:
        return next((t.answer for t in reversed(self.turns) if t.answer is not None), None)

    def begin(self, turn: Turn) -> None:
        self.turns.append(turn)
        self.shown, self.settled, self.hurry, self.differ = 0, False, False, set()
        self.replay.setEnabled(False)
        self.replay_label.setText("Replay")
        self.stats.clear()
        self.update_status()
        self.render(0)

    def load(self, turns: list[Turn]) -> None:
        """Show these turns (from a file, or none for a new chat), the last answer final and replayable."""
        self.turns, self.differ, self.hurry = turns, set(), False
        self.shown = len(turns[-1].frames) if turns else 0
        self.settled = False
        self.replay.setEnabled(False)
        self.replay_label.setText("Replay")
        self.stats.clear()
        if not self.settle():  # nothing to settle: an empty conversation
            self.settled = True
            self.copy.setEnabled(False)
            self.update_status()
            self.render()

    # ---- drawing ------------------------------------------------------------------------------------
    def advance(self) -> bool:
        """Draw the next stored frame of the last answer (all of them when hurried); False if none is waiting."""
        frames = self.turns[-1].frames if self.turns else []
        if self.shown >= len(frames):
            return False
        self.shown = len(frames) if self.hurry else self.shown + 1
        self.render(self.shown)
        self.update_status()
        self.drawn.emit(self.shown)
        return True

    def settle(self) -> bool:
        """Once the last answer has ended and its last frame was drawn: final view, replay and stats. True then."""
        turn = self.turns[-1] if self.turns else None
        if self.settled or turn is None or turn.state in ("queued", "running") or self.shown < len(turn.frames):
            return False
        self.settled = True
        n = len(turn.frames)
        self.replay.blockSignals(True)  # setting the range is not a replay
        self.replay.setRange(1, max(n, 1))
        self.replay.setValue(max(n, 1))
        self.replay.blockSignals(False)
        self.replay.setEnabled(n > 0)
        self.replay_label.setText(f"Step {turn.step_of(n)}" if n else "Replay")
        self.stats.setText(stats_text(turn.stats) if turn.stats else "")
        self.stats.setToolTip(STATS_HELP + kernel_help(turn.stats.get("kernels", {}) if turn.stats else {}))
        self.copy.setEnabled(self.last_answer() is not None)
        self.update_status()
        self.render()
        return True

    def show_differences(self, differ: set[int]) -> None:
        self.differ = differ
        if self.settled and self.replay.value() == self.replay.maximum():
            self.render()

    def _replayed(self, step: int) -> None:
        if not self.settled or not self.turns:
            return
        last = step >= len(self.turns[-1].frames)
        self.replay_label.setText(f"Step {self.turns[-1].step_of(step)}")
        self.render(None if last else step)
        self.drawn.emit(step)

    def update_status(self) -> None:
        turn = self.turns[-1] if self.turns else None
        if turn is None:
            text = ""
        elif turn.state == "queued":
            text = QUEUED
        elif turn.state == "running" or (turn.frames and not self.settled):  # the animation is catching up
            text = f"Denoising: step {turn.step_of(self.shown)}" if self.shown else "Starting…"
        elif turn.state == "done":
            n = len(turn.frames)  # fewer than total_steps when parallel decoding finished early
            text = (f"Done: {count(turn.length, 'token')} in {count(n, 'step')}"
                    + (f" (at most {turn.total_steps})." if n != turn.total_steps else "."))
        elif turn.state == "stopped":
            text = f"Stopped at step {turn.step_of(len(turn.frames))}."
        else:
            text = turn.note()
        self.status.setText(text)

    def render(self, step: int | None = None) -> None:
        """Draw the conversation, the last answer at frame `step` (1-based; 0 = nothing yet) or final when None."""
        parts = []
        for i, turn in enumerate(self.turns):
            parts.append(f"<p><b>You:</b> {_text(turn.prompt)}</p>")
            name = self.title + (f" ({turn.variant})" if turn.variant else "")
            name = f'<b style="color:{self.color}">{html.escape(name)}:</b> '

            if i < len(self.turns) - 1:
                body = self._ended(turn)
            elif not turn.frames or step == 0:
                body = MASK * turn.gen_length if turn.state in ("queued", "running") else self._ended(turn)
            elif step is not None:
                body = frame_html(turn.frames[step - 1], turn.pieces, fresh=True)
            elif turn.state == "done":
                body = frame_html(turn.frames[-1], turn.pieces, fresh=False, differ=self.differ, ended=turn.length)
            else:
                body = self._ended(turn)
            parts.append(f"<p>{name}{body}</p>")
        bar = self.browser.verticalScrollBar()
        follow, value = bar.value() >= bar.maximum() - 4, bar.value()  # stay at the bottom if already there
        self.browser.setHtml("".join(parts))
        bar.setValue(bar.maximum() if follow else value)

    @staticmethod
    def _ended(turn: Turn) -> str:
        """A turn drawn without its steps: the answer, the partial tokens when stopped, or why it did not run."""
        if turn.state == "done":
            return _text(turn.answer or "")
        if turn.state == "stopped":
            partial = frame_html(turn.frames[-1], turn.pieces, fresh=False) if turn.frames else ""
            return partial + " <i>(stopped)</i>"
        return f"<i>{_text(turn.note())}</i>"


class ChatPage(QWidget):
    frame_shown = Signal(str, int)  # pane ("fp" | "quant"), the step whose frame was drawn
    answer_finished = Signal(str, str)  # pane, the final answer text, once its last frame has been shown
    turn_finished = Signal()  # every pane of the last send has settled; the next prompt can be sent

    def __init__(self, session: Session, settings: Settings, parent=None) -> None:
        super().__init__(parent)
        self.session, self.settings = session, settings
        self.running = False  # from Send until every pane of that send has settled and its flips are found
        self._queue: list[tuple[Pane, Turn, object]] = []  # panes waiting for their turn on the session
        self._job = None
        self._config: GenerationConfig | None = None  # what the last send ran with, for its decision flips
        self._timer = QTimer(self, interval=FRAME_MS)
        self._timer.timeout.connect(self._tick)

        # ---- the two panes ----
        self.fp = Pane("fp", "Full precision", FP_COLOR)
        self.quant = Pane("quant", "Quantized", QUANT_COLOR)
        self.panes = (self.fp, self.quant)
        for pane in self.panes:
            pane.drawn.connect(lambda step, key=pane.key: self.frame_shown.emit(key, step))
        self.variant_box = VariantPicker(session, objectName="variantCombo")
        self.variant_box.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToContents)
        variant_label = QLabel("&Variant:")
        variant_label.setBuddy(self.variant_box)
        self.quant.header.addWidget(variant_label)
        self.quant.header.addWidget(self.variant_box, 1)
        self.quant.hint.setText(NO_VARIANT)
        splitter = QSplitter(Qt.Orientation.Horizontal, childrenCollapsible=False)
        splitter.addWidget(self.fp)
        splitter.addWidget(self.quant)

        legend = QLabel(objectName="denoiseLegend", wordWrap=True, textFormat=Qt.TextFormat.RichText)
        legend.setText(f"{MASK} masked &nbsp;·&nbsp; committed this step, by confidence: "
                       f'<span style="background:{heat(0)}; color:#000">&nbsp;low&nbsp;</span>'
                       f'<span style="background:{heat(0.5)}; color:#000">&nbsp;medium&nbsp;</span>'
                       f'<span style="background:{heat(1)}; color:#000">&nbsp;high&nbsp;</span>'
                       f" &nbsp;·&nbsp; plain text: settled &nbsp;·&nbsp; {END_TOKEN} end of answer, or another "
                       "token with no text &nbsp;·&nbsp; "
                       f'<span style="{DIFFER_STYLE}">underlined</span>: differs from the other pane '
                       f"({ENDED}: one answer ended there)")
        self.diff_label = QLabel(objectName="diffLabel", wordWrap=True)
        self.flips = FlipPanel()
        self.turn_note = QLabel(SINGLE_TURN, objectName="singleTurnNote", wordWrap=True, visible=False)

        # ---- the prompt ----
        self.input = QPlainTextEdit(objectName="chatInput")
        self.input.setPlaceholderText("Ask both models something… (Ctrl+Enter sends, Esc stops)")
        self.input.setAccessibleName("Prompt")
        self.input.setFixedHeight(72)
        self.send_button = QPushButton("Send", objectName="sendButton")
        self.send_button.setAccessibleName("Send prompt")
        self.send_button.setToolTip("Send the prompt to both models, one after the other (Ctrl+Enter).")
        self.stop_button = QPushButton("Stop", objectName="stopButton", enabled=False)
        self.stop_button.setAccessibleName("Stop generation")
        self.stop_button.setToolTip("Stop the running answer and skip the queued one (Esc).")
        self.prompt_hint = QLabel(BLANK_PROMPT, objectName="promptHint")
        policy = self.prompt_hint.sizePolicy()
        policy.setRetainSizeWhenHidden(True)  # the prompt row stays put as the hint comes and goes
        self.prompt_hint.setSizePolicy(policy)
        self.send_button.clicked.connect(self.send)
        self.stop_button.clicked.connect(self.stop)
        self.input.textChanged.connect(self._update_buttons)
        buttons = QVBoxLayout()
        buttons.addWidget(self.send_button)
        buttons.addWidget(self.stop_button)
        prompt_row = QHBoxLayout()
        prompt_row.addWidget(self.input, 1)
        prompt_row.addLayout(buttons)

        # ---- the side panel ----
        self.new_button = QPushButton("&New chat", objectName="newChatButton")
        self.open_button = QPushButton("&Open…", objectName="openConversationButton")
        self.save_button = QPushButton("Sa&ve…", objectName="saveConversationButton")
        self.new_button.setToolTip("Clear both conversations.")
        self.open_button.setToolTip("Open a conversation saved as JSON, with every step for replay.")
        self.save_button.setToolTip("Save both conversations, the sampler settings and every step as JSON.")
        self.new_button.clicked.connect(self.new_chat)
        self.open_button.clicked.connect(self.choose_open_file)
        self.save_button.clicked.connect(self.choose_save_file)
        conversation = QGroupBox("Conversation")
        conversation_buttons = QVBoxLayout(conversation)
        for b in (self.new_button, self.open_button, self.save_button):
            conversation_buttons.addWidget(b)
        side = QVBoxLayout()
        side.addWidget(self._build_sampler())
        side.addWidget(conversation)
        side.addStretch(1)

        main = QVBoxLayout()
        main.addWidget(splitter, 1)
        main.addWidget(legend)
        main.addWidget(self.diff_label)
        main.addWidget(self.flips)
        main.addWidget(self.turn_note)
        main.addLayout(prompt_row)
        main.addWidget(self.prompt_hint)
        root = QHBoxLayout(self)
        root.addLayout(main, 1)
        side_widget = QWidget()
        side_widget.setLayout(side)
        side_widget.setFixedWidth(290)
        root.addWidget(side_widget)

        session.variants_changed.connect(self._refresh_variants)
        session.model_changed.connect(self._model_changed)
        session.busy_changed.connect(self._busy_changed)
        self.variant_box.currentTextChanged.connect(self._update_turn_note)
        self.variant_box.currentTextChanged.connect(self._model_fit)
        self._refresh_variants()
        self._update_turn_note()
        self._model_fit()
        self._update_buttons()
        order = [self.input, self.send_button, self.stop_button, self.variant_box, *self._fields.values(),
                 self.new_button, self.open_button, self.save_button]
        for pane in self.panes:
            order += [pane.browser, pane.replay, pane.copy]
        for first, second in zip(order, order[1:]):
            QWidget.setTabOrder(first, second)

    # ---- sampler settings ---------------------------------------------------------------------------
    def _build_sampler(self) -> QGroupBox:
        box = QGroupBox("Sampler", objectName="samplerPanel")
        form = QFormLayout(box)
        self.gen_length = QSpinBox(objectName="genLength", minimum=1, maximum=8192)
        self.steps = QSpinBox(objectName="steps", minimum=1, maximum=8192)
        self.block_length = QSpinBox(objectName="blockLength", minimum=1, maximum=8192)
        self.remasking = QComboBox(objectName="remasking")
        self.remasking.addItems(REMASKING)
        self.temperature = QDoubleSpinBox(objectName="temperature", minimum=0.0, maximum=5.0, singleStep=0.1,
                                          decimals=2)
        self.seed = QSpinBox(objectName="seed", minimum=0, maximum=2**31 - 1)
        self.cache = QComboBox(objectName="cache")
        self.cache.addItems(CACHES)
        self.threshold = QDoubleSpinBox(objectName="threshold", minimum=0.0, maximum=1.0, singleStep=0.05,
                                        decimals=2, specialValueText="off")
        self._fields = {"gen_length": self.gen_length, "steps": self.steps, "block_length": self.block_length,
                        "remasking": self.remasking, "temperature": self.temperature, "seed": self.seed,
                        "cache": self.cache, "threshold": self.threshold}
        for name, widget in self._fields.items():
            _kind, label, help_text = SAMPLER[name]
            widget.setToolTip(help_text)
            form.addRow(label, widget)
        self.sampler_error = QLabel(objectName="samplerError", wordWrap=True, visible=False)
        self.sampler_error.setStyleSheet(f"color: {BAD}")
        form.addRow(self.sampler_error)
        self._apply_sampler({name: self.settings.get(f"chat/{name}") for name in SAMPLER})
        for widget in self._fields.values():
            changed = widget.currentTextChanged if isinstance(widget, QComboBox) else widget.valueChanged
            changed.connect(self._sampler_changed)
        self._check(self.config())
        return box

    def _apply_sampler(self, values: dict) -> None:
        """Put `values` (field name -> value) in the panel without saving each one as it is set."""
        for name, value in values.items():
            widget = self._fields[name]
            widget.blockSignals(True)
            if isinstance(widget, QComboBox):
                widget.setCurrentText(value)
            else:
                widget.setValue(0 if value is None else value)  # a threshold of None is the box's "off"
            widget.blockSignals(False)

    def _panel_values(self) -> dict:
        """What the panel shows, as saved in the settings (a threshold that is off is 0)."""
        return {name: widget.currentText() if isinstance(widget, QComboBox) else widget.value()
                for name, widget in self._fields.items()}

    def config(self) -> GenerationConfig:
        """The sampler settings in the panel, not yet validated."""
        return GenerationConfig(**{name: SAMPLER[name][0](value) for name, value in self._panel_values().items()})

    def _sampler_values(self) -> dict:
        config = self.config()
        return {name: getattr(config, name) for name in SAMPLER}

    def _sampler_changed(self) -> None:
        for name, value in self._panel_values().items():
            self.settings.set(f"chat/{name}", value)
        self._check(self.config())

    def _answering_models(self) -> list:
        """The models a Send would run: the open one and the chosen quantized variant's."""
        variant = self.session.variants.get(self.variant_box.currentText())
        return [m for m in (self.session.model, variant.model if variant else None) if m is not None]

    def _model_fit(self) -> None:
        """Say on the cache box whether the models that would answer can cache, and recheck the settings."""
        reasons = {f"{m.family}: {m.no_kv_cache}" for m in self._answering_models() if m.no_kv_cache}
        self.cache.setToolTip(SAMPLER["cache"][2] + "".join(f"\n\nNot for {r}." for r in sorted(reasons)))
        self._check(self.config())

    def _check(self, config: GenerationConfig) -> bool:
        """Validate with the engine's own rules and say what is wrong right in the panel."""
        try:
            config.validate()
            for model in self._answering_models():
                model.check_settings(config)
        except InvalidSettingsError as exc:
            self.sampler_error.setText(str(exc))
            self.sampler_error.setVisible(True)
            return False
        self.sampler_error.setVisible(False)
        return True

    # ---- sending --------------------------------------------------------------------------------------
    def send(self) -> None:
        """Send the prompt to the full-precision pane, then (queued behind it) the chosen quantized variant."""
        prompt = self.input.toPlainText().strip()
        model = self.session.model
        if not self._prompt_ready() or self.running or self.session.busy or model is None:
            return
        config = self.config()
        if not self._check(config):
            return
        variant = self.session.variants.get(self.variant_box.currentText())
        self.input.clear()
        self.running, self._config = True, config
        self.diff_label.clear()
        self.flips.hide()
        fp_turn = Turn(prompt, config.steps, config.gen_length, model.mask_token_id, adaptive=config.parallel)
        self.fp.begin(fp_turn)
        self._queue = [(self.fp, fp_turn, model)]
        if variant is None:  # the panes stay aligned turn by turn, so say why this one did not run
            self.quant.begin(Turn(prompt, config.steps, config.gen_length, model.mask_token_id, state="skipped",
                                  message="no quantized variant was chosen.", adaptive=config.parallel))
        else:
            q_turn = Turn(prompt, config.steps, config.gen_length, variant.model.mask_token_id, variant.name,
                          adaptive=config.parallel)
            self.quant.begin(q_turn)
            self._queue.append((self.quant, q_turn, variant.model))
        self._run_next(config)
        self._timer.start()
        self._update_buttons()

    def _run_next(self, config: GenerationConfig) -> None:
        """Start the first queued pane; the next one is chained from its end."""
        if not self._queue:
            return
        pane, turn, model = self._queue.pop(0)

        def done(result) -> None:
            self._done(turn, model, result)
            self._run_next(config)

        def failed(message: str) -> None:
            turn.state, turn.message = "failed", message
            self._run_next(config)

        def cancelled() -> None:
            turn.state = "stopped"

        try:
            turn.prompt_ids = model.chat_ids(model.chat_messages(pane.history(), turn.prompt))
            work = stream(lambda cancel: model.denoise(turn.prompt_ids, config, cancel))
            self._job = self.session.start(f"Generating ({pane.title.lower()})", work,
                                           on_event=lambda event: self._on_frame(turn, model, event),
                                           on_done=done, on_failed=failed, on_cancelled=cancelled)
        except (DllmError, RuntimeError) as exc:  # a template the tokenizer rejects; another job got in first
            failed(str(exc))
            return
        turn.state = "running"
        pane.update_status()

    def _on_frame(self, turn: Turn, model, event) -> None:
        if not isinstance(event, DenoiseStep):
            return
        new = [t for t in set(event.tokens) if t not in turn.pieces]
        if new:  # pieces are looked up once per token id, so drawing and saving never need the model
            turn.pieces.update(zip(new, model.token_pieces(new)))
        turn.frames.append(event)

    def _done(self, turn: Turn, model, result) -> None:
        s = result.stats
        turn.state, turn.answer, turn.token_ids = "done", result.text, list(result.token_ids)
        turn.length = s.answer_tokens
        turn.stats = {**{k: v for k, v in s.to_dict().items() if k in STATS or k in LATER_STATS},
                      "peak_rss_bytes": peak_rss_bytes(), "kernels": dict(s.kernels),
                      "weight_bytes": model.weight_bytes()}

    def stop(self) -> None:
        """Cancel the running answer and drop the queued one; what was computed stays on screen."""
        if not self.running:
            return
        for _pane, turn, _model in self._queue:
            turn.state, turn.message = "skipped", "stopped before it started."
        self._queue.clear()
        if self._job is not None:
            self._job.cancel()
        for pane in self.panes:
            pane.hurry = True

    def _tick(self) -> None:
        for pane in self.panes:
            if not pane.advance() and pane.settle() and pane.turns[-1].state == "done":
                self.answer_finished.emit(pane.key, pane.turns[-1].answer)
        if self.running and all(p.settled for p in self.panes):
            self._timer.stop()
            self._compare()
            if not self._start_flips():
                self._end_turn()

    def _end_turn(self) -> None:
        self.running = False
        self._update_buttons()
        self.turn_finished.emit()

    def _start_flips(self) -> bool:
        """Once both panes answered, ask the variant where it would have decided otherwise on full precision's
        own steps (`flips.decision_flips`), as one more job of this turn: True when it started."""
        fp, quant = (p.turns[-1] for p in self.panes)
        variant = self.session.variants.get(quant.variant or "")
        stopped = any(p.hurry for p in self.panes)  # Stop came after both had answered, while drawing
        if fp.state != "done" or quant.state != "done" or variant is None or self._config is None or stopped:
            return False
        model, config, prompt_ids = variant.model, self._config, fp.prompt_ids
        reference, other = tuple(fp.frames), tuple(quant.frames)

        def done(flips: DecisionFlips) -> None:
            if self.running:  # not a chat that a model change cleared meanwhile
                self.flips.show_flips(flips, self._pieces(model, flips, fp, quant))
                self._end_turn()

        def ended(*_args) -> None:  # stopped, or failed (the session reports why): the page goes on without it
            if self.running:
                self._end_turn()

        try:
            self._job = self.session.start(
                "Finding decision flips",
                lambda emit, cancel: decision_flips(model, prompt_ids, config, reference, other, cancel),
                on_done=done, on_failed=ended, on_cancelled=ended)
        except RuntimeError:  # another page's job got in first
            return False
        return True

    @staticmethod
    def _pieces(model, flips: DecisionFlips, fp: Turn, quant: Turn) -> dict[int, str]:
        """Both panes' token texts, and those of tokens the variant would have committed but neither answer has."""
        pieces = {**quant.pieces, **fp.pieces}
        missing = sorted({c.token_id for s in flips.steps for c in s.candidate} - pieces.keys())
        return {**pieces, **dict(zip(missing, model.token_pieces(missing)))} if missing else pieces

    def _compare(self) -> None:
        """Mark, position by position on token ids, where the two last answers differ."""
        a, b = (p.turns[-1] if p.turns else None for p in self.panes)
        if a is None or b is None or a.state != "done" or b.state != "done":
            self.diff_label.clear()
            return
        n = min(max(a.length, b.length), len(a.token_ids), len(b.token_ids))
        differ = {i for i in range(n) if a.token_ids[i] != b.token_ids[i]}
        for pane in self.panes:
            pane.show_differences(differ)
        text = f"Last answers: {len(differ)} of {n} tokens differ (underlined)." if differ else "Last answers: identical."
        self.diff_label.setText(f"{text}\n{self._speed(a, b)}".rstrip())

    def _speed(self, fp: Turn, quant: Turn) -> str:
        """How the quantized pane's last run compares in speed and size, and why (`speed.speed_note`)."""
        s, q = fp.stats, quant.stats
        if not s or not q or "weight_bytes" not in s or "weight_bytes" not in q:
            return ""
        variant = self.session.variants.get(quant.variant or "")
        device = variant.model.device.type if variant is not None else "cpu"
        return speed_note(quant.variant or "Quantized", s["ms_per_step"], q["ms_per_step"], s["weight_bytes"],
                          q["weight_bytes"], q.get("kernels", {}), device)

    # ---- conversation -------------------------------------------------------------------------------
    def new_chat(self) -> None:
        if self.running:
            return
        for pane in self.panes:
            pane.load([])
        self.diff_label.clear()
        self.flips.hide()
        self._update_buttons()

    def save_conversation(self, path) -> bool:
        """Write both conversations, all or nothing (`conversation.save_conversation`)."""
        conversation = Conversation(self.session.model.source if self.session.model is not None else None,
                                    self.variant_box.currentText() or None, self._sampler_values(),
                                    {pane.key: pane.turns for pane in self.panes})
        try:
            save_conversation(path, conversation)
        except WriteError as exc:
            show_error(self, "Could not save the conversation", str(exc))
            return False
        return True

    def open_conversation(self, path) -> bool:
        """Show a saved conversation; a file that is not one gets an error dialog and changes nothing."""
        if self.running:
            return False
        try:
            conversation = load_conversation(path)
        except ConversationError as exc:
            show_error(self, "Could not open the conversation", str(exc))
            return False
        self._apply_sampler(conversation.sampler)
        self._sampler_changed()
        if conversation.variant in self.session.variants:
            self.variant_box.setCurrentText(conversation.variant)
        for pane in self.panes:
            pane.load(conversation.panes[pane.key])
        self.flips.hide()  # no models answered it here to ask
        self._compare()
        self._update_buttons()
        return True

    def choose_save_file(self) -> None:
        folder = conversations_dir()
        folder.mkdir(parents=True, exist_ok=True)
        path, _ = QFileDialog.getSaveFileName(self, "Save conversation", str(folder / "conversation.json"),
                                              "Conversations (*.json)")
        if path:
            self.save_conversation(path)

    def choose_open_file(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open conversation", str(conversations_dir()),
                                              "Conversations (*.json)")
        if path:
            self.open_conversation(path)

    # ---- session --------------------------------------------------------------------------------------
    def _refresh_variants(self) -> None:
        self.quant.hint.setVisible(not self.session.variants)
        self._update_buttons()

    def _model_changed(self) -> None:
        self.stop()
        self._timer.stop()
        self.running = False
        self.new_chat()
        self._update_turn_note()
        self._model_fit()

    def _update_turn_note(self) -> None:
        """Say so when a model that will answer sees only the latest message (`DiffusionLM.single_turn`)."""
        self.turn_note.setVisible(any(m.single_turn for m in self._answering_models()))

    def _prompt_ready(self) -> bool:
        """The engine's own rule for a prompt worth sending (not empty, not only whitespace)."""
        try:
            check_prompt(self.input.toPlainText())
        except InvalidSettingsError:
            return False
        return True

    def _busy_changed(self, _busy: bool, _title: str) -> None:
        self._update_buttons()  # another page's job keeps Send disabled until it ends

    def _update_buttons(self) -> None:
        idle = not self.running
        has_turns = any(p.turns for p in self.panes)
        ready = self._prompt_ready()
        self.send_button.setEnabled(ready and idle and not self.session.busy and self.session.model is not None
                                     and not self.session.described_only)
        self.prompt_hint.setVisible(not ready)
        self.stop_button.setEnabled(self.running)
        self.new_button.setEnabled(idle and has_turns)
        self.open_button.setEnabled(idle)
        self.save_button.setEnabled(idle and has_turns)
        self.variant_box.setEnabled(idle and self.variant_box.count() > 0)
        for pane in self.panes:
            pane.copy.setEnabled(pane.last_answer() is not None)
