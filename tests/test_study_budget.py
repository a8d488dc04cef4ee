"""The study's mixed-precision cells: 'w4a16@3.25' / 'w4a16@1.2MB' settings, their plan before quantizing, the
bytes they store beside the uniform cells', and a rerun served from the cache without planning."""

import html

import pytest

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.compare import Candidate
from dllm_studio.errors import InvalidSettingsError, QuantizationError
from dllm_studio.events import SensitivityProgress
from dllm_studio.memory import human
from dllm_studio.quant import budget, pipeline
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.report import read_report, study_grid, study_sizes, text_table
from dllm_studio.study import Budget, parse_setting, plan, study

TINY = {"calib_samples": 2, "seq_len": 32}


def test_a_setting_takes_a_bits_per_weight_target_or_a_memory_budget():
    assert parse_setting("w4a16@3.25") == (4, 16, Budget("3.25bpw", target_bpw=3.25))
    assert parse_setting(" W3 @ 2.5bpw ") == (3, 16, Budget("2.5bpw", target_bpw=2.5))
    assert parse_setting("w4a16@1.2mb") == (4, 16, Budget("1.2MB", memory_budget=1_200_000))
    assert parse_setting("w4a16@5GB") == (4, 16, Budget("5GB", memory_budget=5 * 10**9))
    assert parse_setting("w8a16@2gib") == (8, 16, Budget("2GiB", memory_budget=2 * 2**30))
    assert parse_setting("w4a16@800000B") == (4, 16, Budget("800000B", memory_budget=800_000))
    assert parse_setting("w4a16") == (4, 16)  # a uniform setting stays a pair


@pytest.mark.parametrize("text, message", [
    ("w4a16@", "After '@' a setting takes a mixed-precision budget: stored bits per weight (w4a16@3.25) or the "
               "model's weight bytes with a unit (w4a16@1.2MB, @5GB, @2GiB), not ''."),
    ("w4a16@3MBs", "After '@' a setting takes a mixed-precision budget: stored bits per weight (w4a16@3.25) or the "
                   "model's weight bytes with a unit (w4a16@1.2MB, @5GB, @2GiB), not '3MBs'."),
    ("w4a16@-1", "After '@' a setting takes a mixed-precision budget: stored bits per weight (w4a16@3.25) or the "
                 "model's weight bytes with a unit (w4a16@1.2MB, @5GB, @2GiB), not '-1'."),
    ("w4a16@0", "A mixed-precision budget must be positive, not '0'."),
    ("w4a16@0MB", "A mixed-precision budget must be positive, not '0MB'."),
    ("4bit@3", "A bit-width setting reads like w4a16 or w8a8, not '4bit@3'."),
])
def test_a_bad_budget_is_refused_with_what_it_should_read_like(text, message):
    with pytest.raises(InvalidSettingsError) as refused:
        parse_setting(text)
    assert str(refused.value) == message


def test_plan_gives_a_budget_cell_its_own_setting_and_skips_methods_that_cannot_mix_bits():
    cells = plan(["rtn", "gptq", "smoothquant"], [(4, 16), parse_setting("w4a16@3.25"), parse_setting("w8a8@1.2MB")],
                 TINY)
    assert [(c["setting"], c["label"], c["status"]) for c in cells] == [
        ("W4A16", "RTN W4A16", "pending"), ("W4A16", "GPTQ W4A16", "pending"),
        ("W4A16", "SMOOTHQUANT W4A16", "skipped"),
        ("W4A16@3.25bpw", "RTN W4A16@3.25bpw", "pending"), ("W4A16@3.25bpw", "GPTQ W4A16@3.25bpw", "pending"),
        ("W4A16@3.25bpw", "SMOOTHQUANT W4A16@3.25bpw", "skipped"),
        ("W8A8@1.2MB", "RTN W8A8@1.2MB", "skipped"), ("W8A8@1.2MB", "GPTQ W8A8@1.2MB", "skipped"),
        ("W8A8@1.2MB", "SMOOTHQUANT W8A8@1.2MB", "skipped")]
    assert cells[3]["recipe"] == QuantRecipe(method="rtn", wbits=4, target_bpw=3.25, **TINY).to_dict()
    assert cells[3]["recipe"]["target_bpw"] == 3.25 and "memory_budget" not in cells[3]["recipe"]
    # RTN makes W8A8, but not with a plan: its reason is the recipe's own refusal of mixed bits.
    with pytest.raises(QuantizationError) as refused:
        QuantRecipe(method="rtn", wbits=8, abits=8, memory_budget=1_200_000, **TINY).validate()
    assert cells[6]["reason"] == str(refused.value)
    assert cells[6]["reason"].startswith("Mixed precision (--memory-budget, --target-bpw) gives each layer its own")


@pytest.fixture
def calls(monkeypatch):
    """What the study asks of the planner and the quantizer, by recipe label."""
    log = {"planned": [], "quantized": []}
    real_plan, real_quantize = budget.budget_plan, pipeline.quantize

    def planning(model, recipe, cancel=None, store=None):
        log["planned"].append(recipe.label)
        return (yield from real_plan(model, recipe, cancel, store))

    def quantizing(model, recipe, cancel=None):
        log["quantized"].append(recipe)
        return (yield from real_quantize(model, recipe, cancel))

    monkeypatch.setattr(budget, "budget_plan", planning)
    monkeypatch.setattr(pipeline, "quantize", quantizing)
    return log


def uniform3_bytes(demo_model) -> int:
    """The demo's weights as stored with every block linear RTN W3 (the head and the rest as they are)."""
    sizes = budget.stored_sizes(demo_model, QuantRecipe(method="rtn", wbits=4, **TINY))
    return sizes.fixed + sum(b[3] for b in sizes.bytes.values())


