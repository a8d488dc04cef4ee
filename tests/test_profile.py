"""Activation outlier statistics."""

import pytest
import torch

from dllm_studio.profile import activation_outliers, capture_linear_inputs, channel_absmax, outlier_ratio


def test_channel_absmax_and_ratio():
    x = torch.tensor([[[1.0, -2.0, 0.5, 1.0], [0.5, 1.0, -40.0, 1.0]]])  # (B, T, C)
    assert channel_absmax(x).tolist() == [1.0, 2.0, 40.0, 1.0]
    assert outlier_ratio(channel_absmax(x)) == 40.0  # torch.median takes the lower middle value: 1


def test_capture_sees_the_inputs_of_named_layers_and_unhooks(llada):
    name = "model.transformer.blocks.1.ff_out"
    ids = torch.tensor([[5, 6, 7, 8]])
    with capture_linear_inputs(llada, [name]) as seen:
        llada.forward(ids)
    assert seen[name].shape == (llada.config["mlp_hidden_size"],)
    assert not llada.module.get_submodule(name)._forward_pre_hooks  # hooks removed afterwards


def test_activation_outliers_per_block(llada):
    rows = activation_outliers(llada, ["Hello there", "The capital of France is Paris."])
    assert [(r.block, r.role) for r in rows] == [(0, "q"), (0, "down"), (1, "q"), (1, "down")]
    # Each row is the captured inputs' max channel |x| over their median channel |x|, at the top channel.
    with capture_linear_inputs(llada, [r.name for r in rows]) as seen:
        for text in ["Hello there", "The capital of France is Paris."]:
            llada.forward(torch.tensor([llada.tokenizer.encode(text)]))
    for r in rows:
        absmax = seen[r.name]
        assert r.top_channel == int(absmax.argmax()) and r.top_magnitude == float(absmax.max())
        assert r.outlier_ratio == pytest.approx(float(absmax.max() / absmax.median()))


def test_input_statistics_by_chunks_of_tokens_equal_the_whole_batch_at_once(monkeypatch):
    from dllm_studio import profile

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 40, 16, generator=g)
    x[1, 7, 5] = 5000.0  # a massive activation (in both adds), and the largest token
    masked = torch.rand(3, 40, generator=g) < 0.4

    def stats():
        s = profile.InputStats(16)
        s.add(x, masked)
        s.add(x[:, :9] * 2, masked[:, :9])
        return s

    monkeypatch.setattr(profile, "STATS_CHUNK", 10 ** 9)
    whole = stats()
    monkeypatch.setattr(profile, "STATS_CHUNK", 5 * 16)  # five tokens a chunk: several per batch, one cut mid-sequence
    chunked = stats()
    for field in ("absmax", "absmax_masked", "absmax_unmasked"):
        assert torch.equal(getattr(whole, field), getattr(chunked, field))
    assert torch.allclose(whole.sumsq, chunked.sumsq, rtol=1e-12)
    assert (whole.tokens, whole.masked_tokens, whole.massive) == (chunked.tokens, chunked.masked_tokens, 2)
    assert whole.top_tokens == chunked.top_tokens and whole.top_tokens[0] == (10000.0, 7)
