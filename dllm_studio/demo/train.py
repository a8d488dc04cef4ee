"""Train the bundled demo dLLM: a small LLaDA, with its own tokenizer, on the demo task suites.

    python -m dllm_studio.demo.train --out DIR --seed N [--minutes 55] [--device cpu|cuda]

Recipe (LLaDA's, scaled down; arXiv:2502.09992 and its GUIDELINES.md):
1. A byte-level BPE tokenizer trained on the curriculum, digits split one per token (so sums stay
   learnable), with LLaDA's special-token names and chat template.
2. Pre-training with the masked-diffusion objective: every token masked with probability t ~ U(0,1),
   cross-entropy on masked tokens weighted by 1/t, over the task data and the knowledge-base text.
3. Supervised fine-tuning: the prompt is never masked; the answer (for math, the worked solution
   "4 + 10 = 14") is padded with EOS to the length `eval` generates (LLaDA's SFT pads with EOS too), and
   the loss is normalised by answer length.
The model is the same `LLaDAModelLM` that loads the released LLaDA checkpoints, so the demo
exercises the real code path. The run stops at a wall-clock budget so a 2-core CPU finishes in time.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from dllm_studio.demo import tasks
from dllm_studio.models.llada import CHAT_TEMPLATE, LLaDAConfig, LLaDAModelLM

SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>",
            "<|eot_id|>"]
GEN_LENGTH = {"qa": 16, "math": 16, "code": 32}  # answer slots: the lengths `eval` generates by default
# Extra EOS slots drawn per fine-tuning batch, so longer gen_lengths (chat) end cleanly too; mostly 0,
# because every slot costs compute the tasks themselves do not need.
EXTRA_SLOTS = (0, 0, 0, 0, 0, 0, 16, 32)
SFT_MIX = {"qa": 0.35, "math": 0.50, "code": 0.15}  # share of fine-tuning batches per suite
# Copies of a fine-tuning item by suite and kind (tasks.kind), for what is learnt slowest. Subtraction: 19 and 20 of
# 37 held-out items right in two 55-minute runs (addition 41-43 of 51); drawn twice, 35 and 31 of 37. Subject-first
# qa phrasings ("The capital of Spain is which city?"): 11 of 23 right (question-first 113 of 115); drawn three
# times, 14 of 23 and qa 93.5 % (recipe_search.json has every run).
DRAWS = {"math": {"-": 2}, "qa": {"subject-first": 3}}
EPS = 1e-3  # minimum mask probability (LLaDA)


@dataclass
class Recipe:
    # Sized for 2 CPU cores: on this task set, a 1 M-parameter model taking many small steps learns more
    # per minute than a wider one taking fewer (measured; see the model card's training notes).
    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 4
    mlp_hidden_size: int = 352
    vocab_size: int = 1024
    batch_size: int = 32
    lr: float = 3e-3
    warmup: int = 100
    weight_decay: float = 0.01
    pretrain_fraction: float = 0.1  # of the time budget
    rehearsal: float = 0.1  # share of fine-tuning batches that stay pre-training ones, so plain text is not forgotten
    elbo_weighted_sft: bool = True  # weight fine-tuning tokens by 1/t (LLaDA); counting each once learned slower
    minutes: float = 55.0


# ---- tokenizer -----------------------------------------------------------------------------------

def train_tokenizer(corpus: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", mask_token="<|mdm_mask|>", model_max_length=512)
    fast.chat_template = CHAT_TEMPLATE
    return fast


# ---- data ----------------------------------------------------------------------------------------

def curriculum() -> dict[str, list[dict]]:
    """The train splits of every suite (generated in memory, identical to resources/tasks)."""
    return {suite: generate()[0] for suite, generate in tasks.GENERATORS.items()}


def taught_answer(item: dict) -> str:
    """What the model learns to write: a math item's worked solution ("4 + 10 = 14") where it has one.

    Restating the sum turns every phrasing of a fact into one shared equation. The same recipe, seed and
    55 minutes scored 20.7 % on held-out math with bare-number answers and 76.0 % with worked solutions.
    """
    return item.get("solution", item["answer"])


def draws(item: dict) -> int:
    """How many copies of a training item go into its fine-tuning pool (DRAWS, by its suite and kind)."""
    return DRAWS.get(item["suite"], {}).get(tasks.kind(item), 1)


def encode_sft(tokenizer, item: dict, suite: str) -> tuple[list[int], list[int]]:
    """(prompt ids, answer ids): the answer (math: its worked solution) + <|eot_id|>, padded with EOS to the
    suite's answer length."""
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": item["prompt"]}], tokenize=False,
                                           add_generation_prompt=True)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
    target = taught_answer(item)
    answer = tokenizer.encode(target, add_special_tokens=False) + [tokenizer.convert_tokens_to_ids("<|eot_id|>")]
    if len(answer) > GEN_LENGTH[suite]:
        raise ValueError(f"{suite} answer of {len(answer)} tokens does not fit {GEN_LENGTH[suite]}: {target!r}")
    return prompt_ids, answer + [tokenizer.eos_token_id] * (GEN_LENGTH[suite] - len(answer))


