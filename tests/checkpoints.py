"""Tiny random checkpoints laid out exactly like the released LLaDA and Dream folders.

Same config.json fields (values scaled down), same state-dict key names, sharded safetensors with
model.safetensors.index.json, bf16 weights, tokenizer files with the real special-token names, and
the hub's remote-code files, which write a marker if anything ever imports them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

CORPUS = [
    "The capital of France is Paris. The capital of Italy is Rome.",
    "What is 7 plus 5? It is 12. Tom has 3 apples and buys 4 more.",
    "def add(a, b):\n    return a + b\n",
    "A cat is a mammal. The opposite of hot is cold. The sky is blue.",
    "Hello! How are you today? I am fine, thank you.",
]

REMOTE_CODE_MARKER = "REMOTE_CODE_WAS_RUN"
TRAP = f"from pathlib import Path\nPath(__file__).with_name('{REMOTE_CODE_MARKER}').write_text('imported')\n"


def _bpe(specials: list[str], vocab_size: int = 300):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(CORPUS * 20, trainer)
    tok.add_special_tokens(specials)
    return tok


def _save_weights(state: dict[str, torch.Tensor], folder: Path, shards: int) -> None:
    names = list(state)
    per = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors" if shards > 1 else "model.safetensors"
        part = {n: state[n].contiguous() for n in names[s * per:(s + 1) * per]}
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in state.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))


def _random_state(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in shapes.items():
        if name.endswith("norm.weight") or name.endswith("ln_f.weight") or "layernorm" in name or name == "model.norm.weight":
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        else:
            t = 0.08 * torch.randn(shape, generator=g)
        state[name] = t.to(torch.bfloat16)
    return state


# ---- LLaDA -----------------------------------------------------------------------------------

LLADA_SPECIALS = ["<|startoftext|>", "<|endoftext|>", "<|mdm_mask|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def llada_config(tok_ids: dict[str, int], **overrides) -> dict:
    """LLaDA-8B-Instruct's config.json, every field present, sizes scaled down."""
    cfg = {
        "activation_type": "silu", "alibi": False, "alibi_bias_max": 8.0, "architectures": ["LLaDAModelLM"],
        "attention_dropout": 0.0, "attention_layer_norm": False, "attention_layer_norm_with_affine": True,
        "auto_map": {"AutoConfig": "configuration_llada.LLaDAConfig", "AutoModel": "modeling_llada.LLaDAModelLM",
                     "AutoModelForCausalLM": "modeling_llada.LLaDAModelLM"},
        "bias_for_layer_norm": False, "block_group_size": 1, "block_type": "llama", "d_model": 64,
        "embedding_dropout": 0.0, "embedding_size": 320, "eos_token_id": tok_ids["<|endoftext|>"],
        "flash_attention": False, "include_bias": False, "include_qkv_bias": False, "init_cutoff_factor": None,
        "init_device": "meta", "init_fn": "mitchell", "init_std": 0.02, "input_emb_norm": False,
        "layer_norm_type": "rms", "layer_norm_with_affine": True, "mask_token_id": tok_ids["<|mdm_mask|>"],
        "max_sequence_length": 256, "mlp_hidden_size": 160, "mlp_ratio": 4, "model_type": "llada",
        "multi_query_attention": None, "n_heads": 4, "n_kv_heads": 4, "n_layers": 2,
        "pad_token_id": tok_ids["<|endoftext|>"], "precision": "amp_bf16", "residual_dropout": 0.0,
        "rms_norm_eps": 1e-05, "rope": True, "rope_full_precision": True, "rope_theta": 500000.0,
        "scale_logits": False, "torch_dtype": "bfloat16", "transformers_version": "4.46.3", "use_cache": False,
        "vocab_size": 320, "weight_tying": False,
    }
    cfg.update(overrides)
    return cfg


