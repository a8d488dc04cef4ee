"""Our LLaDA and Dream ports against an independent reference forward written from the papers.

The reference reads the safetensors directly and uses plain tensor ops (explicit softmax attention,
RoPE as pairwise rotations), so it shares no code with dllm_studio.models.
"""

import math

import pytest
import torch
from safetensors.torch import load_file

from checkpoints import REMOTE_CODE_MARKER, make_dream, make_llada
from dllm_studio.checkpoint import weight_files
from dllm_studio.models import load_model


def read_state(folder):
    state = {}
    for f in weight_files(folder):
        state.update({k: v.float() for k, v in load_file(str(f)).items()})
    return state


def rms(x, w, eps):
    return w * (x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps))


def rope(x, theta):
    """Rotate pairs (i, i + d/2) of each head by angle pos * theta^(-2i/d)."""
    T, d = x.shape[-2], x.shape[-1]
    half = d // 2
    angles = torch.arange(T)[:, None] * theta ** (-torch.arange(half) * 2 / d)[None, :]  # (T, d/2)
    cos, sin = angles.cos(), angles.sin()
    a, b = x[..., :half], x[..., half:]
    return torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)


def attend(q, k, v):
    """q (H, T, hs), k/v (H_kv, T, hs); every position attends to every other."""
    rep = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(rep, 0), v.repeat_interleave(rep, 0)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return weights @ v


def heads(x, n):
    T, C = x.shape
    return x.view(T, n, C // n).transpose(0, 1)


def unheads(x):
    return x.transpose(0, 1).reshape(x.shape[1], -1)


def reference_llada(folder, cfg, ids):
    s = read_state(folder)
    p = "model.transformer."
    x = s[p + "wte.weight"][ids]
    nh, nkv = cfg["n_heads"], cfg["n_kv_heads"] or cfg["n_heads"]
    for i in range(cfg["n_layers"]):
        b = f"{p}blocks.{i}."
        h = rms(x, s[b + "attn_norm.weight"], cfg["rms_norm_eps"])
        q = rope(heads(h @ s[b + "q_proj.weight"].T, nh), cfg["rope_theta"])
        k = rope(heads(h @ s[b + "k_proj.weight"].T, nkv), cfg["rope_theta"])
        v = heads(h @ s[b + "v_proj.weight"].T, nkv)
        x = x + unheads(attend(q, k, v)) @ s[b + "attn_out.weight"].T
        h = rms(x, s[b + "ff_norm.weight"], cfg["rms_norm_eps"])
        gate, up = h @ s[b + "ff_proj.weight"].T, h @ s[b + "up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ s[b + "ff_out.weight"].T
    x = rms(x, s[p + "ln_f.weight"], cfg["rms_norm_eps"])
    head = s[p + "wte.weight"] if cfg["weight_tying"] else s[p + "ff_out.weight"]
    return (x @ head.T)[:, : cfg["vocab_size"]]


def reference_dream(folder, cfg, ids):
    s = read_state(folder)
    x = s["model.embed_tokens.weight"][ids]
    nh, nkv, eps = cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["rms_norm_eps"]
    for i in range(cfg["num_hidden_layers"]):
        b = f"model.layers.{i}."
        a = b + "self_attn."
        h = rms(x, s[b + "input_layernorm.weight"], eps)
        q = rope(heads(h @ s[a + "q_proj.weight"].T + s[a + "q_proj.bias"], nh), cfg["rope_theta"])
        k = rope(heads(h @ s[a + "k_proj.weight"].T + s[a + "k_proj.bias"], nkv), cfg["rope_theta"])
        v = heads(h @ s[a + "v_proj.weight"].T + s[a + "v_proj.bias"], nkv)
        x = x + unheads(attend(q, k, v)) @ s[a + "o_proj.weight"].T
        h = rms(x, s[b + "post_attention_layernorm.weight"], eps)
        m = b + "mlp."
        gate, up = h @ s[m + "gate_proj.weight"].T, h @ s[m + "up_proj.weight"].T
        x = x + (gate * torch.sigmoid(gate) * up) @ s[m + "down_proj.weight"].T
    x = rms(x, s["model.norm.weight"], eps)
    head = s["model.embed_tokens.weight"] if cfg["tie_word_embeddings"] else s["lm_head.weight"]
    return x @ head.T


IDS = torch.tensor([3, 17, 250, 9, 88, 140, 2, 301, 299, 42, 7, 180])


@pytest.mark.parametrize("overrides", [
    {},  # LLaDA-8B as released: MHA, untied head, embedding_size == vocab_size
    {"n_kv_heads": 2, "weight_tying": True, "embedding_size": 384},  # GQA, tied, padded embedding rows
])
def test_llada_logits_match_reference(tmp_path, overrides):
    folder = make_llada(tmp_path / "llada", **overrides)
    model = load_model(folder, dtype="float32")
    cfg = model.config
    ours = model.forward(IDS[None])[0]
    ref = reference_llada(folder, cfg, IDS)
    assert ours.shape == (len(IDS), cfg["vocab_size"])
    assert (ours - ref).abs().max() < 1e-4
    assert not (folder / REMOTE_CODE_MARKER).exists()


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "num_key_value_heads": 1}])
def test_dream_logits_match_reference(tmp_path, overrides):
    folder = make_dream(tmp_path / "dream", **overrides)
    model = load_model(folder, dtype="float32")
    ours = model.forward(IDS[None])[0]
    ref = reference_dream(folder, model.config, IDS)
    assert (ours - ref).abs().max() < 1e-4
    assert model.shift_logits and model.mask_token_id == model.config["mask_token_id"]
    assert not (folder / REMOTE_CODE_MARKER).exists()