def batch(pairs: list[tuple[list[int], list[int]]], pad_id: int, extra: int = 0):
    """Left-pad prompts so every answer starts at the same column; `extra` EOS slots lengthen every answer.

    Returns ids (B, T), attention mask (B, T) (0 = padding, never attended to) and answer mask (B, T).
    """
    width = max(len(p) for p, _ in pairs)
    ids, attn, answer = [], [], []
    for prompt, ans in pairs:
        ans = ans + [pad_id] * extra
        pad = width - len(prompt)
        ids.append([pad_id] * pad + prompt + ans)
        attn.append([0] * pad + [1] * (len(prompt) + len(ans)))
        answer.append([0] * (pad + len(prompt)) + [1] * len(ans))
    return torch.tensor(ids), torch.tensor(attn), torch.tensor(answer, dtype=torch.bool)


class LengthBatches:
    """Random batches of similar length: `chunks` batches are drawn at once, sorted by length and split,
    so little compute goes to padding (prompt lengths in one suite vary by almost 2x)."""

    def __init__(self, items: list, length, batch_size: int, rng: random.Random, chunks: int = 8) -> None:
        self.items, self.length, self.batch_size, self.rng, self.chunks = items, length, batch_size, rng, chunks
        self.queue: list[list] = []

    def next(self) -> list:
        if not self.queue:
            n = min(self.batch_size * self.chunks, len(self.items))
            drawn = sorted(self.rng.sample(self.items, n), key=self.length)
            self.queue = [drawn[i:i + self.batch_size] for i in range(0, n, self.batch_size)]
            self.rng.shuffle(self.queue)
        return self.queue.pop()


def masked_diffusion_loss(model, ids, attn, maskable, mask_id: int, generator: torch.Generator,
                          elbo_weights: bool = True) -> torch.Tensor:
    """LLaDA's objective: mask each maskable token with prob t ~ U(0,1); CE on masked tokens / t, per token.

    Without `elbo_weights` every masked token counts once: the same minimiser (each token's true
    conditional), with less gradient noise from the rare, heavily up-weighted low-t batches.
    """
    B, T = ids.shape
    t = torch.rand(B, 1, generator=generator, device=ids.device)
    p = (1 - EPS) * t + EPS
    masked = maskable & (torch.rand(B, T, generator=generator, device=ids.device) < p)
    logits = model(torch.where(masked, mask_id, ids), attn)
    ce = F.cross_entropy(logits[masked].float(), ids[masked], reduction="none")
    if not elbo_weights:
        return ce.sum() / masked.sum().clamp_min(1)
    weights = (1 / p).expand(B, T)[masked]
    return (ce * weights).sum() / maskable.sum()


# ---- training ------------------------------------------------------------------------------------

