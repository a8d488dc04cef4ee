"""Help -> Quick start: what each page's charts, colours and verdicts mean, in one short page.

The thresholds are read from the engine that applies them, so this text cannot drift from what is drawn.
"""

from __future__ import annotations

from PySide6.QtWidgets import QDialog, QDialogButtonBox, QTextBrowser, QVBoxLayout, QWidget

from dllm_studio.eval.drop import BANDS
from dllm_studio.memory import HEADROOM
from dllm_studio.profile import OUTLIER_ALARM
from ui.theme import BAD, BAND_COLORS, FIT_COLORS, FLIP_POSITION, FLIP_TOKEN, FP_COLOR, QUANT_COLOR


def _swatch(color: str, text: str) -> str:
    return f'<span style="background:{color}; color:#000">&nbsp;{text}&nbsp;</span>'


def _bands() -> str:
    rows, lower = [], 0.0
    for limit, name in BANDS:
        span = f"over {lower:.0%}" if limit == float("inf") else f"{lower:.0%} to {limit:.0%}" if lower else f"under {limit:.0%}"
        rows.append(f"{_swatch(BAND_COLORS[name], name)} {span}")
        lower = limit
    return ", ".join(rows)


def quick_start_html() -> str:
    from ui.pages.chat import DIFFER_STYLE, MASK, heat

    return f"""
<h2>Quick start</h2>
<ol>
<li><b>Models</b>: the bundled demo is open. Open a folder (full precision, or a quantized folder, which becomes
a <i>variant</i>) or a hub id. The card estimates the weight memory at each bit-width against the memory free now:
{_swatch(FIT_COLORS["fits"], "fits")} under half of it, {_swatch(FIT_COLORS["tight"], "tight")} under
{HEADROOM:.0%}, {_swatch(FIT_COLORS["won't fit"], "won't fit")} above.</li>
<li><b>Quantize</b>: pick a method and bit-width and press Start. The charts fill in layer by layer:
<ul>
<li><i>Activation outliers per layer</i>: each quantized layer's largest input-channel magnitude over its
median channel (log scale). Bars turn <span style="color:{BAD}"><b>red</b></span> above {OUTLIER_ALARM:g}x:
outlier-heavy inputs, the ones low-bit activations suffer from.</li>
<li><i>Channel magnitudes</i>: the largest |activation| of each input channel of the layer being quantized;
red points are its outlier channels, more than 4x the median channel (the dashed line).</li>
<li><i>Quantization error per layer</i>: how far the quantized layer's output is from the original on the
calibration inputs, relative to the output's size.</li>
<li><i>Memory</i>: this process's resident memory over time; the dashed line is its peak.</li>
</ul>
Esc or Cancel stops within a second and keeps nothing.
<i>Mixed precision</i> (RTN, GPTQ, AWQ weight-only): give a memory budget or a target bits per weight; Start
first measures each layer's sensitivity, then shows the <i>bit map</i> (a row per block, a cell per layer,
coloured by its bits) and quantizes with it. <i>Stream from the checkpoint's shards</i> quantizes a model larger
than memory one block at a time straight into a folder (checked for you when the in-memory run would not fit);
a cancelled streaming run keeps its finished blocks, and Start again with the same recipe and folder resumes.
Open it for Chat loads the folder as the quantized variant.</li>
<li><b>Chat</b>: one prompt goes to <b style="color:{FP_COLOR}">full precision</b>, then to the
<b style="color:{QUANT_COLOR}">quantized</b> variant, with the same seed and settings. The answer starts as
masks ({MASK}); each step commits some tokens, coloured by the model's confidence:
{_swatch(heat(0), "low")}{_swatch(heat(0.5), "medium")}{_swatch(heat(1), "high")}. When both are done,
<span style="{DIFFER_STYLE}">underlined</span> tokens differ between the panes. The slider replays any step.
Cache and Threshold (the sampler panel) are Fast-dLLM's speed-ups: a KV cache reused within a block, and
committing every token confident enough at once, so one step may reveal many; both are approximations, and
the stats say what they saved (full-sequence passes, tokens per step). Under the panes, the decision-flip strip
has a cell per full-precision step: the quantized model is shown full precision's state before that step and
asked what it would commit; {_swatch(FLIP_POSITION, "another position")}{_swatch(FLIP_TOKEN, "another token")}
mark where it would decide otherwise, the marker where the two answers part.</li>
<li><b>Compare</b>: scores both on the task suites. The relative drop in accuracy is named with the seed
study's bands: {_bands()}; a drop is only given a band when it is statistically distinguishable from no
difference on these items, otherwise it reads "not significant". Agreement is the share of items answered
exactly alike, and "flipped" the items with a decision flip somewhere (as in Chat's strip). The plots (accuracy
per category, accuracy vs size with its Pareto front, latency vs size, per-layer outliers and error) and the
saved report are the CLI's <code>dllm-studio compare</code> ones; Open report shows any of them, a
<code>dllm-studio study</code> too.</li>
<li><b>Export</b>: writes the variant to a folder (dLLM Studio's layout, or GPTQ for other tools), then reloads
it and checks it gives the same logits.</li>
</ol>
<p>Esc stops whatever runs. Ctrl+1 to Ctrl+5 switch pages; Ctrl+Enter sends the chat prompt.</p>
"""


class QuickStartDialog(QDialog):
    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setObjectName("quickStart")
        self.setWindowTitle("Quick start")
        self.resize(640, 620)
        self.browser = QTextBrowser(objectName="quickStartText", openExternalLinks=False)
        self.browser.setHtml(quick_start_html())
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Close)
        buttons.rejected.connect(self.close)
        layout = QVBoxLayout(self)
        layout.addWidget(self.browser)
        layout.addWidget(buttons)
