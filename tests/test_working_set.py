"""A block's working set while quantizing: 16-bit input samples shared by the linears that read one input,
and a GPTQ solver that factors a handed-over Hessian in place yet rounds exactly as the textbook sweep."""

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.quant import capture
from dllm_studio.quant.calibration import calibration_batch
from dllm_studio.quant.capture import Sample, block_inputs, collect
from dllm_studio.quant.gptq import Hessian, gptq, _inverse_cholesky, _pack_upper, _unpack_symmetric
from dllm_studio.quant.grid import Grid
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.recipe import QuantRecipe

FAST = dict(group_size=32, calib_samples=8, seq_len=64)
LINEARS = ["attn_out", "ff_out", "ff_proj", "k_proj", "q_proj", "up_proj", "v_proj"]


def _taps(model):
    ids, masked = calibration_batch(model, QuantRecipe(method="gptq", **FAST))
    block = model.blocks()[0]
    seen = {}  # every linear's inputs at full precision, gathered apart from the taps
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda m, args, n=n: seen.setdefault(n, []).append(args[0].reshape(-1, args[0].shape[-1]).clone()))
        for n in LINEARS]
    with torch.no_grad():
        taps = collect(block, LINEARS, block_inputs(model.module, block, ids), list(masked.split(capture.BATCH)))
    for h in handles:
        h.remove()
    return taps, {n: torch.cat(xs) for n, xs in seen.items()}


def test_linears_reading_one_input_share_one_sample_kept_in_bf16(llada):
    taps, seen = _taps(llada)  # the tiny LLaDA runs at float32
    q, k, v = (taps[n].sample for n in ("q_proj", "k_proj", "v_proj"))
    assert q is k is v and taps["ff_proj"].sample is taps["up_proj"].sample
    assert len({id(taps[n].sample) for n in LINEARS}) == 4  # qkv, o, gate/up, down
    assert q.count == 8 * 64 and [r.data_ptr() for r in k.rows] == [r.data_ptr() for r in q.rows]
    for name in LINEARS:
        assert {r.dtype for r in taps[name].sample.rows} == {torch.bfloat16}
        assert torch.equal(taps[name].inputs(), seen[name].to(torch.bfloat16).float())
        assert taps[name].inputs().dtype == torch.float32 and taps[name].inputs(None).dtype == torch.bfloat16
        assert taps[name].sample.source is None  # released: the last batch is not kept alive


def test_a_sample_adds_a_tensor_once_and_keeps_16_bit_inputs_as_they_are():
    x = torch.randn(2, 5, 8, dtype=torch.float16)
    s = Sample()
    s.add(x)
    s.add(x)  # a second reader of the same tensor
    s.add(x.view(10, 8))  # the same memory, another shape: another input
    s.add(x.clone())  # equal values, other memory: another batch
    assert s.count == 30 and s.rows[0].dtype == torch.float16
    assert torch.equal(s.tensor(None), torch.cat([x.reshape(10, 8)] * 3))


def test_a_sample_stops_at_sample_tokens(monkeypatch):
    monkeypatch.setattr(capture, "SAMPLE_TOKENS", 12)
    s = Sample()
    for _ in range(3):
        s.add(torch.randn(5, 4))
    assert s.count == 12 and [r.shape[0] for r in s.rows] == [5, 5, 2]


def _reference_gptq(w, H, grid, size, damp=0.01, act_order=False):
    """The sweep as the reference implementation writes it: full copies, an identity for the dampening."""
    W, H = w.float().clone(), H.clone()
    n = W.shape[1]
    size = size or n
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    mean = torch.mean(torch.diag(H))
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + damp * 10 ** attempt * mean * torch.eye(n))
        if info == 0:
            U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
            if info == 0:
                break
    Q, scales, zeros = torch.zeros_like(W), [], []
    for i1 in range(0, n, 128):
        i2 = min(i1 + 128, n)
        W1, Err, U1 = W[:, i1:i2].clone(), torch.zeros(W.shape[0], i2 - i1), U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            if (i1 + i) % size == 0:
                scale, zero = grid.params(torch.cat([W1[:, i:], W[:, i2:]], dim=1)[:, :size])
                scales.append(scale)
                zeros.append(zero)
            Q[:, i1 + i] = grid.quantize(W1[:, i:i + 1], scale, zero)[:, 0]
            err = (W1[:, i] - (Q[:, i1 + i] - zero) * scale) / U1[i, i]
            W1[:, i:] -= err[:, None] * U1[i, i:][None, :]
            Err[:, i] = err
        W[:, i2:] -= Err @ U[i1:i2, i2:]
    if perm is not None:
        Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.uint8), torch.stack(scales, 1), torch.stack(zeros, 1)


