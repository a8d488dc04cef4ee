"""Cancel inside the long searches and solvers, not only between layers: each stops at its next check and the
loaded model is left bit for bit as it was."""

import threading

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.errors import Cancelled
from dllm_studio.events import CancelToken, LayerQuantized
from dllm_studio.quant import awq, capture, pipeline, rotation, twin_log
from dllm_studio.quant.calibration import calibration_batch
from dllm_studio.quant.gptq import BLOCK, Hessian, gptq
from dllm_studio.quant.grid import Grid, rtn
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe

FAST = dict(group_size=32, calib_samples=8, seq_len=64)


class CancelAt(CancelToken):
    """Cancels itself on its k-th check, as if the user pressed Cancel just then."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k, self.checks = k, 0

    def check(self) -> None:
        self.checks += 1
        if self.checks == self.k:
            self.cancel()
        super().check()


class CountingGrid(Grid):
    """A grid that counts the columns (or groups) it is asked to round."""

    calls = 0

    def quantize(self, w, scale, zero):
        CountingGrid.calls += 1
        return super().quantize(w, scale, zero)


def _state(model):
    return {k: v.clone() for k, v in model.module.state_dict().items()}


def _unchanged(model, before) -> bool:
    after = model.module.state_dict()
    return after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)


def _run_until_cancelled(model, recipe, cancel):
    seen = []
    with pytest.raises(Cancelled):
        jobs.run(quantize(model, recipe, cancel), seen.append)
    return seen


def test_awq_scale_search_stops_inside_its_alpha_grid(llada, monkeypatch):
    before, cancel, candidates = _state(llada), CancelToken(), []
    real = awq.fake_quant

    def candidate(w, grid, group_size):  # one alpha candidate's rounding of one weight
        candidates.append(w.shape)
        if len(candidates) == 2:
            cancel.cancel()  # pressed while the first candidate prices k
        return real(w, grid, group_size)

    monkeypatch.setattr(awq, "fake_quant", candidate)
    seen = _run_until_cancelled(llada, QuantRecipe(method="awq", wbits=4, **FAST), cancel)
    # The first stage's search prices q, k and v for each of 20 alphas: it stopped inside the first, before v.
    assert len(candidates) == 2 and len(awq.ALPHAS) == 20
    assert not any(isinstance(e, LayerQuantized) for e in seen)
    assert _unchanged(llada, before)


def test_awq_clip_search_checks_per_shrink():
    x, w = torch.randn(64, 32), torch.randn(8, 32)
    CountingGrid.calls = 0
    with pytest.raises(Cancelled):
        awq.search_clip(x, w, CountingGrid(4), None, cancel=CancelAt(4))
    assert CountingGrid.calls == 3  # three of the ten shrinks of the only group, then the fourth check stopped it
    CountingGrid.calls = 0
    awq.search_clip(x, w, CountingGrid(4), None, cancel=CancelToken())
    assert CountingGrid.calls == len(awq.CLIP_SHRINKS)


def test_gptq_stops_between_its_column_blocks():
    x, w = torch.randn(1024, 4 * BLOCK), torch.randn(16, 4 * BLOCK)
    h = Hessian(w.shape[1])
    h.add(x)
    cancel = CancelToken()

    class PressingGrid(CountingGrid):  # Cancel pressed while the sweep rounds the third column of block 1
        def quantize(self, w, scale, zero):
            if CountingGrid.calls == BLOCK + 2:
                cancel.cancel()
            return super().quantize(w, scale, zero)

    CountingGrid.calls = 0
    with pytest.raises(Cancelled):
        gptq(w, h.H, PressingGrid(4), 128, cancel=cancel)
    assert CountingGrid.calls == 2 * BLOCK  # block 1 finished its columns, block 2 of 4 never started
    baseline = gptq(w, h.H, Grid(4), 128)
    again = gptq(w, h.H, Grid(4), 128, cancel=CancelToken())  # checking does not change a single code
    assert all(torch.equal(a, b) for a, b in zip(baseline[:3], again[:3]))


def test_the_pipeline_hands_its_token_to_gptq(llada, monkeypatch):
    import dllm_studio.quant.methods.gptq as method

    before, cancel, tokens = _state(llada), CancelToken(), []

    def solver(*args, **kwargs):
        tokens.append(kwargs["cancel"])
        cancel.cancel()  # pressed as the first layer's solver starts
        return gptq(*args, **kwargs)

    monkeypatch.setattr(method, "gptq", solver)
    seen = _run_until_cancelled(llada, QuantRecipe(method="gptq", wbits=4, **FAST), cancel)
    assert tokens == [cancel]  # one solver started, and stopped before its factorization
    assert not any(isinstance(e, LayerQuantized) for e in seen)
    assert _unchanged(llada, before)


def test_calibration_collect_stops_inside_a_batch(llada):
    block = llada.blocks()[0]
    ids, masked = calibration_batch(llada, QuantRecipe(method="gptq", calib_samples=24, seq_len=32))
    states, masks = capture.block_inputs(llada.module, block, ids), list(masked.split(capture.BATCH))
    batches, downs = [], []
    handles = [block.register_forward_pre_hook(lambda m, args: batches.append(1)),
               block.get_submodule("ff_out").register_forward_pre_hook(lambda m, args: downs.append(1))]
    with torch.no_grad(), pytest.raises(Cancelled):
        capture.collect(block, ["q_proj", "ff_out"], states, masks, hessian=True, cancel=CancelAt(2))
    for h in handles:
        h.remove()
    assert len(states) > 1 and batches == [1] and downs == []  # stopped in the first batch, before its MLP
    assert all(not m._forward_pre_hooks for m in block.modules())  # every hook it added is gone


def test_duquant_w4a4_stops_inside_its_rotation_search(llada, monkeypatch):
    before, cancel, rotations = _state(llada), CancelToken(), []
    real_greedy, real_zigzag = rotation.greedy_rotation, rotation.zigzag_permutation

    def greedy(*args, **kwargs):
        rotations.append("started")
        result = real_greedy(*args, **kwargs)
        rotations.append("finished")
        return result

    def zigzag(*args, **kwargs):  # runs between the two greedy rotations of the first input
        cancel.cancel()
        return real_zigzag(*args, **kwargs)

    monkeypatch.setattr(rotation, "greedy_rotation", greedy)
    monkeypatch.setattr(rotation, "zigzag_permutation", zigzag)
    seen = _run_until_cancelled(llada, QuantRecipe(method="duquant", wbits=4, abits=4, calib_samples=8, seq_len=64), cancel)
    assert rotations == ["started", "finished", "started"]  # the second rotation's 256 steps stopped at the first
    assert not any(isinstance(e, LayerQuantized) for e in seen)
    assert _unchanged(llada, before)


def test_twin_log_checks_per_chunk_of_rows_and_between_the_sides_of_its_search(monkeypatch):
    monkeypatch.setattr(twin_log, "CHUNK_ELEMENTS", 4 * 64)  # four rows of 64 a chunk
    searched, real = [], twin_log._Side.errors
    monkeypatch.setattr(twin_log._Side, "errors", lambda side, *a: (searched.append(side.sorted.shape[0]),
                                                                    real(side, *a))[1])
    with pytest.raises(Cancelled):  # checks: chunk 1, its two sides, chunk 2, its first side, then the second's
        twin_log.twin_log(torch.randn(16, 64), 4, cancel=CancelAt(6))
    assert searched == [4, 4, 4]  # the first chunk's two sides, the second's first: its other side never started


def test_the_error_report_checks_per_chunk_of_work_not_of_a_fixed_token_count(monkeypatch):
    linear = torch.nn.Linear(64, 32, bias=False)
    qlinear = QuantLinear.from_codes(*rtn(linear.weight.detach(), Grid(4), 32), 4, 32)
    x = torch.randn(100, 64)
    whole = pipeline._relative_error(linear, qlinear, x, rows=100)
    monkeypatch.setattr(pipeline, "ERROR_MADDS", 2 * 64 * 32 * 10)  # ten tokens' two products a chunk
    counting = CancelAt(0)
    assert pipeline._relative_error(linear, qlinear, x, cancel=counting) == pytest.approx(whole, rel=1e-5)
    assert counting.checks == 10
    with pytest.raises(Cancelled):
        pipeline._relative_error(linear, qlinear, x, cancel=CancelAt(4))


@pytest.mark.gui
def test_escape_cancels_a_running_quantization_and_frees_the_pages(qtbot, studio_settings, monkeypatch):
    from PySide6.QtCore import Qt

    from ui.app import create_window

    w = create_window("demo", studio_settings)
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: w.session.model is not None and not w.session.busy, timeout=30_000)
    inside, released, candidates = threading.Event(), threading.Event(), []
    real = awq.fake_quant

    def candidate(*args):  # the first alpha candidate waits until Esc was pressed (the demo searches too fast)
        candidates.append(1)
        inside.set()
        assert released.wait(30)
        return real(*args)

    monkeypatch.setattr(awq, "fake_quant", candidate)
    page = w.quantize
    w.show_page("quantize")
    page.samples.setValue(4)
    page.seq_len.setValue(64)
    page.method.setCurrentIndex(page.method.findData("awq"))
    try:
        page.start_button.click()
        qtbot.waitUntil(inside.is_set, timeout=30_000)
        assert w.stop_action.isEnabled() and not w.models.demo_button.isEnabled()
        with qtbot.waitActive(w):
            w.activateWindow()
        with qtbot.waitSignal(w.session.busy_changed, timeout=10_000, check_params_cb=lambda busy, _t: not busy):
            qtbot.keyClick(w, Qt.Key.Key_Escape)
            assert page.job.token.cancelled
            released.set()
    finally:
        released.set()
        w.session.shutdown()
    assert candidates == [1]  # the search stopped at the candidate Esc interrupted, not after the block
    assert w.session.variants == {} and page.progress.text().startswith("cancelled")
    assert page.start_button.isEnabled() and w.models.demo_button.isEnabled() and not w.stop_action.isEnabled()


@pytest.mark.parametrize("streaming", ["off", "on"])
def test_ctrl_c_during_a_cli_quantization_says_what_it_left(llada_dir, tmp_path, monkeypatch, capsys, streaming):
    from dllm_studio.cli import main

    def interrupted(*args):  # Ctrl-C lands inside AWQ's first scale search
        raise KeyboardInterrupt

    monkeypatch.setattr(awq, "fake_quant", interrupted)
    out = tmp_path / "w4"
    code = main(["quantize", str(llada_dir), "--method", "awq", "--wbits", "4", "--group-size", "32",
                 "--calib-samples", "4", "--seq-len", "32", "--out", str(out), "--streaming", streaming])
    err = capsys.readouterr().err
    partial = tmp_path / ".w4.partial"
    assert code == 130 and not out.exists()
    if streaming == "on":  # the resumable folder stays for a rerun
        assert partial.is_dir() and f"interrupted: the finished blocks are kept in {partial}: run the same " \
                                    "command again to resume." in err
    else:
        assert not partial.exists() and "interrupted: nothing was quantized or written." in err


def test_the_program_leaves_at_once_after_ctrl_c_and_normally_otherwise(monkeypatch):
    from dllm_studio import cli

    left = []
    monkeypatch.setattr(cli.os, "_exit", lambda status: left.append(status))
    monkeypatch.setattr(cli, "main", lambda: 130)
    with pytest.raises(SystemExit):  # were os._exit the real one, nothing after it would run
        cli.entry()
    assert left == [130]  # without Python's shutdown, which takes 1-2 s with torch loaded
    monkeypatch.setattr(cli, "main", lambda: 0)
    with pytest.raises(SystemExit) as finished:
        cli.entry()
    assert finished.value.code == 0 and left == [130]  # a finished run shuts down as usual


def test_round_to_nearest_by_rows_is_one_call_and_stops_between_chunks(llada, monkeypatch):
    from dllm_studio.quant.grid import rtn
    from dllm_studio.quant.methods import base
    from dllm_studio.quant.methods.rtn import RTN

    monkeypatch.setattr(base, "ROUND_ELEMENTS", 24 * 64)
    recipe = QuantRecipe(method="rtn", wbits=4, group_size=32)
    w = torch.randn(100, 64)
    whole = rtn(w, Grid(4), 32)
    by_rows = RTN(llada, recipe).round_to_nearest(w)  # five chunks of rows
    assert all(torch.equal(a, b) for a, b in zip(whole, by_rows))
    with pytest.raises(Cancelled):
        RTN(llada, recipe, CancelAt(3)).round_to_nearest(w)


def test_quarot_rotates_the_embedding_and_head_by_rows_with_checks(llada, monkeypatch):
    from dllm_studio.quant.methods import quarot

    before = _state(llada)
    recipe = QuantRecipe(method="quarot", wbits=4, abits=4)
    Q = quarot.QuaRot(llada, recipe).Q
    whole = quarot.rotate_outside(llada, Q)
    monkeypatch.setattr(quarot, "OUTSIDE_ROWS", 7)
    by_rows = quarot.rotate_outside(llada, Q, CancelToken())
    assert all(torch.allclose(whole[n].weight, by_rows[n].weight, rtol=0, atol=1e-6) for n in whole)
    token = CancelAt(3)
    with pytest.raises(Cancelled):
        quarot.rotate_outside(llada, Q, token)
    assert token.checks == 3 and _unchanged(llada, before)  # stopped in the embedding's third chunk of rows


def test_awq_searches_by_slices_of_rows_choose_what_one_slice_does(monkeypatch):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(64, 32, generator=g) * torch.linspace(0.2, 4, 32)
    weights = [torch.randn(40, 32, generator=g), torch.randn(24, 32, generator=g)]
    monkeypatch.setattr(awq, "CHUNK_MACS", 10 ** 12)
    whole = awq.search_scale(x, weights, Grid(3), 16)
    monkeypatch.setattr(awq, "CHUNK_MACS", 64 * 32 * 7)  # slices of 7 rows, each rounded on its own
    assert torch.equal(awq.search_scale(x, weights, Grid(3), 16), whole)
    assert not torch.equal(whole, torch.ones(32))  # a real choice among the alphas, not the identity
