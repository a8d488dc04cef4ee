"""dLLMs without a native port, run through the Python code that ships in their folder.

Some dLLMs exist only as transformers "remote code" (SDAR, the Tiny-A2D Qwen->diffusion models, ...).
This family loads them with transformers' Auto classes and adapts them to the DiffusionLM interface,
so the generic sampler, the memory estimate and the quantizer can drive them like the native ports.

Loading imports and runs the folder's .py files, so `family_for` hands out this family only after
the user agreed (--trust-remote-code); the native ports are always preferred for known families.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from dllm_studio.checkpoint import check_dtypes, read_config
from dllm_studio.errors import ModelLoadError
from dllm_studio.models.base import DiffusionLM, LinearLayer, check_token_ids, special_ids

# Auto classes tried in this order. Those with an LM head come first: by transformers' convention
# `AutoModel` is the bare backbone (SDAR maps it to SDARModel, which returns hidden states), while
# LLaDA and Dream list their LM class under AutoModel as well, so it remains the last resort.
AUTO_CLASSES = ("AutoModelForMaskedLM", "AutoModelForCausalLM", "AutoModel")

# Last module-name component -> role, covering the common naming schemes (Llama/Qwen, LLaDA/OLMo,
# Mixtral's w1/w2/w3, GPT-NeoX, BERT-style attention). Anything else is reported as "other".
LINEAR_ROLES = {
    "q_proj": "q", "query": "q", "k_proj": "k", "key": "k", "v_proj": "v", "value": "v",
    "o_proj": "o", "out_proj": "o", "attn_out": "o",
    "qkv_proj": "qkv", "query_key_value": "qkv", "Wqkv": "qkv", "att_proj": "qkv",
    "gate_proj": "gate", "ff_proj": "gate", "w1": "gate",
    "up_proj": "up", "w3": "up", "fc1": "up",
    "down_proj": "down", "ff_out": "down", "w2": "down", "fc2": "down",
    "gate_up_proj": "gate_up",
    "lm_head": "head", "embed_out": "head",
}

# End-of-turn tokens of the common chat formats; any the tokenizer has also end an answer.
EOT_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|endoftext|>", "<end_of_turn>", "<|end|>")
DEFAULT_CONTEXT = 2048  # when the config states no maximum length


class RemoteCodeModel(DiffusionLM):
    family = "remote"
    no_kv_cache = "it runs the folder's own code, whose cache interface (if any) dLLM Studio does not know"

    @classmethod
    def load(cls, folder: Path, *, source: str, dtype: torch.dtype, device: torch.device) -> RemoteCodeModel:
        import transformers

        config = read_config(folder)
        auto_map = config.get("auto_map") or {}
        names = [name for name in AUTO_CLASSES if name in auto_map]
        if not names:
            raise ModelLoadError(
                f"{folder}/config.json: auto_map names no model class ({', '.join(AUTO_CLASSES)}), "
                "so its code cannot be loaded.")
        auto_class = getattr(transformers, names[0])
        try:
            module = auto_class.from_pretrained(str(folder), trust_remote_code=True, dtype=dtype,
                                                use_safetensors=True)
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), trust_remote_code=True)
        except Exception as exc:  # the folder's own code can fail in any way; keep the cause chained
            raise ModelLoadError(
                f"The code in {folder} failed to load the model ({type(exc).__name__}: {exc}).") from exc
        check_dtypes(folder, module)
        if getattr(module.config, "use_cache", False):
            module.config.use_cache = False  # the sampler re-runs the whole sequence; a KV cache is waste
        module = module.to(device)

        mask_id = config.get("mask_token_id")
        if mask_id is None:
            mask_id = tokenizer.mask_token_id
        if mask_id is None:
            raise ModelLoadError(
                f"{folder} defines no mask token: config.json has no mask_token_id and the tokenizer no mask_token.")
        vocab_size = int(config.get("vocab_size") or module.get_input_embeddings().weight.shape[0])
        check_token_ids(folder, vocab_size, mask_token_id=mask_id)

        eos = config.get("eos_token_id")
        eos_ids = eos if isinstance(eos, list) else [eos]
        stops = [*eos_ids, tokenizer.eos_token_id, *special_ids(tokenizer, *EOT_TOKENS)]
        model = cls(
            module, tokenizer, config=config, path=folder, source=source, mask_token_id=int(mask_id),
            stop_token_ids=tuple(dict.fromkeys(int(t) for t in stops if t is not None)),
            context_length=int(_first(config, "max_position_embeddings", "max_sequence_length", "n_positions")
                               or DEFAULT_CONTEXT),
            hidden_size=int(_first(config, "hidden_size", "d_model", "n_embd") or 0),
            num_layers=int(_first(config, "num_hidden_layers", "n_layers", "num_layers", "n_layer") or 0),
            vocab_size=vocab_size,
        )
        # Per model, not per family: an instance attribute shadows the base class's ClassVar.
        model.shift_logits = bool(_first(config, "shift_logits", "right_shift_logits") or False)
        return model

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), whatever structure the model's own forward returns."""
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(self.device)}
        output = self.module(input_ids=input_ids.to(self.device), **kwargs)
        return model_logits(output, type(self.module).__name__)

    def linear_layers(self) -> list[LinearLayer]:
        """Every nn.Linear, its role guessed from its name; a vocab-sized linear outside the blocks is the head."""
        layers = []
        for name, mod in self.module.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            found = re.search(r"\.(\d+)\.", name)
            block = int(found.group(1)) if found else None
            role = LINEAR_ROLES.get(name.rsplit(".", 1)[-1], "other")
            # LLaDA's head is a top-level `ff_out`, the same name as its blocks' down projections.
            if block is None and (role == "head" or mod.out_features == self.vocab_size):
                role = "head"
            layers.append(LinearLayer(name, role, None if role == "head" else block,
                                      mod.in_features, mod.out_features))
        return layers


def model_logits(output: object, model_class: str) -> torch.Tensor:
    """The logits in a forward's result: a tensor, a ModelOutput (a mapping) or a tuple starting with them."""
    if isinstance(output, torch.Tensor):
        return output
    logits = None
    if isinstance(output, Mapping):
        logits = output.get("logits")  # never fall back to e.g. last_hidden_state: that is not logits
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    if not isinstance(logits, torch.Tensor):
        raise ModelLoadError(
            f"{model_class}.forward returned no logits ({type(output).__name__}); "
            "the folder's auto_map must name a class with a language-model head.")
    return logits


def _first(config: dict, *keys: str):
    """The value of the first of `keys` that config.json sets (not null)."""
    return next((config[k] for k in keys if config.get(k) is not None), None)
