"""Dream (Dream-org/Dream-v0-Base-7B / -Instruct-7B, Dream-Coder, DiffuCoder): a clean port.

Dream is Qwen2.5 turned into a masked-diffusion model: the same modules and state-dict keys
(`model.embed_tokens`, `model.layers.{i}.self_attn.{q,k,v,o}_proj` with q/k/v biases and grouped
KV heads, `mlp.{gate,up,down}_proj`, `input_layernorm`, `post_attention_layernorm`, `model.norm`,
`lm_head`), attention made bidirectional. Its logits are shifted by one position (position i is
predicted from the hidden state at i - 1); the sampler applies that shift, not the model.

Reference: https://github.com/DreamLM/Dream (modeling_dream.py on the hub).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dllm_studio.checkpoint import read_config
from dllm_studio.errors import UnsupportedModelError
from dllm_studio.models.base import LLAMA_LINEAR_ROLES, DiffusionLM, check_token_ids, load_weights, special_ids
from dllm_studio.models.cache import KVCache, KVView, layer_views
from dllm_studio.models.layers import RMSNorm, RopeCache, apply_rope, attention, merge_heads, split_heads
from dllm_studio.tokenizer import load_tokenizer


@dataclass
class DreamConfig:
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    vocab_size: int = 152064
    max_position_embeddings: int = 131072
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1000000.0
    rope_scaling: dict | None = None
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    mask_token_id: int = 151666
    pad_token_id: int = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int = 151643
    raw: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, raw: dict) -> DreamConfig:
        names = {f.name for f in dataclasses.fields(cls)} - {"raw"}
        cfg = cls(**{k: v for k, v in raw.items() if k in names}, raw=dict(raw))
        if cfg.hidden_act != "silu":
            raise UnsupportedModelError(f"Dream config has hidden_act={cfg.hidden_act!r}; only 'silu' is implemented.")
        if cfg.rope_scaling and cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")) not in (None, "default"):
            raise UnsupportedModelError(f"Dream config has rope_scaling={cfg.rope_scaling}; only default RoPE is implemented.")
        cfg.head_dim = cfg.head_dim or cfg.hidden_size // cfg.num_attention_heads
        return cfg


class DreamAttention(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.cfg = cfg
        q_dim, kv_dim = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim
        self.q_proj = nn.Linear(cfg.hidden_size, q_dim, bias=True)
        self.k_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.v_proj = nn.Linear(cfg.hidden_size, kv_dim, bias=True)
        self.o_proj = nn.Linear(q_dim, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], padding_mask: torch.Tensor | None,
                kv: KVView | None = None) -> torch.Tensor:
        q = apply_rope(split_heads(self.q_proj(x), self.cfg.num_attention_heads), *rope, full_precision=False)
        k = apply_rope(split_heads(self.k_proj(x), self.cfg.num_key_value_heads), *rope, full_precision=False)
        v = split_heads(self.v_proj(x), self.cfg.num_key_value_heads)
        return self.o_proj(merge_heads(attention(q, k, v, padding_mask, kv)))


class DreamMLP(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = DreamAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = DreamMLP(cfg)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], padding_mask: torch.Tensor | None,
                kv: KVView | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, padding_mask, kv)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DreamDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class DreamModel(nn.Module):
    """input_ids (B, T) -> unshifted logits (B, T, vocab_size); positions, cache and logits_for as for LLaDA."""

    def __init__(self, cfg: DreamConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = DreamBaseModel(cfg)
        if not cfg.tie_word_embeddings:
            self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        self.rope = RopeCache(cfg.head_dim, cfg.rope_theta)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.model.layers

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_for: slice | None = None) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        rope = self.rope(input_ids.shape[1] if positions is None else positions, input_ids.device)
        for layer, kv in zip(self.model.layers, layer_views(cache, len(self.model.layers), positions)):
            x = layer(x, rope, attention_mask, kv)
        if logits_for is not None:
            x = x[:, logits_for]
        x = self.model.norm(x)
        return F.linear(x, self.model.embed_tokens.weight) if self.config.tie_word_embeddings else self.lm_head(x)




# Qwen2.5's ChatML, which Dream's tokenizer ships; used only if a folder's tokenizer has no template.
CHAT_TEMPLATE = (
    "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


class Dream(DiffusionLM):
    family = "dream"
    shift_logits = True
    linear_roles = LLAMA_LINEAR_ROLES
    head_names = ("lm_head",)
    scale_producers = {"q": "input_layernorm", "o": "self_attn.v_proj", "gate": "post_attention_layernorm",
                       "down": "mlp.up_proj"}
    embedding_name, final_norm_name = "model.embed_tokens", "model.norm"
    chat_template = CHAT_TEMPLATE
    no_kv_cache = None

    @classmethod
    def load(cls, folder: Path, *, source: str, dtype: torch.dtype, device: torch.device) -> Dream:
        cfg = DreamConfig.from_dict(read_config(folder))
        tokenizer = load_tokenizer(folder)
        check_token_ids(folder, cfg.vocab_size, mask_token_id=cfg.mask_token_id, eos_token_id=cfg.eos_token_id)
        module = load_weights(folder, lambda: DreamModel(cfg), dtype, device)
        stops = tuple(dict.fromkeys((cfg.eos_token_id, *special_ids(tokenizer, "<|endoftext|>", "<|im_end|>"))))
        return cls(module, tokenizer, config=cfg.raw, path=folder, source=source, mask_token_id=cfg.mask_token_id,
                   stop_token_ids=stops, context_length=min(cfg.max_position_embeddings, 2048),
                   hidden_size=cfg.hidden_size, num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size)