def llada_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, h, rows = cfg["d_model"], cfg["mlp_hidden_size"], cfg["embedding_size"]
    kv = (cfg["n_kv_heads"] or cfg["n_heads"]) * (d // cfg["n_heads"])
    shapes = {"model.transformer.wte.weight": (rows, d)}
    for i in range(cfg["n_layers"]):
        b = f"model.transformer.blocks.{i}."
        shapes.update({
            b + "attn_norm.weight": (d,), b + "q_proj.weight": (d, d), b + "k_proj.weight": (kv, d),
            b + "v_proj.weight": (kv, d), b + "attn_out.weight": (d, d), b + "ff_norm.weight": (d,),
            b + "ff_proj.weight": (h, d), b + "up_proj.weight": (h, d), b + "ff_out.weight": (d, h),
        })
    shapes["model.transformer.ln_f.weight"] = (d,)
    if not cfg["weight_tying"]:
        shapes["model.transformer.ff_out.weight"] = (rows, d)
    return shapes


def make_llada(folder: Path, shards: int = 2, seed: int = 0, **overrides) -> Path:
    from transformers import PreTrainedTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    tok = _bpe(LLADA_SPECIALS)
    ids = {t: tok.token_to_id(t) for t in LLADA_SPECIALS}
    cfg = llada_config(ids, **overrides)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": ids["<|startoftext|>"],
                                                                "eos_token_id": ids["<|endoftext|>"]}))
    _save_weights(_random_state(llada_shapes(cfg), seed), folder, shards)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|startoftext|>", eos_token="<|endoftext|>",
                                   model_max_length=cfg["max_sequence_length"])
    # The hub's own template, which our LLaDA family deliberately overrides (it had bugs).
    fast.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    fast.save_pretrained(str(folder))
    for name in ("configuration_llada.py", "modeling_llada.py"):
        (folder / name).write_text(TRAP)
    return folder


# ---- Dream -----------------------------------------------------------------------------------

DREAM_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|beginoftext|>", "<|mask|>"]


def dream_config(tok_ids: dict[str, int], **overrides) -> dict:
    """Dream-v0-Instruct-7B's config.json, scaled down (GQA kept: 4 query heads share 2 KV heads)."""
    cfg = {
        "architectures": ["DreamModel"], "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_dream.DreamConfig", "AutoModel": "modeling_dream.DreamModel"},
        "bos_token_id": tok_ids["<|beginoftext|>"], "eos_token_id": tok_ids["<|endoftext|>"], "hidden_act": "silu",
        "hidden_size": 64, "initializer_range": 0.02, "intermediate_size": 176,
        "mask_token_id": tok_ids["<|mask|>"], "max_position_embeddings": 512, "max_window_layers": 2,
        "model_type": "Dream", "num_attention_heads": 4, "num_hidden_layers": 2, "num_key_value_heads": 2,
        "pad_token_id": tok_ids["<|endoftext|>"], "rms_norm_eps": 1e-06, "rope_scaling": None,
        "rope_theta": 1000000.0, "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2", "use_cache": False, "use_sliding_window": False, "vocab_size": 320,
    }
    cfg.update(overrides)
    return cfg


def dream_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    d, h, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = d // cfg["num_attention_heads"]
    kv = cfg["num_key_value_heads"] * hd
    shapes = {"model.embed_tokens.weight": (v, d)}
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        shapes.update({
            b + "input_layernorm.weight": (d,), b + "post_attention_layernorm.weight": (d,),
            b + "self_attn.q_proj.weight": (d, d), b + "self_attn.q_proj.bias": (d,),
            b + "self_attn.k_proj.weight": (kv, d), b + "self_attn.k_proj.bias": (kv,),
            b + "self_attn.v_proj.weight": (kv, d), b + "self_attn.v_proj.bias": (kv,),
            b + "self_attn.o_proj.weight": (d, d),
            b + "mlp.gate_proj.weight": (h, d), b + "mlp.up_proj.weight": (h, d), b + "mlp.down_proj.weight": (d, h),
        })
    shapes["model.norm.weight"] = (d,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (v, d)
    return shapes


def make_dream(folder: Path, shards: int = 2, seed: int = 0, **overrides) -> Path:
    """Dream ships vocab.json + merges.txt and a remote-code DreamTokenizer, not tokenizer.json."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = _bpe([])
    tok.model.save(str(folder))  # vocab.json, merges.txt
    base = tok.get_vocab_size()
    ids = {t: base + i for i, t in enumerate(DREAM_SPECIALS)}
    cfg = dream_config(ids, **overrides)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    _save_weights(_random_state(dream_shapes(cfg), seed), folder, shards)
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok_cfg = {
        "added_tokens_decoder": {str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                          "single_word": False, "special": True} for t, i in ids.items()},
        "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "bos_token": "<|beginoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
        "mask_token": "<|mask|>", "chat_template": template, "model_max_length": 2048,
        "tokenizer_class": "DreamTokenizer", "errors": "replace", "split_special_tokens": False,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2))
    for name in ("configuration_dream.py", "modeling_dream.py", "tokenization_dream.py", "generation_utils.py"):
        (folder / name).write_text(TRAP)
    return folder