def train(out: Path, seed: int, recipe: Recipe, device: str = "cpu", log=print) -> dict:
    random.seed(seed)
    torch.manual_seed(seed)
    gen = torch.Generator(device=device).manual_seed(seed)
    data = curriculum()
    corpus = [x["text"] for x in data["text"]] + [f"{x['prompt']} {taught_answer(x)}" for s in GEN_LENGTH for x in data[s]]
    tokenizer = train_tokenizer(corpus, recipe.vocab_size)
    mask_id, pad_id = tokenizer.mask_token_id, tokenizer.eos_token_id
    sft = {s: [pair for x in data[s] for pair in [encode_sft(tokenizer, x, s)] * draws(x)] for s in GEN_LENGTH}
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    text = [[bos] + tokenizer.encode(x["text"], add_special_tokens=False) + [eos] for x in data["text"]]
    pretrain_pool = text + [p + a for pairs in sft.values() for p, a in pairs]

    cfg = model_config(tokenizer, recipe)
    model = LLaDAModelLM(LLaDAConfig.from_dict(cfg)).to(device)
    _init(model, recipe)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": recipe.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=recipe.lr, betas=(0.9, 0.98))
    budget = recipe.minutes * 60
    start, step, history = time.perf_counter(), 0, []
    suites, weights = list(SFT_MIX), list(SFT_MIX.values())
    rng = random.Random(seed)
    pretrain_batches = LengthBatches(pretrain_pool, len, recipe.batch_size, rng)
    sft_batches = {s: LengthBatches(pairs, lambda pair: len(pair[0]), recipe.batch_size, rng) for s, pairs in sft.items()}
    while (elapsed := time.perf_counter() - start) < budget:
        progress = elapsed / budget
        lr = recipe.lr * min(1.0, (step + 1) / recipe.warmup) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr
        if progress < recipe.pretrain_fraction or rng.random() < recipe.rehearsal:
            ids, attn = _right_pad(pretrain_batches.next(), pad_id)
            maskable = attn.bool()
            phase = "pretrain"
        else:
            phase = rng.choices(suites, weights)[0]
            ids, attn, maskable = batch(sft_batches[phase].next(), pad_id, rng.choice(EXTRA_SLOTS))
        ids, attn, maskable = ids.to(device), attn.to(device), maskable.to(device)
        loss = masked_diffusion_loss(model, ids, attn, maskable, mask_id, gen,
                                     elbo_weights=phase == "pretrain" or recipe.elbo_weighted_sft)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 100 == 0:
            history.append({"step": step, "minutes": round(elapsed / 60, 2), "phase": phase, "loss": round(loss.item(), 4)})
            log(f"step {step:6d}  {elapsed / 60:5.1f} min  {phase:8s}  loss {loss.item():.4f}  lr {lr:.2e}")
    save(model, tokenizer, cfg, out)
    return {"steps": step, "minutes": round((time.perf_counter() - start) / 60, 1), "history": history,
            "recipe": vars(recipe), "sft_mix": SFT_MIX, "draws": DRAWS, "seed": seed, "device": device,
            "parameters": sum(p.numel() for p in model.parameters())}


def _right_pad(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, seqs))
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs])
    attn = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs])
    return ids, attn


def _init(model: torch.nn.Module, recipe: Recipe) -> None:
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            std = 0.02 / math.sqrt(2 * recipe.n_layers) if name.endswith(("attn_out.weight", "ff_out.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


def model_config(tokenizer, recipe: Recipe) -> dict:
    """config.json with every field the released LLaDA checkpoints carry, at the demo's size."""
    vocab = len(tokenizer)
    return {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": recipe.d_model,
        "embedding_dropout": 0.0, "embedding_size": vocab, "eos_token_id": tokenizer.eos_token_id,
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "cpu", "init_fn": "normal", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": tokenizer.mask_token_id,
        "max_sequence_length": 512, "mlp_hidden_size": recipe.mlp_hidden_size, "mlp_ratio": 4,
        "model_type": "llada", "multi_query_attention": None, "n_heads": recipe.n_heads,
        "n_kv_heads": recipe.n_heads, "n_layers": recipe.n_layers, "pad_token_id": tokenizer.eos_token_id,
        "precision": "amp_bf16", "residual_dropout": 0.0, "rms_norm_eps": 1e-05, "rope": True,
        "rope_full_precision": True, "rope_theta": 10000.0, "scale_logits": False,
        # float32, not LLaDA's bfloat16: CPUs without bf16 units (AVX2) run bf16 matmuls ~4x slower.
        "torch_dtype": "float32",
        "use_cache": False, "vocab_size": vocab, "weight_tying": False,
        "single_turn": True,  # trained on one question and answer at a time: DiffusionLM.single_turn
    }


def save(model: torch.nn.Module, tokenizer, cfg: dict, out: Path) -> None:
    """Write the folder atomically: everything into a temporary sibling, then one rename."""
    from safetensors.torch import save_file

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
         "pad_token_id": tokenizer.eos_token_id, "mask_token_id": tokenizer.mask_token_id}, indent=2) + "\n")
    tokenizer.save_pretrained(str(tmp))
    # Name the class every transformers version knows (5.x writes its new "TokenizersBackend").
    tok_cfg = json.loads((tmp / "tokenizer_config.json").read_text())
    (tmp / "tokenizer_config.json").write_text(json.dumps({**tok_cfg, "tokenizer_class": "PreTrainedTokenizerFast"},
                                                          indent=2) + "\n")
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=Recipe.minutes, help="wall-clock training budget")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=Recipe.batch_size)
    parser.add_argument("--rehearsal", type=float, default=Recipe.rehearsal,
                        help="share of fine-tuning batches that replay pre-training data")
    args = parser.parse_args()
    recipe = Recipe(minutes=args.minutes, batch_size=args.batch_size, rehearsal=args.rehearsal)
    report = train(args.out, args.seed, recipe, args.device)
    report["command"] = "python -m dllm_studio.demo.train " + " ".join(sys.argv[1:])
    (args.out / "training.json").write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {args.out} after {report['steps']} steps in {report['minutes']} min")


if __name__ == "__main__":
    main()
