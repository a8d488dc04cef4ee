"""Write a quantized model as a self-contained folder that `load_model` (and other tools) read back.

    DIR/config.json          the source config plus `quantization_config`
    DIR/model.safetensors    packed quantized layers (native or GPTQ layout) and every other tensor
    DIR/tokenizer files      copied from the source folder, with generation_config.json
    DIR/recipe.json          the recipe that made it
    DIR/profile.json         per-layer activation statistics and errors, and the summary
    DIR/README.md            a model card: method, bits, sizes, scores when known

Everything goes to a hidden sibling folder first and is renamed into place at the end, so a full
disk or a crash never leaves a half-written model under DIR; an existing DIR is replaced only with
`force`, and only once the new folder is complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import torch

from dllm_studio.errors import ExportError
from dllm_studio.memory import quantized_sizes
from dllm_studio.models.base import DiffusionLM
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import FORMATS
from dllm_studio.quant.storage import to_gptq

NOT_COPIED = {"config.json", "README.md", "recipe.json", "profile.json", "training.json", "eval.json",
              "recipe_search.json"}
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".index.json")


def save_quantized(model: DiffusionLM, out: str | Path, *, fmt: str = "native", force: bool = False,
                   profile: dict | None = None, scores: dict | None = None) -> Path:
    """Write `model` (a quantization result) to `out`; returns the folder."""
    from safetensors.torch import save_file

    recipe = getattr(model, "quantization", None)
    if recipe is None:
        raise ExportError(f"{model.source} is not quantized; quantize it first (dllm-studio quantize).")
    if fmt not in FORMATS:
        raise ExportError(f"Unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}.")
    out = Path(out)
    if out.exists() and not force:
        raise ExportError(f"{out} already exists; choose another --out or pass --force to replace it.")
    if out.exists() and not out.is_dir():
        raise ExportError(f"{out} exists and is not a folder.")
    state = gptq_state(model) if fmt == "gptq" else _unique(model.module.state_dict())
    config = {**model.config, "quantization_config": gptq_config(recipe) if fmt == "gptq" else model.config["quantization_config"]}
    # The unquantized tensors are stored at the dtype the model ran at, so "auto" reloads it as it was.
    for key in ("torch_dtype", "dtype"):
        if key in config or key == "torch_dtype":
            config[key] = str(model.dtype).removeprefix("torch.")
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        for source in sorted(Path(model.path).iterdir()):
            if source.is_file() and source.name not in NOT_COPIED and not source.name.endswith(WEIGHT_SUFFIXES):
                shutil.copy2(source, tmp / source.name)
        (tmp / "recipe.json").write_text(json.dumps(recipe.to_dict(), indent=2) + "\n")
        (tmp / "profile.json").write_text(json.dumps(profile or {}, indent=1) + "\n")
        (tmp / "README.md").write_text(model_card(model, fmt, profile or {}, scores))
        _replace(tmp, out)
    except OSError as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = "the disk is full" if exc.errno == errno.ENOSPC else (exc.strerror or str(exc))
        raise ExportError(f"Could not write {out}: {reason}; nothing was written there.") from None
    return out


def read_profile(folder: str | Path) -> dict:
    """The profile.json `save_quantized` wrote (summary and per-layer statistics); {} when missing or unreadable,
    since it only informs and never decides how the model loads."""
    try:
        profile = json.loads((Path(folder) / "profile.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return profile if isinstance(profile, dict) else {}


VERIFY_PROMPT = [{"role": "user", "content": "What is 2 plus 3?"}]
VERIFY_MASKS = 16  # a masked answer span, as the model sees its input while denoising


@torch.inference_mode()
def verify(model: DiffusionLM, folder: str | Path) -> dict:
    """Reload `folder` and compare its logits with `model`'s on a chat prompt followed by masked positions.

    A folder that loads but answers differently is worse than no folder; this is the check that it does not.
    """
    from dllm_studio.models import load_model

    reloaded = load_model(folder, device=str(model.device))
    ids = model.chat_ids(VERIFY_PROMPT)
    if model.mask_token_id is not None:
        ids += [model.mask_token_id] * VERIFY_MASKS
    x = torch.tensor([ids])
    a, b = model.forward(x).float().cpu(), reloaded.forward(x).float().cpu()
    disagree = int((a.argmax(-1) != b.argmax(-1)).sum())
    return {"max_abs_logit_diff": float((a - b).abs().max()), "argmax_agrees": disagree == 0,
            "argmax_disagreements": disagree, "positions": len(ids)}


def _replace(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)


def _unique(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors, each stored once (safetensors refuses shared storage)."""
    seen, unique = set(), {}
    for name, tensor in state.items():
        key = (tensor.data_ptr(), tensor.shape, tensor.dtype)
        if key not in seen:
            seen.add(key)
            unique[name] = tensor.detach().contiguous().cpu()
    return unique


def gptq_state(model: DiffusionLM) -> dict[str, torch.Tensor]:
    state = {}
    quantized = {name: m for name, m in model.module.named_modules() if isinstance(m, QuantLinear)}
    for name, tensor in _unique(model.module.state_dict()).items():
        if name.rpartition(".")[0] not in quantized:
            state[name] = tensor
    for name, layer in quantized.items():
        try:
            state.update({f"{name}.{k}": v.contiguous().cpu() for k, v in to_gptq(layer).items()})
        except ValueError as exc:
            raise ExportError(f"{name} cannot be written in the GPTQ format: {exc}.") from None
    return state


def gptq_config(recipe) -> dict:
    return {"quant_method": "gptq", "checkpoint_format": "gptq", "bits": recipe.wbits,
            "group_size": recipe.group_size or -1, "desc_act": recipe.act_order, "sym": recipe.symmetric,
            "damp_percent": recipe.damp, "true_sequential": True, "static_groups": False,
            "quantizer": f"dllm-studio ({recipe.method})"}


def model_card(model: DiffusionLM, fmt: str, profile: dict, scores: dict | None) -> str:
    recipe = model.quantization
    summary = profile.get("summary", {})
    lines = [f"# {Path(str(model.source)).name} — {recipe.label}", "",
             f"Quantized by dLLM Studio from `{model.source}` ({model.family}) with {recipe.method.upper()}, "
             f"{recipe.wbits}-bit weights, {'per-channel' if not recipe.group_size else f'group size {recipe.group_size}'}, "
             f"{'symmetric' if recipe.symmetric else 'asymmetric'}; stored in the "
             f"{'GPTQ (v1) checkpoint' if fmt == 'gptq' else 'dLLM Studio packed'} format.", ""]
    if summary:
        lines += [f"- {line}" for line in quantized_sizes(summary, model.dtype)]
        lines += [f"- bits per quantized weight: {summary['bits_per_weight']} (bf16: 16)", ""]
    calib = "clean text" if not recipe.masked_calib else "masked text (ratios spread over (0, 1))"
    lines += [f"Calibration: {recipe.calib}, {recipe.calib_samples} x {recipe.seq_len} tokens, {calib}; "
              f"layers kept in full precision: {', '.join(recipe.skip) or 'none'} (and the embeddings).", ""]
    if scores:
        lines += ["| suite | score |", "|---|---|"] + [f"| {k} | {v} |" for k, v in scores.items()] + [""]
    lines += ["Load it like any model: `dllm-studio generate DIR --prompt ...`, `dllm-studio eval DIR --suite all`.", ""]
    return "\n".join(lines)
