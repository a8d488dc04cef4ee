"""The one interface every dLLM family presents to the sampler, the quantizer, the CLI and the GUI."""

from __future__ import annotations

import functools
import re
from collections.abc import Generator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import nn

if TYPE_CHECKING:
    from dllm_studio.events import CancelToken, Event
    from dllm_studio.models.cache import KVCache
    from dllm_studio.sampling import GenerationConfig, GenerationResult

# Bit-widths the memory estimate reports, with their display names.
PRECISIONS = {16: "bf16", 8: "W8", 4: "W4", 3: "W3", 2: "W2"}
DEFAULT_GROUP_SIZE = 128
# The Llama/Qwen/Gemma names of a block's linears (Dream, DiffusionGemma); LLaDA uses OLMo's names.
LLAMA_LINEAR_ROLES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
                      "gate_proj": "gate", "up_proj": "up", "down_proj": "down"}


@dataclass(frozen=True)
class LinearLayer:
    """A linear layer the quantizer can replace, with the role it plays in its block."""

    name: str  # qualified module name, e.g. "model.transformer.blocks.3.q_proj"
    role: str  # q | k | v | o | gate | up | down | head (fused layers: qkv, gate_up)
    block: int | None  # transformer block index; None for the LM head
    in_features: int
    out_features: int


@dataclass(frozen=True)
class ModelInfo:
    family: str
    source: str
    path: str
    parameters: int
    layers: int
    hidden_size: int
    vocab_size: int
    mask_token_id: int | None
    context_length: int
    shift_logits: bool
    dtype: str
    dtype_reason: str  # why it runs at `dtype` ("float32: this CPU (AVX2) has no bf16 units, ..."); "" if unknown
    memory_bytes: dict[str, int] = field(default_factory=dict)  # precision name -> estimated weight bytes
    quantization: str | None = None  # e.g. "gptq 4-bit g128" for a quantized checkpoint