def test_padding_mask_hides_padded_keys(llada):
    """Appending padding that the mask hides leaves the real positions' logits unchanged."""
    ids = IDS[None]
    padded = torch.cat([ids, torch.full((1, 4), 5)], dim=1)
    mask = torch.cat([torch.ones_like(ids), torch.zeros(1, 4, dtype=torch.long)], dim=1)
    assert torch.allclose(llada.forward(padded, mask)[0, : ids.shape[1]], llada.forward(ids)[0], atol=1e-5)


def test_bf16_load_matches_fp32_closely(llada_dir, llada):
    bf16 = load_model(llada_dir, dtype="bfloat16")  # as stored
    assert bf16.dtype == torch.bfloat16
    diff = (bf16.forward(IDS[None]).float() - llada.forward(IDS[None])).abs().max()
    assert diff < 0.1


def test_linear_layers_and_roles(llada, dream):
    for model, n_blocks in ((llada, 2), (dream, 2)):
        layers = model.linear_layers()
        roles = [l.role for l in layers if l.block == 0]
        assert sorted(roles) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
        assert [l.role for l in layers if l.block is None] == ["head"]
        assert len(layers) == 7 * n_blocks + 1
    q = next(l for l in llada.linear_layers() if l.role == "q")
    assert q.name == "model.transformer.blocks.0.q_proj" and (q.in_features, q.out_features) == (64, 64)


def test_parameter_count_and_memory_estimate(llada):
    cfg = llada.config
    d, h, v, n = cfg["d_model"], cfg["mlp_hidden_size"], cfg["vocab_size"], cfg["n_layers"]
    expected = 2 * v * d + d + n * (4 * d * d + 3 * d * h + 2 * d)
    assert llada.num_parameters() == expected
    info = llada.info()
    assert info.memory_bytes["bf16"] == 2 * expected
    # W4 with group 128: 4 bits per block-linear weight + fp16 scale and zero per group; the rest bf16.
    linear = n * (4 * d * d + 3 * d * h)
    groups = n * (4 * d * 1 + 2 * h * 1 + d * 2)  # in_features 64 -> 1 group/row; 160 -> 2 groups/row
    assert info.memory_bytes["W4"] == 2 * (expected - linear) + linear // 2 + groups * 4
    assert info.memory_bytes["bf16"] > info.memory_bytes["W8"] > info.memory_bytes["W4"] > info.memory_bytes["W3"] > info.memory_bytes["W2"]


def test_llada_8b_memory_estimate_matches_paper():
    """The estimate for the real LLaDA-8B shape, built on the meta device (no memory used)."""
    from dllm_studio.models.base import build_on_meta
    from dllm_studio.models.llada import LLaDA, LLaDAConfig, LLaDAModelLM
    from checkpoints import llada_config

    cfg = LLaDAConfig.from_dict(llada_config({"<|endoftext|>": 126081, "<|mdm_mask|>": 126336}, d_model=4096,
                                             n_heads=32, n_kv_heads=32, n_layers=32, mlp_hidden_size=12288,
                                             vocab_size=126464, embedding_size=126464))
    model = LLaDA(build_on_meta(lambda: LLaDAModelLM(cfg)), None, config={}, path=".", source="meta",
                  mask_token_id=126336, stop_token_ids=(126081,), context_length=4096, hidden_size=4096,
                  num_layers=32, vocab_size=126464)
    assert 8.0e9 < model.num_parameters() < 8.05e9
    assert model.memory_estimate(16) / 1e9 == pytest.approx(16.05, abs=0.1)  # paper: ≈ 16.1 GB
    assert model.memory_estimate(4) / 1e9 == pytest.approx(5.8, abs=0.1)  # paper: ≈ 5.8 GB at W4 g128


@pytest.mark.parametrize("make", [make_llada, make_dream])
def test_meta_load_describes_without_reading_weights(tmp_path, make):
    """device="meta" checks shapes from the headers only: info for a model too big to load."""
    folder = make(tmp_path / "m", shards=1)
    full = load_model(folder, dtype="float32").info()
    shard = folder / "model.safetensors"
    data = bytearray(shard.read_bytes())
    data[-64:] = b"\xff" * 64  # garbage tensor data; the header is intact
    shard.write_bytes(bytes(data))
    meta = load_model(folder, dtype="float32", device="meta")
    assert all(p.is_meta for p in meta.module.parameters())
    assert meta.info() == full
