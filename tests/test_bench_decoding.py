"""The decoding benchmark's summaries: per-answer costs, ratios and deltas against the baseline, its tables."""

import importlib.util
from pathlib import Path
from types import SimpleNamespace

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_decoding.py"
spec = importlib.util.spec_from_file_location("bench_decoding", BENCH)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def record(passes, equivalents, steps, committed, wall_s):
    return SimpleNamespace(forward_passes=passes, forward_equivalents=equivalents, steps=steps,
                           committed_tokens=committed, wall_time_s=wall_s)


def test_cost_is_per_answer_and_tokens_per_step_over_all_steps():
    # Two answers of 64 tokens: one in 4 steps, one in 12 (tokens/step pools the steps, not the answers' rates).
    row = bench.cost([record(4, 2.5, 4, 64, 0.25), record(12, 6.0, 12, 64, 0.75)])
    assert row == {"passes": 8.0, "equivalents": 4.25, "tokens_per_step": 8.0, "wall_ms": 500.0}


def test_relative_gives_cost_ratios_and_accuracy_points():
    base = {"qa": 0.5, "math": 0.25, "passes": 64.0, "equivalents": 64.0, "wall_ms": 400.0}
    row = {"qa": 0.75, "math": 0.125, "passes": 16.0, "equivalents": 8.0, "wall_ms": 100.0}
    assert bench.relative(row, base) == {"passes_ratio": 0.25, "equivalents_ratio": 0.125, "wall_ms_ratio": 0.25,
                                         "qa_delta_pts": 25.0, "math_delta_pts": -12.5}
    assert bench.relative(base, base)["qa_delta_pts"] == 0.0


def test_markdown_table():
    assert bench.markdown(["cache", "×"], [["none", "1.00"], ["dual", "0.38"]]) == (
        "| cache | × |\n| --- | --- |\n| none | 1.00 |\n| dual | 0.38 |")
    assert bench.label("dual", 0.9) == "dual · thr 0.9" and bench.label("none", None) == "none · fixed"
    assert bench.label("dual", 0.9, 1) == "dual · thr 0.9 · refresh > 1"