def _hessian(n, tokens, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, n, generator=g) * torch.linspace(0.1, 3.0, n)
    x[:, 7] = 0  # a dead input
    h = Hessian(n)
    h.add(x)
    return h.H


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("size", [32, 128, None])
def test_gptq_rounds_exactly_as_the_reference_with_and_without_consuming_h(size, act_order):
    w = torch.randn(40, 320, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    H = _hessian(320, 600, 2)
    expected = _reference_gptq(w, H, Grid(4), size, act_order=act_order)
    kept = H.clone()
    q, scales, zeros, g_idx = gptq(w, H, Grid(4), size, act_order=act_order)
    assert torch.equal(H, kept)  # without consume, the caller's H is left as it was
    consumed = gptq(w, H, Grid(4), size, act_order=act_order, consume=True)
    for got in ((q, scales, zeros), consumed[:3]):
        assert got[0].dtype == torch.uint8 and torch.equal(got[0], expected[0])
        torch.testing.assert_close(got[1], expected[1], rtol=1e-6, atol=0)
        torch.testing.assert_close(got[2], expected[2], rtol=1e-6, atol=0)
    assert (g_idx is None) == (not act_order)


def test_gptq_dampens_an_indefinite_h_harder_exactly_as_the_reference():
    H = _hessian(128, 64, 3)  # rank 63 of 128
    H -= 0.05 * torch.diag(H).mean() * torch.eye(128)  # the first dampening (1 %) cannot make it definite
    H[7, 7] = 0  # still a dead input
    assert torch.linalg.cholesky_ex(H + 0.01 * torch.diag(H).mean() * torch.eye(128))[1] != 0
    w = torch.randn(24, 128, generator=torch.Generator().manual_seed(4))
    expected = _reference_gptq(w, H, Grid(3, symmetric=True), 64, act_order=True)
    q, scales, zeros, _ = gptq(w, H, Grid(3, symmetric=True), 64, act_order=True, consume=True)
    assert torch.equal(q, expected[0])
    torch.testing.assert_close((scales, zeros), expected[1:], rtol=1e-6, atol=0)


def test_a_taken_hessian_is_handed_over():
    h = Hessian(4)
    h.add(torch.ones(3, 4))
    H = h.take()
    assert h.H is None and torch.allclose(H, torch.full((4, 4), 2.0))


def test_hessian_of_a_bf16_batch_in_chunks_is_the_float_one(monkeypatch):
    monkeypatch.setattr("dllm_studio.quant.gptq.CHUNK", 16)
    x = torch.randn(3, 20, 24).to(torch.bfloat16)
    h = Hessian(24)
    h.add(x)
    torch.testing.assert_close(h.H, 2 / 60 * x.reshape(60, 24).float().T @ x.reshape(60, 24).float())


def test_relative_errors_from_bf16_samples_match_fp32_samples(llada, monkeypatch):
    recipe = QuantRecipe(method="gptq", wbits=4, **FAST)
    errors = {r["name"]: r["relative_error"] for r in jobs.run(quantize(llada, recipe)).layers}
    monkeypatch.setattr(capture, "SAMPLE_DTYPE", torch.float32)  # the samples as they were kept before
    full = {r["name"]: r["relative_error"] for r in jobs.run(quantize(llada, recipe)).layers}
    assert errors.keys() == full.keys() and len(errors) == 14
    for name, error in errors.items():
        assert error == pytest.approx(full[name], rel=1e-3), name


def test_the_solver_factors_h_in_its_own_storage_after_a_failed_attempt_too():
    H = _hessian(96, 40, 5)  # rank 39: the first dampening may fail, the retry starts from H restored
    H -= 0.05 * torch.diag(H).mean() * torch.eye(96)
    H[7, 7] = 1
    expected = _inverse_cholesky(H.clone().contiguous(), 0.01)
    reference = None
    mean = torch.diag(H).mean()
    for attempt in range(6):
        L, info = torch.linalg.cholesky_ex(H + 0.01 * 10 ** attempt * mean * torch.eye(96))
        if info == 0:
            reference = torch.linalg.cholesky(torch.cholesky_inverse(L), upper=True)
            break
    assert attempt > 0  # the restore path ran
    factor = _inverse_cholesky(H, 0.01)
    assert factor.data_ptr() == H.data_ptr()  # no second n x n matrix
    assert torch.equal(factor, reference) and torch.equal(factor, expected)


def test_packing_the_upper_triangle_restores_a_symmetric_matrix():
    H = torch.randn(300, 300)
    H = H + H.T
    packed = _pack_upper(H)
    assert packed.numel() == 300 * 299 // 2
    scrambled = H.clone().tril_(-1).mul_(5) + torch.diag(H.diagonal())
    _unpack_symmetric(packed, scrambled, tile=64)
    assert torch.equal(scrambled, H)
