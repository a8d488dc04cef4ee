"""Remote code runs only with consent, only for families without a native port, and then works end to end."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from checkpoints import REMOTE_CODE_MARKER, make_dream, make_llada

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.errors import ModelLoadError, RemoteCodeRefusedError
from dllm_studio.models import load_model
from dllm_studio.models.remote import RemoteCodeModel, model_logits
from dllm_studio.sampling import GenerationConfig

# Both files record that they were imported, at an absolute path: transformers runs a *copy* of them
# from its modules cache, so a marker next to __file__ would land there, not in the model folder.
CONFIGURATION = '''
from pathlib import Path
Path({marker!r}).write_text("configuration_tinydiff imported")

from transformers import PretrainedConfig


class TinyDiffConfig(PretrainedConfig):
    model_type = "tinydiff"

    def __init__(self, vocab_size=32, hidden_size=16, num_hidden_layers=2, max_position_embeddings=64, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.num_hidden_layers = num_hidden_layers
        self.max_position_embeddings = max_position_embeddings
        super().__init__(**kwargs)
'''

MODELING = '''
from pathlib import Path
Path({marker!r}).write_text("modeling_tinydiff imported")

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_tinydiff import TinyDiffConfig


class TinyDiffBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (nn.Linear(d, d) for _ in range(4))
        self.gate_proj, self.up_proj, self.down_proj = nn.Linear(d, 2 * d), nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x):
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        attn = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # bidirectional
        x = x + self.o_proj(attn @ v)
        return x + self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class TinyDiffForMaskedLM(PreTrainedModel):
    config_class = TinyDiffConfig

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(TinyDiffBlock(config.hidden_size) for _ in range(config.num_hidden_layers))
        self.mixer = nn.Linear(config.hidden_size, config.hidden_size)  # a name no role table knows
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size)
        self.post_init()

    def forward(self, input_ids, attention_mask=None, **kwargs):
        x = self.embed(input_ids)
        for layer in self.layers:
            x = layer(x)
        return MaskedLMOutput(logits=self.lm_head(self.mixer(x)))
'''

WORDS = ["hello", "world", "the", "cat", "sat", "on", "mat", "a", "dog", "ran"]


@pytest.fixture(autouse=True)
def modules_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """transformers copies remote code into a modules cache and imports it from there: keep that in tmp_path."""
    import transformers.dynamic_module_utils as dynamic

    cache = tmp_path / "hf_modules"
    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(cache))
    monkeypatch.setattr(sys, "path", list(sys.path))  # transformers appends the cache to sys.path
    # An imported `transformers_modules` package keeps the __path__ of the cache it came from.
    _forget_remote_modules()
    yield cache
    _forget_remote_modules()


def make_tinydiff(folder: Path, marker: Path, *, mask_token: bool = True, **config: object) -> Path:
    """A remote-code dLLM folder as the hub lays it out: config with auto_map, .py files, safetensors, tokenizer."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder.mkdir(parents=True)
    (folder / "configuration_tinydiff.py").write_text(CONFIGURATION.format(marker=str(marker)))
    (folder / "modeling_tinydiff.py").write_text(MODELING.format(marker=str(marker)))
    (folder / "config.json").write_text(json.dumps({
        "model_type": "tinydiff", "architectures": ["TinyDiffForMaskedLM"],
        "auto_map": {"AutoConfig": "configuration_tinydiff.TinyDiffConfig",
                     "AutoModelForMaskedLM": "modeling_tinydiff.TinyDiffForMaskedLM"},
        "vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2, "max_position_embeddings": 64,
        "eos_token_id": 0, **config}))

    # Weights through the model's own save_pretrained, which runs the code: forget that run afterwards.
    torch.manual_seed(0)
    hf_config = transformers.AutoConfig.from_pretrained(str(folder), trust_remote_code=True)
    transformers.AutoModelForMaskedLM.from_config(hf_config, trust_remote_code=True).save_pretrained(str(folder))
    _forget_remote_modules()
    marker.unlink()

    vocab = {tok: i for i, tok in enumerate(["<|endoftext|>", "<|mask|>", "[UNK]", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"eos_token": "<|endoftext|>", "unk_token": "[UNK]"} | ({"mask_token": "<|mask|>"} if mask_token else {})
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, **specials).save_pretrained(str(folder))
    return folder


def _forget_remote_modules() -> None:
    """Drop imported remote code, so a later load would have to execute it again (and leave a marker)."""
    for name in [n for n in sys.modules if n.startswith("transformers_modules")]:
        del sys.modules[name]


# ---- consent ---------------------------------------------------------------------------------

def test_refused_without_consent_and_no_code_runs(tmp_path: Path, capsys) -> None:
    marker = tmp_path / "TINYDIFF_CODE_RAN"
    folder = make_tinydiff(tmp_path / "tinydiff", marker)

    with pytest.raises(RemoteCodeRefusedError) as refused:
        load_model(folder)
    message = str(refused.value)
    assert "configuration_tinydiff.py" in message and "modeling_tinydiff.py" in message
    assert "--" not in message  # the engine names no face's switch; the CLI adds its flag:
    assert main(["info", str(folder)]) == 1
    assert "Pass --trust-remote-code" in capsys.readouterr().err
    assert not marker.exists()


def test_loads_and_generates_with_consent(tmp_path: Path) -> None:
    marker = tmp_path / "TINYDIFF_CODE_RAN"
    folder = make_tinydiff(tmp_path / "tinydiff", marker, right_shift_logits=True)

    model = load_model(folder, trust_remote_code=True)
    assert marker.exists()  # this time the folder's code did run
    assert isinstance(model, RemoteCodeModel) and model.family == "remote"
    assert type(model.module).__module__.startswith("transformers_modules")
    assert model.mask_token_id == model.tokenizer.convert_tokens_to_ids("<|mask|>")  # from the tokenizer
    assert model.stop_token_ids == (0,)
    assert model.context_length == 64 and model.num_layers == 2 and model.vocab_size == 32
    assert model.shift_logits is True and model.info().shift_logits is True
    assert RemoteCodeModel.shift_logits is False  # set per instance, not for the family

    ids = model.tokenizer.encode("hello the cat", add_special_tokens=False)
    result = jobs.run(model.denoise(ids, GenerationConfig(gen_length=8, steps=4, block_length=8)))
    assert len(result.token_ids) == 8
    assert model.mask_token_id not in result.token_ids

    roles = {layer.name: layer.role for layer in model.linear_layers()}
    assert roles["layers.0.q_proj"] == "q" and roles["layers.1.down_proj"] == "down"
    assert roles["lm_head"] == "head" and roles["mixer"] == "other"
    assert len(roles) == 2 * 7 + 2
    assert {layer.block for layer in model.linear_layers() if layer.role == "q"} == {0, 1}


def test_mask_token_from_config_and_missing_mask(tmp_path: Path) -> None:
    marker = tmp_path / "TINYDIFF_CODE_RAN"
    folder = make_tinydiff(tmp_path / "with_id", marker, mask_token=False, mask_token_id=3)
    model = load_model(folder, trust_remote_code=True)
    assert model.mask_token_id == 3 and model.shift_logits is False

    folder = make_tinydiff(tmp_path / "no_mask", tmp_path / "NO_MASK_CODE_RAN", mask_token=False)
    with pytest.raises(ModelLoadError, match="no mask token"):
        load_model(folder, trust_remote_code=True)


def test_model_logits_accepts_the_common_output_shapes() -> None:
    from transformers.modeling_outputs import BaseModelOutput, MaskedLMOutput

    logits = torch.zeros(1, 3, 5)
    assert model_logits(logits, "M") is logits
    assert model_logits(MaskedLMOutput(logits=logits), "M") is logits
    assert model_logits((logits, None), "M") is logits
    with pytest.raises(ModelLoadError, match="no logits"):  # a bare backbone's hidden states are not logits
        model_logits(BaseModelOutput(last_hidden_state=logits), "M")


# ---- native ports never run the folder's code ------------------------------------------------

@pytest.mark.parametrize("make", [make_llada, make_dream], ids=["llada", "dream"])
@pytest.mark.parametrize("trust", [False, True], ids=["refused", "consented"])
def test_native_ports_never_import_remote_code(tmp_path: Path, make, trust: bool) -> None:
    folder = make(tmp_path / "model")
    model = load_model(folder, trust_remote_code=trust)
    assert model.family in ("llada", "dream")
    # The trap writes its marker next to whichever copy is imported: the folder or the modules cache.
    assert not list(tmp_path.rglob(REMOTE_CODE_MARKER))
