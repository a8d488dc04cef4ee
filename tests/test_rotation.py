"""Rotations for activation quantization: Hadamard (Paley and fallback sizes), block rotations, DuQuant, ARS stats."""

import math

import pytest
import torch

from dllm_studio.errors import QuantizationError
from dllm_studio.profile import InputStats
from dllm_studio.quant import rotation
from dllm_studio.quant.transforms import InputTransform

# 2^6; Paley I 12 (q = 11); Paley II 28 (q = 13) and 148 (q = 73); 352 = 44·8 (Paley I, q = 43)
HADAMARD_SIZES = [64, 12 * 16, 28 * 4, 148 * 2, 352]
FALLBACK = 184  # 23·8: neither 92 nor 184 is a Paley order, so the odd part 23 gets a random rotation


def planted_outliers(tokens: int, n: int, channels: list[int], seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g)
    x[:, channels] *= torch.linspace(50, 100, len(channels))
    return x


def block_peak(x: torch.Tensor, block: int) -> torch.Tensor:
    return x.abs().reshape(x.shape[0], -1, block).amax((0, 2))


@pytest.mark.parametrize("n", HADAMARD_SIZES + [FALLBACK])
def test_hadamard_matrix_is_orthonormal(n):
    h = rotation.hadamard_matrix(n)
    assert h.shape == (n, n) and h.dtype == torch.float32
    torch.testing.assert_close(h @ h.T, torch.eye(n), atol=1e-5, rtol=0)


@pytest.mark.parametrize("n", HADAMARD_SIZES)
def test_hadamard_sizes_have_exact_sign_entries(n):
    assert rotation.is_hadamard(n)
    factor = rotation.hadamard_factor(n)
    assert set(factor.unique().tolist()) <= {-1.0, 1.0}
    torch.testing.assert_close(factor @ factor.T, factor.shape[0] * torch.eye(factor.shape[0]), atol=0, rtol=0)
    assert torch.equal(rotation.hadamard_matrix(n).abs(), torch.full((n, n), 1 / math.sqrt(n)))


def test_factor_orders_of_the_model_sizes():
    orders = {n: rotation.hadamard_factor(n).shape[0] for n in (4096, 12288, 3584, 18944, 352, FALLBACK)}
    assert orders == {4096: 1, 12288: 12, 3584: 28, 18944: 148, 352: 44, FALLBACK: 23}


def test_fallback_is_a_fixed_scaled_rotation_not_a_hadamard():
    assert not rotation.is_hadamard(FALLBACK)
    factor = rotation.hadamard_factor(FALLBACK)
    torch.testing.assert_close(factor @ factor.T, 23 * torch.eye(23), atol=1e-4, rtol=0)
    assert not set(factor.unique().tolist()) <= {-1.0, 1.0}
    rotation._factor.cache_clear()  # rebuilt from the seed, not remembered
    assert torch.equal(rotation.hadamard_factor(FALLBACK), factor)


def test_factor_is_returned_as_a_copy():
    rotation.hadamard_factor(12).zero_()
    assert rotation.hadamard_factor(12).abs().min() == 1


@pytest.mark.parametrize("n", HADAMARD_SIZES + [FALLBACK])
def test_hadamard_transform_matches_the_dense_matrix(n):
    x = torch.randn(2, 3, n, generator=torch.Generator().manual_seed(n))
    y = rotation.hadamard_transform(x, rotation.hadamard_factor(n))
    assert y.shape == x.shape
    torch.testing.assert_close(y, x @ rotation.hadamard_matrix(n), atol=1e-5, rtol=1e-5)


def test_hadamard_transform_bf16_and_autograd():
    n = 192
    x = torch.randn(4, n, generator=torch.Generator().manual_seed(1))
    expected = x @ rotation.hadamard_matrix(n)
    y = rotation.hadamard_transform(x.bfloat16(), rotation.hadamard_factor(n))
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), expected, atol=0.05, rtol=0.02)
    tracked = x.clone().requires_grad_()
    rotation.hadamard_transform(tracked, rotation.hadamard_factor(n)).square().sum().backward()
    torch.testing.assert_close(tracked.grad, 2 * x, atol=1e-5, rtol=1e-5)  # orthogonal: |xH|² = |x|²


def test_hadamard_transform_rejects_a_factor_that_does_not_fit():
    with pytest.raises(QuantizationError, match="order 12"):
        rotation.hadamard_transform(torch.randn(2, 100), rotation.hadamard_factor(12))


def test_random_hadamard_signs_the_rows():
    n = 192
    q = rotation.random_hadamard(n, torch.Generator().manual_seed(3))
    torch.testing.assert_close(q @ q.T, torch.eye(n), atol=1e-5, rtol=0)
    signs = q[:, 0] / rotation.hadamard_matrix(n)[:, 0]
    assert set(signs.round().tolist()) == {-1.0, 1.0}
    assert torch.equal(q, signs[:, None] * rotation.hadamard_matrix(n))
    assert torch.equal(q, rotation.random_hadamard(n, torch.Generator().manual_seed(3)))


def test_block_rotate_equals_the_dense_block_diagonal():
    g = torch.Generator().manual_seed(0)
    blocks = torch.linalg.qr(torch.randn(3, 16, 16, generator=g)).Q
    x = torch.randn(2, 5, 48, generator=g)
    torch.testing.assert_close(rotation.block_rotate(x, blocks), x @ torch.block_diag(*blocks), atol=1e-5, rtol=1e-5)
    with pytest.raises(QuantizationError, match="3 rotation blocks of 16"):
        rotation.block_rotate(torch.randn(2, 40), blocks)