class DiffusionLM:
    """A loaded diffusion LM: its torch module, tokenizer and the facts the sampler needs.

    Subclasses (one per family) set the class attributes and implement `load`. `forward` returns the
    model's raw logits; the sampler applies Dream's one-position shift when `shift_logits` is set.
    """

    family: ClassVar[str]
    shift_logits: ClassVar[bool] = False
    linear_roles: ClassVar[dict[str, str]] = {}  # last module-name component -> role
    head_names: ClassVar[tuple[str, ...]] = ()  # qualified names of LM-head linears
    # AWQ: the module (inside a block) whose output the linears of a stage read, by the stage's first
    # role, so channel scales can be folded into it exactly: {"q": "attn_norm", "o": "v_proj", ...}.
    scale_producers: ClassVar[dict[str, str]] = {}
    # The residual stream's ends (QuaRot rotates the stream: the embedding writes it, the final norm reads it).
    embedding_name: ClassVar[str | None] = None
    final_norm_name: ClassVar[str | None] = None
    chat_template: ClassVar[str | None] = None  # used when the folder's tokenizer has none
    quantization = None  # the QuantRecipe that made this model, when it is a quantized one
    dtype_reason = ""  # why it runs at its dtype, set by the loader (`models.choose_dtype`)
    # Where its blocks run while their weights stream from disk (`quant.streaming`): the module itself is on meta.
    compute_device: torch.device | None = None
    not_quantizable: ClassVar[str | None] = None  # why the block-by-block quantizer cannot take this family
    override_chat_template: ClassVar[bool] = False  # True where the released template is known to be wrong
    # Why `forward` takes no KV cache (the sampler's --cache prefix|dual); None where it does (our LLaDA, Dream).
    no_kv_cache: ClassVar[str | None] = "its forward has no key/value cache"

    def __init__(self, module: nn.Module, tokenizer, *, config: dict, path: Path, source: str,
                 mask_token_id: int | None, stop_token_ids: tuple[int, ...], context_length: int,
                 hidden_size: int, num_layers: int, vocab_size: int) -> None:
        self.module = module.eval()
        self.tokenizer = tokenizer
        self.config = config
        self.path = Path(path)
        self.source = source
        self.mask_token_id = mask_token_id
        self.stop_token_ids = stop_token_ids
        self.context_length = context_length
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.vocab_size = vocab_size

    @classmethod
    def load(cls, folder: Path, *, source: str, dtype: torch.dtype, device: torch.device) -> DiffusionLM:
        raise NotImplementedError

    # --- running -----------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                positions: torch.Tensor | None = None, cache: KVCache | None = None,
                logits_for: slice | None = None) -> torch.Tensor:
        """input_ids (B, T) -> logits (B, T, V), unshifted.

        With a `KVCache` (families whose `no_kv_cache` is None): a forward over the whole sequence fills it, one
        over the window at `positions` attends over it (`models.cache`); `logits_for` keeps only those positions'
        logits. Called without them, the module runs exactly as it always has.
        """
        if cache is None and positions is None and logits_for is None:
            return self.module(input_ids.to(self.device), attention_mask)
        if self.no_kv_cache:
            raise NotImplementedError(f"{self.family}: {self.no_kv_cache}")
        if positions is not None:
            positions = positions.to(self.device)
        return self.module(input_ids.to(self.device), attention_mask, positions=positions, cache=cache,
                           logits_for=logits_for)

    def denoise(self, prompt_ids: list[int], config: GenerationConfig,
                cancel: CancelToken | None = None) -> Generator[Event, None, GenerationResult]:
        """Generate an answer step by step; yields a `DenoiseStep` per step. See `sampling.denoise`."""
        from dllm_studio.sampling import denoise

        return denoise(self, prompt_ids, config, cancel)

    def check_settings(self, config: GenerationConfig) -> None:
        """Refuse sampler settings this model cannot run, with the reason; the faces call it as settings change,
        before any prompt is sent, and `denoise` again."""
        from dllm_studio.errors import InvalidSettingsError

        config.validate()
        if config.cache != "none" and self.no_kv_cache:
            raise InvalidSettingsError(f"The {config.cache} cache needs a model whose forward takes a KV cache, and "
                                       f"this {self.family} model's does not: {self.no_kv_cache}. Use cache none.")

    @property
    def device(self) -> torch.device:
        return self.compute_device or next(self.module.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.module.parameters()).dtype

    # --- text --------------------------------------------------------------------------------
    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Prompt ids for a conversation ([{"role": "user", "content": ...}, ...]) in this family's template."""
        from dllm_studio.tokenizer import render_chat

        own = getattr(self.tokenizer, "chat_template", None)
        template = self.chat_template if (self.override_chat_template or not own) else None
        source = None if template is None else f"dLLM Studio's {self.family} template"
        return render_chat(self.tokenizer, messages, template, source)

    @property
    def single_turn(self) -> bool:
        """True for a model trained on single exchanges (config.json `"single_turn": true`, e.g. the demo).

        A second turn with the earlier exchange in its prompt is outside what such a model has seen, and it
        answers nonsense; it is sent the latest user message alone (see `chat_messages`).
        """
        return bool(self.config.get("single_turn", False))

    def chat_messages(self, history: list[dict], prompt: str) -> list[dict]:
        """The messages the model is shown for `prompt` after `history`: all of them, or the prompt alone
        for a single-turn model."""
        latest = [{"role": "user", "content": prompt}]
        return latest if self.single_turn else [*history, *latest]

    @functools.cached_property
    def special_token_ids(self) -> frozenset[int]:
        """Ids with no text of their own: the tokenizer's special tokens, every added token it flags special
        (chat-template headers such as `<|start_header_id|>` are often only there) and the stop tokens."""
        added = self.tokenizer.added_tokens_decoder.items()
        return frozenset({*self.tokenizer.all_special_ids, *self.stop_token_ids,
                          *(tid for tid, token in added if token.special)})

    def answer_length(self, ids) -> int:
        """Answer tokens in `ids`: those before the first stop token (end of turn or of text), or all of them."""
        return next((i for i, tid in enumerate(ids) if tid in self.stop_token_ids), len(ids))

    def decode(self, ids: list[int]) -> str:
        """Answer text: everything before the first stop token, special tokens removed."""
        special = self.special_token_ids
        return self.tokenizer.decode([t for t in ids[: self.answer_length(ids)] if t not in special],
                                     skip_special_tokens=True)

    def token_pieces(self, ids) -> list[str]:
        """Each token's own text, for step-by-step display; a special or stop token has none ("")."""
        special = self.special_token_ids
        return ["" if tid in special else self.tokenizer.decode([tid]) for tid in ids]

    # --- structure ---------------------------------------------------------------------------
    def linear_layers(self) -> list[LinearLayer]:
        layers = []
        for name, mod in self.module.named_modules():
            if not isinstance(mod, nn.Linear):
                continue
            role = "head" if name in self.head_names else self.linear_roles.get(name.rsplit(".", 1)[-1])
            if role is None:
                continue
            block = re.search(r"\.(\d+)\.", name)
            layers.append(LinearLayer(name, role, int(block.group(1)) if block and role != "head" else None,
                                      mod.in_features, mod.out_features))
        return layers

    def blocks(self) -> nn.ModuleList:
        """The transformer blocks, in order: the units the quantizer works through one at a time."""
        own = getattr(self.module, "blocks", None)
        if isinstance(own, nn.ModuleList):
            return own
        lists = [m for m in self.module.modules() if isinstance(m, nn.ModuleList)
                 and any(isinstance(x, nn.Linear) for x in m.modules())]
        if not lists:
            raise NotImplementedError(f"{self.family}: no list of transformer blocks found")
        return max(lists, key=len)

    def weight_bytes(self) -> int:
        """Bytes the model's tensors occupy as held now (packed quantized buffers at their packed size)."""
        from dllm_studio.quant.runtimes import held_bytes

        tensors = {id(t): t for t in (*self.module.parameters(), *self.module.buffers())}
        return sum(held_bytes(t) for t in tensors.values())

    def num_parameters(self) -> int:
        # Parameters are counted once even when shared (tied embeddings, DiffusionGemma's encoder/decoder).
        return sum(p.numel() for p in {id(p): p for p in self.module.parameters()}.values())

    def memory_estimate(self, bits: int, group_size: int = DEFAULT_GROUP_SIZE) -> int:
        """Bytes the weights take when the block linears are stored at `bits` (16 = bf16 throughout).

        Quantized linears cost `bits` per weight plus an fp16 scale and zero point per group;
        embeddings, norms, biases and the LM head stay at 16 bits (the quantizer skips them by default).
        """
        total = self.num_parameters() * 2
        if bits >= 16:
            return total
        for layer in self.linear_layers():
            if layer.role == "head":
                continue
            weights = layer.in_features * layer.out_features
            groups = layer.out_features * -(-layer.in_features // group_size)
            total += weights * bits // 8 + groups * 4 - weights * 2
        return total

    def info(self) -> ModelInfo:
        quant = self.config.get("quantization_config")
        if quant:  # a quantized model: what it holds, not what it would take at each precision
            memory = {"as stored": self.weight_bytes()}
            label = f"{quant.get('method', quant.get('quant_method'))} {quant.get('bits')}-bit"
            from dllm_studio.quant import runtimes

            if quant.get("method") in runtimes.METHODS:  # a library's own layout, not our group size
                label += f" {runtimes.layout(quant['method'], quant.get('bits'))}"
            else:
                label += f" g{quant['group_size']}" if int(quant.get("group_size", -1)) > 0 else " per-channel"
            if quant.get("act_bits"):  # weights and activations: W8A8, W4A4 ...
                label += f", {quant['act_bits']}-bit activations"
        else:
            memory, label = {name: self.memory_estimate(bits) for bits, name in PRECISIONS.items()}, None
        return ModelInfo(
            family=self.family, source=self.source, path=str(self.path), parameters=self.num_parameters(),
            layers=self.num_layers, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
            mask_token_id=self.mask_token_id, context_length=self.context_length, shift_logits=self.shift_logits,
            dtype=str(self.dtype).removeprefix("torch."), dtype_reason=self.dtype_reason, memory_bytes=memory,
            quantization=label,
        )


def build_on_meta(factory):
    """Construct a module without allocating its weights; `checkpoint.load_into` then assigns them."""
    with torch.device("meta"):
        return factory()


def load_weights(folder: Path, factory, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """Build the module on the meta device, then load the folder's safetensors into it strictly.

    With device "meta" the weights are only checked against the safetensors headers, never read:
    a model of any size can then be described (`info`, memory estimates) without the memory to load it.
    A config.json with a `quantization_config` gets `QuantLinear` layers where the checkpoint holds
    packed weights (dLLM Studio's own layout, or the GPTQ format converted on the way in).
    """
    from dllm_studio.checkpoint import check_dtypes, check_shapes, held_shapes, load_into, read_config, tensor_shapes

    module = build_on_meta(factory)
    shapes = tensor_shapes(folder)
    convert = keep_dtype = None
    qconfig = read_config(folder).get("quantization_config")
    if qconfig:
        from dllm_studio.quant import storage

        if storage.quant_format(qconfig) == "runtime":
            from dllm_studio.quant import runtimes

            return runtimes.load_weights(module, folder, qconfig, dtype, device)
        storage.install_shells(module, qconfig, shapes)
        keep_dtype = lambda name: storage.keeps_dtype(module, name)  # noqa: E731
        if storage.quant_format(qconfig) == "gptq":
            shapes = storage.gptq_shapes(shapes, qconfig)
            convert = lambda name, tensor: storage.from_gptq(name, tensor, qconfig)  # noqa: E731
    check_dtypes(folder, module)
    if device.type == "meta":
        check_shapes(shapes, held_shapes(module), folder)
        return module.to(dtype)
    load_into(module, folder, dtype, shapes=shapes, convert=convert, keep_dtype=keep_dtype)
    return module.to(device)


def special_ids(tokenizer, *tokens: str) -> tuple[int, ...]:
    """Ids of those special tokens the tokenizer has (unknown ones are skipped)."""
    from dllm_studio.tokenizer import token_id

    return tuple(tid for tid in (token_id(tokenizer, t) for t in tokens) if tid is not None)


def check_token_ids(folder: Path, vocab_size: int, **ids: int | None) -> None:
    """Refuse a config whose special token ids fall outside the vocabulary."""
    from dllm_studio.errors import ModelLoadError

    for name, tid in ids.items():
        if tid is not None and not 0 <= tid < vocab_size:
            raise ModelLoadError(f"{folder}/config.json: {name}={tid} is outside the vocabulary (size {vocab_size}).")


def load_transformers_model(model_cls, folder: Path, dtype: torch.dtype, device: torch.device) -> torch.nn.Module:
    """Load a native transformers model from the folder's safetensors, refusing missing or misshapen tensors.

    transformers would otherwise initialise absent weights at random, with only a warning. With device
    "meta" the model is built from config.json and checked against the safetensors headers, no weight read.
    """
    from dllm_studio.checkpoint import check_dtypes, check_shapes, tensor_shapes
    from dllm_studio.errors import ModelLoadError

    found = tensor_shapes(folder)  # the engine's own errors for missing, pickle-only, truncated or corrupt files
    if any(name.endswith(".qweight") for name in found):
        raise ModelLoadError(f"{folder} holds a quantized {model_cls.__name__}; dLLM Studio reloads quantized LLaDA and "
                             "Dream checkpoints so far (quantize this model in the session that uses it instead).")
    if device.type == "meta":
        config = model_cls.config_class.from_pretrained(str(folder), local_files_only=True)
        with torch.device("meta"):
            module = model_cls(config).to(dtype)
        # A tied tensor has several names but is saved under one; extra tensors are ignored, as transformers does.
        tied: dict[int, list[tuple[str, tuple[int, ...]]]] = {}
        for name, tensor in module.state_dict(keep_vars=True).items():
            tied.setdefault(id(tensor), []).append((name, tuple(tensor.shape)))
        expected: dict[str, tuple[int, ...]] = {}
        for names in tied.values():
            expected.update([(n, shape) for n, shape in names if n in found] or names[:1])
        check_shapes({k: v for k, v in found.items() if k in expected}, expected, folder)
        check_dtypes(folder, module)
        return module
    try:
        module, info = model_cls.from_pretrained(str(folder), dtype=dtype, use_safetensors=True,
                                                 local_files_only=True, output_loading_info=True)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ModelLoadError(f"transformers could not load {model_cls.__name__} from {folder} ({exc}).") from None
    bad = sorted(info["missing_keys"]) or sorted(str(k) for k in info["mismatched_keys"])
    if bad:
        raise ModelLoadError(f"{folder}: tensor {bad[0]} is missing from the weights or has the wrong shape.")
    check_dtypes(folder, module)
    return module.to(device)
