"""Write the demo model's card (README.md) from measurements, never by hand.

    python -m dllm_studio.demo.card --model resources/models/demo --eval EVAL.json

EVAL.json is `dllm-studio eval demo --suite all --json EVAL.json` (kept as the folder's eval.json). The
training section comes from the folder's training.json (written by `dllm_studio.demo.train`), the
recipe-search table from its recipe_search.json when present.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dllm_studio.demo import tasks

TARGETS = {"qa": 90.0, "math": 80.0, "code": 70.0}  # issue targets, % on the held-out splits
TURNS = {True: 'single (`"single_turn": true` in config.json): trained on one question and its answer at a time, '
                'it is sent only the latest user message; a conversation\'s earlier turns would confuse it',
         False: "multi: the whole conversation is sent each turn"}


def scores_table(evaluation: dict) -> str:
    rows = ["| suite | held-out items | score | ms / step | forward passes / answer | s / answer |",
            "|---|---|---|---|---|---|"]
    for s in evaluation["suites"]:
        score = f"NLL {s['nll_per_token']:.2f} nats/token" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f} %"
        ms = "–" if s["suite"] == "text" else f"{s['ms_per_step']:.1f}"
        rows.append(f"| {s['suite']} | {s['items']} | {score} | {ms} | {s['forward_passes_per_item']:.1f} | "
                    f"{s['wall_time_per_item_s']:.2f} |")
    return "\n".join(rows)


def outlier_rows(model) -> list:
    from dllm_studio.profile import activation_outliers

    return activation_outliers(model, [item["text"] for item in tasks.text_items()[1]])


def outliers_table(rows: list) -> str:
    lines = ["| block | input of | max / median channel | top channel | its max abs |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.block} | {r.name.rsplit('.', 1)[-1]} ({r.role}) | {r.outlier_ratio:.1f} | {r.top_channel} | "
                     f"{r.top_magnitude:.1f} |")
    return "\n".join(lines)


def outliers_summary(rows: list) -> str:
    """What the table shows, in words, from the numbers themselves."""
    from collections import Counter

    residual = [r for r in rows if r.role == "q"]
    hidden = max((r for r in rows if r.role == "down"), key=lambda r: r.outlier_ratio)
    channel, count = Counter(r.top_channel for r in residual).most_common(1)[0]
    stream = (f"one residual channel ({channel}) is the largest in {count} of {len(residual)} blocks"
              if count > 1 else
              f"the residual stream's largest channel changes from block to block "
              f"({min(r.outlier_ratio for r in residual):.1f}–{max(r.outlier_ratio for r in residual):.1f}x the median)")
    return (f"In the trained model {stream}, and the MLP's hidden activations are outlier-heavy: the down "
            f"projection's input peaks at {hidden.outlier_ratio:.0f}x the median channel in block {hidden.block} "
            f"(|x| up to {hidden.top_magnitude:.0f}), the pattern the seed study reports for real dLLMs' ff_out "
            "inputs, so low-bit activation quantization has something to get wrong.")


def targets_line(evaluation: dict) -> str:
    scores = {s["suite"]: 100 * s["accuracy"] for s in evaluation["suites"] if s["accuracy"] is not None}
    parts = [f"{suite} ≥ {goal:.0f} % ({'met' if scores.get(suite, 0) >= goal else f'missed: {scores.get(suite, 0):.1f} %'})"
             for suite, goal in TARGETS.items()]
    return "Targets: " + ", ".join(parts) + "."


def search_table(path: Path) -> str:
    if not path.is_file():
        return ""
    search = json.loads(path.read_text())
    rows = ["| run | device | minutes | steps | d_model × layers | batch | lr | pre-train / rehearsal | qa | math | code | text NLL |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in search["runs"]:
        c, sc = r["recipe"], r["scores"]
        rows.append(f"| {r['run']} | {r['device']} | {r['minutes']} | {r['steps']:,} | {c['d_model']} × {c['n_layers']} | "
                    f"{c['batch_size']} | {c['lr']} | {c['pretrain_fraction']} / {c.get('rehearsal', 0)} | "
                    f"{sc['qa']} | {sc['math']} | {sc['code']} | {sc['text']} |")
    findings = "".join(f"\n- {f}" for f in search.get("findings", []))
    return f"{search['note']}\n\n" + "\n".join(rows) + ("\n\nWhat the runs showed:\n" + findings if findings else "")


def mix_sentence(training: dict) -> str:
    """How fine-tuning batches were shared out, from training.json (older runs did not record it)."""
    if "sft_mix" not in training:
        return ""
    mix = ", ".join(f"{suite} {100 * share:.0f} %" for suite, share in training["sft_mix"].items())
    extra = "".join(f"; {suite} items of kind `{kind}` drawn {n}× as often"
                    for suite, kinds in training.get("draws", {}).items() for kind, n in kinds.items())
    return f" The other fine-tuning batches are shared out {mix}{extra}."


def render(model_dir: Path, evaluation: dict) -> str:
    from dllm_studio.models import load_model

    model = load_model(model_dir, dtype="float32")  # the card describes the weights as stored
    info, cfg = model.info(), model.config
    training = json.loads((model_dir / "training.json").read_text())
    r = training["recipe"]
    outliers = outlier_rows(model)
    counts = {s: tuple(map(len, g())) for s, g in tasks.GENERATORS.items()}
    loss = ", ".join(f"{h['step']}: {h['loss']}" for h in training["history"][:: max(1, len(training["history"]) // 8)])
    return f"""# dLLM Studio demo model

