"""LLaDA (GSAI-ML/LLaDA-8B-Base/-Instruct, LLaDA 1.5, iLLaDA): a clean port of the released model.

Module names and config.json fields are exactly those of the hub checkpoints (OLMo-derived), so
their safetensors load strictly into `LLaDAModelLM` without running the folder's modeling_llada.py:

    model.transformer.wte                       Embedding (embedding_size, d_model)
    model.transformer.blocks.{i}.attn_norm      RMSNorm
    model.transformer.blocks.{i}.q_proj/k_proj/v_proj/attn_out
    model.transformer.blocks.{i}.ff_norm        RMSNorm
    model.transformer.blocks.{i}.ff_proj/up_proj/ff_out   SwiGLU: ff_out(silu(ff_proj(x)) * up_proj(x))
    model.transformer.ln_f                      final RMSNorm
    model.transformer.ff_out                    LM head (absent when weight_tying)

Reference: https://github.com/ML-GSAI/LLaDA (modeling_llada.py on the hub), LLaDA's "llama" block.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dllm_studio.checkpoint import read_config
from dllm_studio.errors import UnsupportedModelError
from dllm_studio.models.base import DiffusionLM, check_token_ids, load_weights, special_ids
from dllm_studio.models.cache import KVCache, KVView, layer_views
from dllm_studio.models.layers import RMSNorm, RopeCache, apply_rope, attention, merge_heads, split_heads
from dllm_studio.tokenizer import load_tokenizer


@dataclass
class LLaDAConfig:
    d_model: int = 4096
    n_heads: int = 32
    n_kv_heads: int | None = None
    n_layers: int = 32
    mlp_hidden_size: int | None = None
    mlp_ratio: int = 4
    vocab_size: int = 126464
    embedding_size: int | None = None
    max_sequence_length: int = 4096
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    weight_tying: bool = False
    include_bias: bool = False
    include_qkv_bias: bool = False
    multi_query_attention: bool | None = None
    input_emb_norm: bool = False
    scale_logits: bool = False
    rope_full_precision: bool = True
    mask_token_id: int = 126336
    eos_token_id: int = 126081
    pad_token_id: int | None = None
    # Variants our port does not implement; checked in `from_dict` so they fail loudly, not silently.
    block_type: str = "llama"
    activation_type: str = "silu"
    layer_norm_type: str = "rms"
    attention_layer_norm: bool = False
    rope: bool = True
    alibi: bool = False
    raw: dict = field(default_factory=dict, repr=False)  # config.json as read, for re-saving

    SUPPORTED = {"block_type": "llama", "activation_type": "silu", "layer_norm_type": "rms",
                 "attention_layer_norm": False, "rope": True, "alibi": False}

    @classmethod
    def from_dict(cls, raw: dict) -> LLaDAConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        cfg = cls(**{k: v for k, v in raw.items() if k in names}, raw=dict(raw))
        for name, wanted in cls.SUPPORTED.items():
            if getattr(cfg, name) != wanted:
                raise UnsupportedModelError(
                    f"LLaDA config has {name}={getattr(cfg, name)!r}; dLLM Studio implements only {name}={wanted!r}."
                )
        return cfg

    @property
    def kv_heads(self) -> int:
        if self.multi_query_attention:
            return 1
        return self.n_kv_heads or self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def hidden_size(self) -> int:
        return self.mlp_hidden_size or self.mlp_ratio * self.d_model

    @property
    def rows(self) -> int:
        """Rows of the embedding and LM head (may be padded past vocab_size)."""
        return self.embedding_size or self.vocab_size


class LLaDALlamaBlock(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.cfg = cfg
        qkv_bias = cfg.include_bias or cfg.include_qkv_bias
        kv_dim = cfg.kv_heads * cfg.head_dim
        self.attn_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.q_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, kv_dim, bias=qkv_bias)
        self.attn_out = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.include_bias)
        self.ff_norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.ff_proj = nn.Linear(cfg.d_model, cfg.hidden_size, bias=cfg.include_bias)
        self.up_proj = nn.Linear(cfg.d_model, cfg.hidden_size, bias=cfg.include_bias)
        self.ff_out = nn.Linear(cfg.hidden_size, cfg.d_model, bias=cfg.include_bias)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], padding_mask: torch.Tensor | None,
                kv: KVView | None = None) -> torch.Tensor:
        h = self.attn_norm(x)
        q = split_heads(self.q_proj(h), self.cfg.n_heads)  # (B, nh, T, hs)
        k = split_heads(self.k_proj(h), self.cfg.kv_heads)
        v = split_heads(self.v_proj(h), self.cfg.kv_heads)
        q = apply_rope(q, *rope, full_precision=self.cfg.rope_full_precision)
        k = apply_rope(k, *rope, full_precision=self.cfg.rope_full_precision)
        x = x + self.attn_out(merge_heads(attention(q, k, v, padding_mask, kv)))
        h = self.ff_norm(x)
        return x + self.ff_out(F.silu(self.ff_proj(h)) * self.up_proj(h))


class LLaDAModel(nn.Module):
    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        layers = dict(
            wte=nn.Embedding(cfg.rows, cfg.d_model),
            blocks=nn.ModuleList(LLaDALlamaBlock(cfg) for _ in range(cfg.n_layers)),
            ln_f=RMSNorm(cfg.d_model, cfg.rms_norm_eps),
        )
        if not cfg.weight_tying:
            layers["ff_out"] = nn.Linear(cfg.d_model, cfg.rows, bias=cfg.include_bias)
        self.transformer = nn.ModuleDict(layers)


class LLaDAModelLM(nn.Module):
    """input_ids (B, T) -> logits (B, T, vocab_size); no causal mask, no timestep input.

    positions: the (T,) sequence positions of input_ids (default 0..T-1); cache: a `KVCache` that a forward
    over the whole sequence fills and a forward over a window reads (`models.cache`); logits_for: a slice of
    the T positions whose logits are wanted (default all), so a window's head computes only those.
    """

    def __init__(self, cfg: LLaDAConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = LLaDAModel(cfg)
        self.rope = RopeCache(cfg.head_dim, cfg.rope_theta)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.transformer.blocks

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_for: slice | None = None) -> torch.Tensor:
        t = self.model.transformer
        x = t.wte(input_ids)  # (B, T, d_model)
        if self.config.input_emb_norm:
            x = x * self.config.d_model**0.5
        rope = self.rope(input_ids.shape[1] if positions is None else positions, input_ids.device)
        for block, kv in zip(t.blocks, layer_views(cache, len(t.blocks), positions)):
            x = block(x, rope, attention_mask, kv)
        if logits_for is not None:
            x = x[:, logits_for]
        x = t.ln_f(x)
        logits = F.linear(x, t.wte.weight) if self.config.weight_tying else t.ff_out(x)
        if self.config.scale_logits:
            logits = logits * (1 / math.sqrt(self.config.d_model))
        return logits[..., : self.config.vocab_size]


# Linear layers by their name inside a block, and the role the quantizer and profiler know them by.
LINEAR_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "attn_out": "o",
                "ff_proj": "gate", "up_proj": "up", "ff_out": "down"}


# LLaDA's chat format (Llama-3 headers). The hub tokenizer's own template had bugs, so ours is used.
CHAT_TEMPLATE = (
    "<|startoftext|>"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)


class LLaDA(DiffusionLM):
    family = "llada"
    linear_roles = LINEAR_ROLES
    head_names = ("model.transformer.ff_out",)
    scale_producers = {"q": "attn_norm", "o": "v_proj", "gate": "ff_norm", "down": "up_proj"}
    embedding_name, final_norm_name = "model.transformer.wte", "model.transformer.ln_f"
    chat_template = CHAT_TEMPLATE
    override_chat_template = True
    no_kv_cache = None

    @classmethod
    def load(cls, folder: Path, *, source: str, dtype: torch.dtype, device: torch.device) -> LLaDA:
        cfg = LLaDAConfig.from_dict(read_config(folder))
        tokenizer = load_tokenizer(folder)
        check_token_ids(folder, cfg.vocab_size, mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id)
        module = load_weights(folder, lambda: LLaDAModelLM(cfg), dtype, device)
        stops = tuple(dict.fromkeys((cfg.eos_token_id, *special_ids(tokenizer, "<|endoftext|>", "<|eot_id|>"))))
        return cls(module, tokenizer, config=cfg.raw, path=folder, source=source, mask_token_id=cfg.mask_token_id,
                   stop_token_ids=stops, context_length=cfg.max_sequence_length, hidden_size=cfg.d_model,
                   num_layers=cfg.n_layers, vocab_size=cfg.vocab_size)
