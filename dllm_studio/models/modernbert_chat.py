"""ModernBERT-chat (dllm-hub/ModernBERT-base-chat-v0.1 / -large-chat-v0.1): a BERT finetuned into a chatbot.

The checkpoints are plain `ModernBertForMaskedLM` from transformers (no remote code), so the generic
masked-diffusion sampler runs them unchanged: the mask is the tokenizer's [MASK], logits are not shifted.

The chat format is dllm's BERT template: `[Question]\\n…\\n[/Question]\\n\\n[Answer]\\n`. In SFT every answer
ended with the *text* "[/Answer]" (dllm adds no such token to the tokenizer) and batches were padded with
[PAD], which was trained on too; so [PAD] and [SEP] stop an answer and `decode` cuts the text at "[/Answer]".

Reference: ZHZisZZ/dllm, examples/bert and dllm/utils/models.py (`get_tokenizer`).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from dllm_studio.checkpoint import read_config
from dllm_studio.errors import ModelLoadError
from dllm_studio.models.base import DiffusionLM, LinearLayer, load_transformers_model, special_ids
from dllm_studio.tokenizer import load_tokenizer, token_id

EOT = "[/Answer]"

# dllm's template for BERT-style chat models (an optional leading system turn in [SYS]…[/SYS]).
CHAT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m['role'] == 'system' and loop.first %}[SYS]\n{{ m['content'] | trim }}\n[/SYS]\n\n"
    "{% elif m['role'] == 'user' %}[Question]\n{{ m['content'] | trim }}\n[/Question]\n\n"
    "{% elif m['role'] == 'assistant' %}[Answer]\n{{ m['content'] | trim }}\n" + EOT + "\n\n"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt and (not messages or messages[-1]['role'] != 'assistant') %}[Answer]\n{% endif %}"
)


class ModernBertChat(DiffusionLM):
    family = "modernbert"
    # Attention and MLP both call their output projection `Wo`: it maps to "o" here, and
    # `linear_layers` renames the MLP's to "down".
    linear_roles = {"Wqkv": "qkv", "Wo": "o", "Wi": "gate_up"}
    head_names = ("head.dense", "decoder")  # the MLM prediction head; `decoder` is tied to the embeddings
    chat_template = CHAT_TEMPLATE
    no_kv_cache = ("it runs transformers' ModernBertForMaskedLM, whose forward takes no past keys/values; its "
                   "alternating local (sliding-window) and global attention over unpadded sequences would need a "
                   "port of its own")

    @classmethod
    def load(cls, folder: Path, *, source: str, dtype: torch.dtype, device: torch.device) -> ModernBertChat:
        from transformers import ModernBertForMaskedLM

        config = read_config(folder)
        tokenizer = load_tokenizer(folder)
        mask_id = token_id(tokenizer, "[MASK]")
        if mask_id is None:
            raise ModelLoadError(f"The tokenizer in {folder} has no [MASK] token, which ModernBERT-chat needs.")
        module = load_transformers_model(ModernBertForMaskedLM, folder, dtype, device)
        cfg = module.config
        if mask_id >= cfg.vocab_size:
            raise ModelLoadError(f"{folder}: the tokenizer's [MASK] id {mask_id} is outside the model's vocabulary "
                                 f"(size {cfg.vocab_size}).")
        eos = (tokenizer.eos_token_id,) if tokenizer.eos_token_id is not None else ()
        stops = tuple(dict.fromkeys((*eos, *special_ids(tokenizer, "[SEP]", "[PAD]", EOT))))
        return cls(module, tokenizer, config=config, path=folder, source=source, mask_token_id=mask_id,
                   stop_token_ids=stops, context_length=cfg.max_position_embeddings, hidden_size=cfg.hidden_size,
                   num_layers=cfg.num_hidden_layers, vocab_size=cfg.vocab_size)

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V)."""
        if attention_mask is not None:
            attention_mask = attention_mask.to(self.device)
        return self.module(input_ids=input_ids.to(self.device), attention_mask=attention_mask).logits

    def decode(self, ids: list[int]) -> str:
        # "[/Answer]" is several tokens in the released tokenizer, so it is cut from the text.
        return super().decode(ids).split(EOT)[0].rstrip()

    def linear_layers(self) -> list[LinearLayer]:
        return [dataclasses.replace(layer, role="down") if layer.name.endswith("mlp.Wo") else layer
                for layer in super().linear_layers()]