A {info.parameters / 1e6:.1f} M-parameter masked-diffusion language model with the **LLaDA architecture**
(`model_type: llada`, the same `LLaDAModelLM` code that loads GSAI-ML/LLaDA-8B), trained from scratch on the
demo task suites. It is the model every dLLM Studio command and page opens on (`MODEL=demo`), offline.

| | |
|---|---|
| layers / d_model / heads / MLP | {cfg['n_layers']} / {cfg['d_model']} / {cfg['n_heads']} / {cfg['mlp_hidden_size']} (SwiGLU, RMSNorm, RoPE, bidirectional) |
| vocabulary | {info.vocab_size:,} byte-level BPE tokens, digits one per token, LLaDA's special-token names |
| mask / EOS / EOT | `<|mdm_mask|>` {cfg['mask_token_id']} / `<|endoftext|>` {cfg['eos_token_id']} / `<|eot_id|>` {model.tokenizer.convert_tokens_to_ids('<|eot_id|>')} |
| chat template | LLaDA's (Llama-3 headers) |
| chat turns | {TURNS[model.single_turn]} |
| weights | float32 safetensors (CPUs without bf16 units run bf16 ~4× slower) |

## Scores on the held-out test splits

Full precision, default sampler settings (`dllm-studio eval demo --suite all`: one token per step,
low-confidence remasking, temperature 0; answer lengths qa 16, math 16, code 32 tokens):

{scores_table(evaluation)}

{targets_line(evaluation)} The whole `eval --suite all` took
{sum(s['wall_time_s'] for s in evaluation['suites']):.0f} s on this machine (2 CPU cores), plus start-up and loading.

**What "held-out" means here.** Each test item asks about a fact the model was trained on (a capital, a
sum, a function to write) in a phrasing never used for *that* fact in training; no test prompt occurs in
the training data. Unseen facts (sums never shown, functions never written) are beyond a model this size.
Suites: qa {counts['qa'][0]} train / {counts['qa'][1]} test, math {counts['math'][0]} / {counts['math'][1]}
(of all held-out sums, a fixed sample of {tasks.MATH_TEST_ITEMS}), code {counts['code'][0]} / {counts['code'][1]},
text {counts['text'][0]} / {counts['text'][1]} sentences. The text score is a masked-diffusion negative
log-likelihood (an ELBO bound, nats per token; lower is better).

## Training

Recipe (`dllm_studio/demo/train.py`): tokenizer trained on the curriculum; masked-diffusion pre-training
on task data and knowledge-base sentences for the first {int(100 * r['pretrain_fraction'])} % of the time;
then supervised fine-tuning that never masks the prompt, answers padded with EOS to the length `eval`
generates (math answers are worked solutions, "4 + 10 = 14": every phrasing of a sum ends in the same
equation, and the scorer reads the final number), with {int(100 * r['rehearsal'])} % of the fine-tuning batches replaying pre-training data so plain text
stays learnt.{mix_sentence(training)} Batches are drawn {r['batch_size']} at a time, grouped by length. AdamW lr {r['lr']},
{r['warmup']} warm-up steps, cosine decay over the wall-clock budget, weight decay {r['weight_decay']}, gradient clip 1.0.

This checkpoint: `{training.get('command', 'python -m dllm_studio.demo.train --out DIR --seed ' + str(training['seed']))}`
on {'one NVIDIA GPU' if training['device'] == 'cuda' else '2 CPU cores'} — {training['steps']:,} steps in
{training['minutes']} minutes, seed {training['seed']}. Loss (step: value): {loss}.

### How the recipe was chosen

{search_table(model_dir / 'recipe_search.json')}

## Activation outliers

Per block, over the held-out text sentences: the per-channel maximum |activation| at the input of the
query projection (the normalised residual stream, also feeding k, v, gate and up) and of the MLP's down
projection (`ff_out`), as the largest channel over the median channel. {outliers_summary(outliers)}

{outliers_table(outliers)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True, help="JSON written by dllm-studio eval --json")
    args = parser.parse_args()
    text = render(args.model, json.loads(args.eval.read_text()))
    tmp = args.model / "README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.model / "README.md")
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
