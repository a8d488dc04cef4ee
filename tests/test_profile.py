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