def test_greedy_step_spreads_channel_zero_evenly():
    b = 32
    h = rotation._helmert(b)
    torch.testing.assert_close(h @ h.T, torch.eye(b, dtype=torch.float64))
    assert torch.equal(h[0], torch.full((b,), 1 / math.sqrt(b), dtype=torch.float64))
    spread = torch.zeros(b, dtype=torch.float64)
    spread[0] = 1
    assert torch.equal(spread @ h, h[0])  # an outlier moved to channel 0 lands on every channel alike


def test_greedy_rotation_spreads_planted_outliers():
    block = 32
    x = planted_outliers(64, 128, [3, 40, 100])  # one outlier in each of blocks 0, 1, 3
    rot = rotation.greedy_rotation(x.abs().amax(0), block=block, steps=64, sample=x)
    assert rot.shape == (4, block, block) and rot.dtype == torch.float32
    torch.testing.assert_close(rot @ rot.transpose(1, 2), torch.eye(block).expand(4, block, block), atol=1e-5, rtol=0)
    before, after = block_peak(x, block), block_peak(rotation.block_rotate(x, rot), block)
    outlier_blocks = [0, 1, 3]
    assert (after[outlier_blocks] < 0.3 * before[outlier_blocks]).all()
    assert after[2] <= before[2]  # the identity is a candidate prefix: a block never gets a higher peak


def test_greedy_rotation_from_the_magnitude_vector_alone():
    absmax = planted_outliers(64, 64, [5]).abs().amax(0)
    rot = rotation.greedy_rotation(absmax, block=64, steps=16)
    assert rotation.block_rotate(absmax, rot).abs().max() < 0.3 * absmax.max()


def test_greedy_rotation_is_deterministic_and_checks_the_block():
    x = planted_outliers(16, 64, [7])
    a = rotation.greedy_rotation(x.abs().amax(0), block=16, steps=8, sample=x)
    assert torch.equal(a, rotation.greedy_rotation(x.abs().amax(0), block=16, steps=8, sample=x))
    with pytest.raises(ValueError, match="blocks of 24"):
        rotation.greedy_rotation(torch.ones(64), block=24)


def test_zigzag_permutation_balances_the_blocks():
    block = 16
    absmax = planted_outliers(32, 128, [1, 2, 3, 4, 5, 6]).abs().amax(0)
    perm = rotation.zigzag_permutation(absmax, block)
    assert perm.dtype == torch.int64 and torch.equal(perm.sort().values, torch.arange(128))
    ranked = absmax.sort(descending=True).values
    top = absmax > absmax.median() * 10

    def worst_block(values, mask):
        return (values * mask).reshape(-1, block).sum(1).max()

    order = absmax.argsort(descending=True)
    assert worst_block(absmax[perm], top[perm]) < worst_block(ranked, top[order])
    # zigzag: ranks 0..7 go to blocks 0..7, ranks 8..15 to blocks 7..0, each block sorted largest first
    assert perm[0] == order[0] and perm[7 * block] == order[7] and perm[7 * block + 1] == order[8]
    assert perm[1] == order[15] and perm[2] == order[16]


def test_duquant_transform_is_exact_on_the_layer():
    g = torch.Generator().manual_seed(0)
    x = planted_outliers(48, 256, [2, 30, 31])  # two outliers share block 0: one rotation cannot spread both
    w = torch.randn(24, 256, generator=g)
    rotation1, perm, rotation2 = rotation.duquant(x, block=64, steps=64)
    t = InputTransform(256, rotation1=rotation1, perm=perm, rotation2=rotation2)
    expected = x @ w.T
    torch.testing.assert_close(t(x) @ t.weight(w).T, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)
    torch.testing.assert_close(t(x), rotation.block_rotate(rotation.block_rotate(x, rotation1)[:, perm], rotation2))
    greedy_only = rotation.block_rotate(x, rotation.greedy_rotation(x.abs().amax(0), 64, 64, sample=x))
    assert t(x).abs().max() < 0.3 * x.abs().max()
    assert t(x).abs().max() < 0.8 * greedy_only.abs().max()  # the permutation and second rotation earn their keep


@pytest.mark.parametrize("n", [352, 192, FALLBACK])
def test_hadamard_input_transform_is_exact_on_the_layer(n):
    g = torch.Generator().manual_seed(n)
    x, w = torch.randn(8, n, generator=g), torch.randn(16, n, generator=g)
    t = InputTransform(n, hadamard=rotation.hadamard_factor(n))
    expected = x @ w.T
    torch.testing.assert_close(t(x) @ t.weight(w).T, expected, atol=1e-4 * expected.abs().max().item(), rtol=1e-4)


def test_fluctuation_is_the_rms():
    x = torch.tensor([[3.0, -4.0], [0.0, 0.0]])
    assert rotation.fluctuation(x) == pytest.approx(2.5)


def test_kurtosis_of_rms_is_the_profile_statistic():
    x = planted_outliers(32, 64, [9])
    s2 = x.double().pow(2).mean(0)
    assert rotation.kurtosis_of_rms(x) == pytest.approx(float(s2.pow(2).mean() / s2.mean() ** 2), rel=1e-9)
    stats = InputStats(64)
    stats.add(x)
    assert rotation.kurtosis_of_rms(x) == stats.kurtosis()
    assert rotation.kurtosis_of_rms(torch.ones(4, 64)) == pytest.approx(1.0)