def test_a_budget_cell_is_planned_quantized_mixed_and_stored_within_its_budget(demo_model, tmp_path, calls):
    equal = uniform3_bytes(demo_model)
    settings = [(3, 16), parse_setting(f"w4a16@{equal}B"), parse_setting("w4a16@3.25"), parse_setting("w2a16@1.5")]
    events = []
    report = jobs.run(study(Candidate("demo", model=demo_model), ["rtn"], settings, ["math"], tmp_path, limit=1,
                            recipe=TINY), events.append)
    bytes_cell, bpw_cell = f"RTN W4A16@{equal}B", "RTN W4A16@3.25bpw"
    assert [(c["label"], c["status"]) for c in report["cells"]] == [
        ("RTN W3A16", "done"), (bytes_cell, "done"), (bpw_cell, "done"), ("RTN W2A16@1.5bpw", "skipped")]
    assert report["cells"][3]["reason"].startswith("A target of 1.5 bits per weight is below the least this "
                                                   "recipe stores: 2.")
    assert calls["planned"] == ["RTN W4A16 g128"] * 2  # the budgets, not the uniform cell, nor the skipped one
    assert sum(isinstance(e, SensitivityProgress) for e in events) == 2 * len(demo_model.blocks())
    mixed = calls["quantized"][1:]
    assert [r.wbits for r in calls["quantized"]] == [3, 4, 4] and not calls["quantized"][0].layer_bits
    assert all(len({bits for _, bits in r.layer_bits}) > 1 for r in mixed)
    assert (mixed[0].memory_budget, mixed[1].target_bpw) == (equal, 3.25)

    entries = {m["label"]: m for m in report["models"]}
    uniform, by_bytes, by_bpw = entries["RTN W3A16"], entries[bytes_cell], entries[bpw_cell]
    assert uniform["stored_bytes"] == equal and "bit_plan" not in uniform
    assert by_bytes["stored_bytes"] == by_bytes["bit_plan"]["stored_bytes"] <= equal
    assert by_bytes["recipe"]["layer_bits"] == dict(mixed[0].layer_bits)
    counts = by_bytes["bit_plan"]["layers_at_bits"]
    assert sum(counts.values()) == len(mixed[0].layer_bits) and len(counts) > 1
    assert by_bpw["bits_per_weight"] == by_bpw["bit_plan"]["bits_per_weight"] <= 3.25
    row = next(r for r in report["rows"] if r["model"] == bytes_cell)
    assert (row["weight_bytes"], row["bits_per_weight"]) == (by_bytes["weight_bytes"], by_bytes["bits_per_weight"])

    header, grid = study_grid(report)
    assert [line[:2] for line in grid] == [("full precision", "demo"), ("W3A16", "RTN"), (f"W4A16@{equal}B", "RTN"),
                                           ("W4A16@3.25bpw", "RTN")]
    header, sizes = study_sizes(report)
    assert header == ("setting", "method", "weights stored", "bits/w", "layers at bits")
    layers = ", ".join(f"{n} at {bits}" for bits, n in counts.items())
    assert sizes[1][2:] == (human(equal), f"{uniform['bits_per_weight']:.3f}", "—")
    assert sizes[2] == (f"W4A16@{equal}B", "RTN", human(by_bytes["stored_bytes"]),
                        f"{by_bytes['bits_per_weight']:.3f}", layers)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    table = page.split("<h2>Weights stored per model</h2>")[1].split("</table>")[0]
    assert all(f">{html.escape(cell)}</td>" in table for line in sizes for cell in line)

    calls["planned"].clear(), calls["quantized"].clear()
    again = []
    rerun = jobs.run(study(Candidate("demo", model=demo_model), ["rtn"], settings, ["math"], tmp_path, limit=1,
                           recipe=TINY), again.append)
    assert calls == {"planned": [], "quantized": []}  # served from the cache: neither planned nor quantized
    assert not any(isinstance(e, SensitivityProgress) for e in again)
    assert rerun["rows"] == report["rows"] and read_report(tmp_path)["models"] == report["models"]


def test_cli_study_runs_a_budget_cell_beside_a_uniform_one(capsys, tmp_path):
    assert main(["study", "demo", "--methods", "rtn", "--bits", "w3a16,w4a16@3.2", "--suite", "math", "--limit", "1",
                 "--report", str(tmp_path), "--calib-samples", "2", "--seq-len", "32"]) == 0
    out, err = capsys.readouterr()
    report = read_report(tmp_path)
    assert [(c["label"], c["status"]) for c in report["cells"]] == [("RTN W3A16", "done"),
                                                                   ("RTN W4A16@3.2bpw", "done")]
    (grid_header, grid), (sizes_header, sizes) = study_grid(report), study_sizes(report)
    assert out == text_table(grid, grid_header) + "\n\n" + text_table(sizes, sizes_header) + "\n"
    assert [f"  planning: sensitivity block {i}/4" for i in range(1, 5)] == \
           [line for line in err.splitlines() if "planning" in line]
    planned = next(m for m in report["models"] if m["label"] == "RTN W4A16@3.2bpw")
    assert len(planned["bit_plan"]["layers_at_bits"]) > 1 and planned["bits_per_weight"] <= 3.2


def test_cli_study_help_shows_the_budget_syntax(capsys):
    with pytest.raises(SystemExit):
        main(["study", "--help"])
    assert "w4a16@3.25 stored bits per weight, w4a16@1.2MB or @5GB" in " ".join(capsys.readouterr().out.split())
