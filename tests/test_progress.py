"""Progress in work, not counts: the ETA of uneven units, the engine's fractions on real runs, the bar between events."""

from __future__ import annotations

import json
import random
from dataclasses import dataclass

import pytest

from checkpoints import make_llada
from dllm_studio import jobs
from dllm_studio.errors import Cancelled
from dllm_studio.events import BlockQuantized, CancelToken, LayerQuantized, Progress
from dllm_studio.models import load_model
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.gptq import solver_cost
from dllm_studio.quant.progress import Unit, WorkMeter, error_report_cost, forward_cost
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.streaming import quantize_to_folder

# LLaDA-8B's block (d_model 4096, MLP 12288) and GPTQ's stages.
D, MLP = 4096, 12288
SHAPES = {"q": (D, D), "k": (D, D), "v": (D, D), "o": (D, D), "gate": (D, MLP), "up": (D, MLP), "down": (MLP, D)}
STAGES = (("q", "k", "v"), ("o",), ("gate", "up"), ("down",))
PARAMS = sum(i * o for i, o in SHAPES.values())


@dataclass(frozen=True)
class Measured:
    """What a GPTQ run of that block took: calibration (sequences x length, sampled rows), seconds per layer role
    and for the first calibration pass."""
    samples: int
    seq_len: int
    rows: int
    layer_seconds: dict
    pass_seconds: float


# The issue's: 64 x 512 tokens, attention layers about 8 s, MLP layers 22-66 s, a pass about 17 s.
ISSUE = Measured(64, 512, 4096, {"q": 8, "k": 8, "v": 8, "o": 8, "gate": 22, "up": 22, "down": 66}, 17)
# This project's 2-core AVX2 machine, one thread, 8 x 128 (benchmarks/bench_eta.py's short calibration):
# the rounding dominates and a down projection takes 8 q projections.
SHORT = Measured(8, 128, 1024, {"q": 12.2, "k": 12.2, "v": 12.2, "o": 11.7, "gate": 33.3, "up": 33.3,
                                "down": 98.7}, 14.7)


def llada_8b_units(blocks: int, run: Measured = ISSUE) -> list[Unit]:
    tokens = run.samples * run.seq_len
    units = []
    for b in range(blocks):
        for stage in STAGES:
            hessians = [SHAPES[r][0] for r in stage]
            units.append(Unit((b, stage), "forward", "/".join(stage),
                              forward_cost(tokens, PARAMS, run.seq_len, D, hessians),
                              f"block {b + 1}: calibrating {'/'.join(stage)}"))
            units += [Unit((b, r), "round", r, solver_cost(*SHAPES[r]) + error_report_cost(*SHAPES[r], run.rows),
                           f"block {b + 1}: rounding {r}") for r in stage]
        units.append(Unit((b, "output"), "forward", "output", forward_cost(tokens, PARAMS, run.seq_len, D),
                          "next inputs"))
    return units


def true_seconds(units: list[Unit], seed: int, run: Measured = ISSUE) -> list[float]:
    """Each unit's time: the measured seconds of its layer role (every pass at the first one's rate), times
    ±15 % noise."""
    rng = random.Random(seed)
    first_pass = units[0].cost
    return [(run.layer_seconds[u.role] if u.kind == "round" else u.cost * run.pass_seconds / first_pass)
            * rng.uniform(0.85, 1.15) for u in units]


def worst_eta_error(points: list[tuple[float, float]], total: float) -> float:
    """The largest |ETA - true time left| / true time left over the (time, ETA) points after 10 % of the run."""
    late = [(t, eta) for t, eta in points if t >= 0.1 * total and total - t > 0]
    assert len(late) >= 8  # enough points to judge
    return max(abs(eta - (total - t)) / (total - t) for t, eta in late)


def simulate(blocks: int, seed: int, run: Measured = ISSUE):
    """Run the meter over the uneven units on a fake clock: ((time, ETA) at every report, the counting ETA the
    old `_Progress` gave at each layer, the fractions, the total time)."""
    units = llada_8b_units(blocks, run)
    seconds = true_seconds(units, seed, run)
    now = [0.0]
    meter = WorkMeter(units, clock=lambda: now[0])
    ours, counting, fractions = [], [], []
    layers = sum(u.kind == "round" for u in units)
    done = 0
    for unit, spent in zip(units, seconds):
        started = meter.start(unit.key)
        now[0] += spent
        finished = meter.finish(unit.key)
        ours += [(now[0] - spent, started.eta_s), (now[0], finished.eta_s)]
        fractions += [started.fraction, finished.fraction]
        if unit.kind == "round":  # the old count average: elapsed per layer so far, times layers left
            done += 1
            counting.append((now[0], now[0] / done * (layers - done)))
    return [p for p in ours if p[1] is not None], counting, fractions, sum(seconds)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("blocks", [2, 32])
@pytest.mark.parametrize("run", [ISSUE, SHORT], ids=["issue-64x512", "short-8x128"])
def test_eta_is_within_30_percent_after_a_tenth_of_the_run(blocks, seed, run):
    ours, _, fractions, total = simulate(blocks, seed, run)
    assert worst_eta_error(ours, total) <= 0.30
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and ours[-1] == (pytest.approx(total), 0.0)


