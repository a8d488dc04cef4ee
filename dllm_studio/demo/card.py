"""Write the demo model's card (README.md) from measurements, never by hand.

    python -m dllm_studio.demo.card --model resources/models/demo --eval EVAL.json [--cpu-run DIR]

EVAL.json is `dllm-studio eval demo --suite all --json EVAL.json` (kept as the folder's eval.json); --cpu-run names a folder made by
the CPU recipe (`python -m dllm_studio.demo.train --out DIR`) holding its training.json and eval.json.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dllm_studio.demo import tasks

SHIPPED_COMMAND = "python -m dllm_studio.demo.train --out DIR --seed 0 --device cuda --minutes 7 --batch-size 256 --rehearsal 0"


def scores_table(evaluation: dict) -> str:
    rows = ["| suite | held-out items | score | ms / step | forward passes / answer | s / answer |",
            "|---|---|---|---|---|---|"]
    for s in evaluation["suites"]:
        score = f"NLL {s['nll_per_token']:.2f} nats/token" if s["accuracy"] is None else f"{100 * s['accuracy']:.1f} %"
        ms = "–" if s["suite"] == "text" else f"{s['ms_per_step']:.1f}"
        rows.append(f"| {s['suite']} | {s['items']} | {score} | {ms} | {s['forward_passes_per_item']:.1f} | "
                    f"{s['wall_time_per_item_s']:.2f} |")
    return "\n".join(rows)


def outliers_table(model) -> str:
    from dllm_studio.profile import activation_outliers

    texts = [item["text"] for item in tasks.text_items()[1]]
    rows = ["| block | input of | max / median channel | top channel | its max abs |", "|---|---|---|---|---|"]
    for r in activation_outliers(model, texts):
        rows.append(f"| {r.block} | {r.name.rsplit('.', 1)[-1]} ({r.role}) | {r.outlier_ratio:.1f} | {r.top_channel} | "
                    f"{r.top_magnitude:.1f} |")
    return "\n".join(rows)


def cpu_section(folder: Path | None, shipped: dict) -> str:
    if folder is None:
        return "The CPU recipe has not been measured for this card."
    training = json.loads((folder / "training.json").read_text())
    evaluation = json.loads((folder / "eval.json").read_text())
    seen = training["steps"] * training["recipe"]["batch_size"]
    shipped_seen = shipped["steps"] * shipped["recipe"]["batch_size"]
    return (f"`python -m dllm_studio.demo.train --out DIR --seed {training['seed']}` on 2 CPU cores ran "
            f"{training['steps']:,} steps in {training['minutes']} minutes (batch {training['recipe']['batch_size']}, "
            f"rehearsal {training['recipe']['rehearsal']}); that model scores, on the same held-out splits:\n\n"
            f"{scores_table(evaluation)}\n\nThe CPU recipe runs within its budget but falls far short of the targets: "
            f"it sees {seen:,} training sequences, {100 * seen / shipped_seen:.0f} % of the {shipped_seen:,} the shipped "
            "checkpoint saw. Its text NLL shows what rehearsal buys: plain text stays learnt.")


def render(model_dir: Path, evaluation: dict, cpu_run: Path | None) -> str:
    from dllm_studio.models import load_model

    model = load_model(model_dir)
    info, cfg = model.info(), model.config
    training = json.loads((model_dir / "training.json").read_text())
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
| weights | float32 safetensors (CPUs without bf16 units run bf16 ~4× slower) |

## Scores on the held-out test splits

Full precision, default sampler settings (`dllm-studio eval demo --suite all`: one token per step,
low-confidence remasking, temperature 0; answer lengths qa 16, math 16, code 32 tokens):

{scores_table(evaluation)}

Targets: qa ≥ 90 %, math ≥ 80 %, code pass@1 ≥ 70 %. The whole `eval --suite all` took
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
on task data and knowledge-base sentences for the first {int(100 * training['recipe']['pretrain_fraction'])} % of the
time; then supervised fine-tuning that never masks the prompt, answers padded with EOS to the length `eval`
generates. AdamW lr {training['recipe']['lr']}, {training['recipe']['warmup']} warm-up steps, cosine decay,
weight decay {training['recipe']['weight_decay']}, gradient clip 1.0.

This checkpoint: `{SHIPPED_COMMAND}` on one NVIDIA H100 — {training['steps']:,} steps in {training['minutes']}
minutes, batch {training['recipe']['batch_size']}, seed {training['seed']}. It was trained before the `--rehearsal`
option existed (i.e. with rehearsal 0: fine-tuning batches only), so plain text was partly forgotten during
fine-tuning, which the high text NLL shows; the recipe's default now replays pre-training data in 20 % of the
fine-tuning batches. Its weights were saved as bfloat16 and widened to float32 for shipping.
Loss (step: value): {loss}.

### The CPU recipe

{cpu_section(cpu_run, training)}

## Activation outliers

Per block, over the held-out text sentences: the per-channel maximum |activation| at the input of the
query projection (the normalised residual stream, also feeding k, v, gate and up) and of the MLP's down
projection (`ff_out`), as the largest channel over the median channel. Like real dLLMs, the trained model
has outlier channels — one recurring channel in the residual stream, and MLP hidden activations whose largest
channel is far above the median — so activation quantization has something to get wrong.

{outliers_table(model)}
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--eval", type=Path, required=True, help="JSON written by dllm-studio eval --json")
    parser.add_argument("--cpu-run", type=Path, help="folder of a CPU-recipe run with training.json and eval.json")
    args = parser.parse_args()
    text = render(args.model, json.loads(args.eval.read_text()), args.cpu_run)
    tmp = args.model / "README.md.tmp"
    tmp.write_text(text)
    os.replace(tmp, args.model / "README.md")
    print(f"wrote {args.model / 'README.md'}")


if __name__ == "__main__":
    main()
