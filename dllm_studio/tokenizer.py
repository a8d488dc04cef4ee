"""Tokenizers and chat templates, loaded from the model folder without running its code."""

from __future__ import annotations

from pathlib import Path

from dllm_studio.errors import ModelLoadError


def load_tokenizer(folder: Path):
    """A transformers tokenizer for the folder: tokenizer.json, or a Qwen2-style vocab.json + merges.txt.

    The folder's tokenizer_config.json (special tokens, chat template) is honoured, but a custom
    tokenizer class it names (e.g. Dream's `DreamTokenizer`) is never imported: both layouts are
    read by transformers' own fast tokenizers.
    """
    import transformers

    try:
        if (folder / "tokenizer.json").is_file():
            return transformers.PreTrainedTokenizerFast.from_pretrained(str(folder))
        if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
            return transformers.Qwen2Tokenizer.from_pretrained(str(folder))
    except Exception as exc:  # transformers raises many types for a broken tokenizer file
        raise ModelLoadError(f"The tokenizer in {folder} could not be loaded ({type(exc).__name__}: {exc}).") from None
    raise ModelLoadError(f"{folder} has no tokenizer (expected tokenizer.json, or vocab.json with merges.txt).")


def token_id(tokenizer, token: str) -> int | None:
    """The id of a special token by its text, or None if the vocabulary lacks it."""
    tid = tokenizer.convert_tokens_to_ids(token)
    unknown = tid == tokenizer.unk_token_id and token != tokenizer.unk_token  # tokenizers map misses to UNK
    return None if tid is None or unknown else int(tid)


def render_chat(tokenizer, messages: list[dict], template: str | None, source: str | None = None) -> list[int]:
    """Token ids of `messages` rendered with `template` (or the tokenizer's own), ready for an answer.

    Templates run in transformers' Jinja sandbox. Whatever a template raises while it is compiled or
    rendered (the sandbox refusing an attribute, a syntax error, its own `raise_exception`, a type error
    in its expressions) is the template's fault, so it becomes a ModelLoadError naming `source`, where
    the template came from (for the tokenizer's own: its file in the model folder).
    """
    import jinja2

    try:
        text = tokenizer.apply_chat_template(messages, chat_template=template, add_generation_prompt=True,
                                             tokenize=False)
    except Exception as exc:
        if not isinstance(exc, jinja2.TemplateError) and not _raised_in_template(exc):
            raise
        where = source or (_template_file(tokenizer) if template is None else "the template given")
        raise ModelLoadError(f"The chat template in {where} cannot be used ({type(exc).__name__}: {exc}).") from None
    return tokenizer.encode(text, add_special_tokens=False)


def _raised_in_template(exc: BaseException) -> bool:
    """True if the innermost frame of `exc` is template code (Jinja compiles templates to "<template>")."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    return tb is not None and tb.tb_frame.f_code.co_filename == "<template>"


def _template_file(tokenizer) -> str:
    """Where a tokenizer's own chat template lives: chat_template.jinja beside it, or tokenizer_config.json."""
    folder = Path(getattr(tokenizer, "name_or_path", "") or ".")
    jinja = folder / "chat_template.jinja"
    return str(jinja if jinja.is_file() else folder / "tokenizer_config.json")