def test_averaging_layers_would_fail_the_same_check():
    """The issue's two blocks: the count average misses the calibration passes and the slow MLP layers (at layer
    4 of 14 it said 146 s for 385), and not only at the end."""
    ours, counting, _, total = simulate(2, seed=0)
    before_the_end = [(t, eta) for t, eta in counting if t <= 0.8 * total]
    assert worst_eta_error(before_the_end, total) > 0.5 and worst_eta_error(ours, total) < 0.3


def test_unseen_roles_borrow_the_rate_of_their_kind_then_of_everything():
    units = [Unit("a", "round", "q", 10.0, "a"), Unit("b", "round", "down", 40.0, "b"),
             Unit("c", "forward", "output", 100.0, "c")]
    now = [0.0]
    meter = WorkMeter(units, clock=lambda: now[0])
    assert meter.start("a").eta_s is None and meter.rate("round", "q") is None
    now[0] = 5.0
    assert meter.finish("a").eta_s == 0.5 * 40 + 0.5 * 100  # 0.5 s a unit of cost, for every kind so far
    meter.start("b")
    now[0] = 25.0  # down ran at 0.5 s a unit as well; the forward still borrows the rounding rate
    assert meter.finish("b").eta_s == 50.0 and meter.rate("forward", "output") == 25.0 / 50.0
    assert meter.rate("round", "down") == 0.5 and meter.count("round") == (2, 2)


def _fractions(events):
    return [e.fraction for e in events if isinstance(e, Progress)]


def test_a_real_run_reports_monotone_fractions_that_end_at_one(llada):
    events = []
    jobs.run(quantize(llada, QuantRecipe(method="gptq", wbits=4, group_size=32, calib_samples=4, seq_len=32)),
             events.append)
    progress = [e for e in events if isinstance(e, Progress)]
    fractions = _fractions(events)
    # per block: 4 stage passes, 7 linears, the next inputs' pass; each unit starts and ends
    assert len(progress) == 2 * 2 * (4 + 7 + 1)
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and fractions.count(1.0) == 1
    assert progress[0].doing == "block 1: calibrating q/k/v" and progress[2].doing == "block 1: rounding q_proj"
    assert all(p.fraction <= p.until <= 1.0 for p in progress)
    quantized = [e for e in events if isinstance(e, LayerQuantized)]
    assert [e.fraction for e in quantized] == [events[events.index(e) - 1].fraction for e in quantized]
    assert [b.eta_s for b in events if isinstance(b, BlockQuantized)][-1] == 0.0
    json.dumps([p.to_dict() for p in progress])


def test_a_resumed_run_counts_the_finished_blocks_as_done(tmp_path):
    source = make_llada(tmp_path / "src", shards=2, n_layers=4)
    recipe = QuantRecipe(method="rtn", wbits=4, calib_samples=2, seq_len=32)
    described = lambda: load_model(source, dtype="float32", device="meta")  # noqa: E731
    cancel = CancelToken()
    first = []

    def stop_after_two(event):
        first.append(event)
        if isinstance(event, BlockQuantized) and event.block == 2:
            cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(quantize_to_folder(described(), recipe, tmp_path / "out", cancel=cancel), stop_after_two)
    resumed = []
    jobs.run(quantize_to_folder(described(), recipe, tmp_path / "out"), resumed.append)
    fractions = _fractions(resumed)
    # four blocks of one shape: the two finished ones are half the work, before anything of this run is measured
    assert fractions[0] == 0.5 and _fractions(first)[0] == 0.0
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert [e.layer for e in resumed if isinstance(e, LayerQuantized)] == list(range(15, 29))


@pytest.mark.gui
def test_the_bar_fills_between_events_up_to_the_unit_end_and_counts_down(qtbot, studio_settings, demo_model):
    from qt_helpers import studio_session

    from ui.pages.quantize import BAR_STEPS, QuantizePage

    sessions = studio_session(demo_model)
    page = QuantizePage(next(sessions), studio_settings)
    qtbot.addWidget(page)
    page._begin(demo_model, page.recipe())  # the run's live state, as Start sets it up, fed events by hand
    page._on_event(Progress(0.2, 0.9, 10.0, 40.0, "block 1: rounding down_proj"))
    first = page.progress.value()
    assert first == 0.2 * BAR_STEPS and page.progress.text() == "block 1: rounding down_proj: 20%, about 40 s left"
    qtbot.wait(1300)
    # 0.8 of the work in 40 s: 2 % a second, from the timer alone (no event came)
    assert first < page.progress.value() <= round((0.2 + 1.3 * 0.02 + 0.01) * BAR_STEPS)
    assert page.progress.text().endswith("about 39 s left")
    page._on_event(Progress(0.5, 0.52, 20.0, 2.0, "block 2: calibrating q/k/v"))  # 25 % a second, capped at 52 %
    qtbot.wait(600)
    assert page.progress.value() == 0.52 * BAR_STEPS
    qtbot.wait(2000)
    assert page.progress.value() == 0.52 * BAR_STEPS and page.progress.text().endswith("about 0 s left")
    page._stop_live("done")
    next(sessions, None)
