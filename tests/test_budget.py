"""Mixed precision to a memory budget: the knapsack, the plan on the demo model, its storage and its refusals."""

import dataclasses
import itertools
import json
import random

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.errors import Cancelled, ModelLoadError, QuantizationError
from dllm_studio.events import CancelToken, LayerQuantized, SensitivityProgress
from dllm_studio.models import load_model
from dllm_studio.quant import budget
from dllm_studio.quant.export import save_quantized
from dllm_studio.quant.pipeline import quantize
from dllm_studio.quant.qlinear import QuantLinear
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.quant.storage import check_qconfig

BASE = QuantRecipe(method="rtn", wbits=4, calib_samples=2, seq_len=32)


def _brute_force(errors, costs, capacity):
    return min(sum(e[k] for e, k in zip(errors, ks)) for ks in itertools.product(*(range(len(c)) for c in costs))
               if sum(c[k] for c, k in zip(costs, ks)) <= capacity)


def test_knapsack_is_optimal_against_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        n = rng.randint(1, 6)
        costs = [sorted(rng.sample(range(1, 60), 3)) for _ in range(n)]
        errors = [[rng.random() for _ in range(3)] for _ in range(n)]
        capacity = rng.randint(sum(c[0] for c in costs), sum(c[-1] for c in costs))
        picks = budget.knapsack(errors, costs, capacity)
        assert sum(c[k] for c, k in zip(costs, picks)) <= capacity
        assert sum(e[k] for e, k in zip(errors, picks)) == _brute_force(errors, costs, capacity)


@pytest.fixture(scope="module")
def planned(demo_model):
    sizes = budget.stored_sizes(demo_model, BASE)
    uniform3 = sizes.fixed + sum(b[3] for b in sizes.bytes.values())
    recipe = dataclasses.replace(BASE, memory_budget=uniform3)
    events = []
    plan = jobs.run(budget.budget_plan(demo_model, recipe), events.append)
    quantized = []
    result = jobs.run(quantize(demo_model, plan.apply(recipe)), quantized.append)
    return sizes, uniform3, plan, events, result, quantized


def test_plan_mixes_bits_within_the_budget_and_the_model_stores_it(demo_model, planned):
    sizes, uniform3, plan, events, result, quantized = planned
    assert [(e.block, e.blocks) for e in events if isinstance(e, SensitivityProgress)] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert len(set(plan.bits.values())) > 1 and set(plan.bits.values()) <= {2, 3, 4}
    s = result.summary
    stored = s["model_bytes_before"] - s["linear_bytes_before"] + s["linear_bytes_after"]
    assert s["linear_bytes_after"] == plan.layer_bytes and stored == plan.total_bytes <= uniform3
    assert s["bits_per_weight"] == round(plan.bits_per_weight, 4)
    assert {e.name: e.bits for e in quantized if isinstance(e, LayerQuantized)} == plan.bits
    assert result.recipe.label == "RTN W2-4A16 mixed g128"
    # The plan's proxy error beats every layer at 3 bits, which the same budget also holds.
    table = jobs.run(budget.sensitivity(demo_model, BASE))
    assert plan.error < sum(table[name][3] for name in plan.bits)
    assert all(row[2] > row[3] > row[4] for row in table.values())


def test_each_layer_is_rounded_at_its_planned_bits(demo_model, planned):
    plan, result = planned[2], planned[4]
    name = next(n for n, b in plan.bits.items() if b == 2)
    uniform2 = jobs.run(quantize(demo_model, QuantRecipe(method="rtn", wbits=2, calib_samples=2, seq_len=32)))
    mixed, plain = (r.model.module.get_submodule(name) for r in (result, uniform2))
    assert mixed.bits == 2 and torch.equal(mixed.dequantize(torch.float32), plain.dequantize(torch.float32))


def test_plan_is_recorded_and_reloads_to_identical_logits(tmp_path, planned):
    plan, result = planned[2], planned[4]
    folder = save_quantized(result.model, tmp_path / "mixed")
    recipe = json.loads((folder / "recipe.json").read_text())
    qconfig = json.loads((folder / "config.json").read_text())["quantization_config"]
    assert recipe["layer_bits"] == plan.bits and recipe["memory_budget"] == planned[1]
    assert qconfig["bits"] == 4 and qconfig["layer_bits"] == {n: b for n, b in plan.bits.items() if b != 4}
    reloaded = load_model(str(folder))
    assert reloaded.quantization == result.recipe
    assert {n: m.bits for n, m in reloaded.module.named_modules() if isinstance(m, QuantLinear)} == plan.bits
    x = torch.tensor([result.model.chat_ids([{"role": "user", "content": "What is 2 plus 3?"}])])
    assert torch.equal(reloaded.forward(x), result.model.forward(x))


def test_gptq_format_refuses_a_mixed_model(tmp_path, planned):
    with pytest.raises(QuantizationError, match="holds one `bits` for every layer .*GPTQModel's `dynamic`"):
        save_quantized(planned[4].model, tmp_path / "gptq", fmt="gptq")
    assert not (tmp_path / "gptq").exists()


def test_budgets_out_of_reach_and_above_everything(planned):
    sizes, _, plan, *_ = planned
    table = {n: dict.fromkeys(b, 1.0) | {2: 3.0, 3: 2.0} for n, b in sizes.bytes.items()}
    least = sizes.fixed + sum(b[2] for b in sizes.bytes.values())
    with pytest.raises(QuantizationError, match=f"at least .* \\({least:,} bytes\\)"):
        budget.plan_bits(table, sizes, BASE, memory_budget=least - 1)
    assert set(budget.plan_bits(table, sizes, BASE, memory_budget=least).bits.values()) == {2}
    assert set(budget.plan_bits(table, sizes, BASE, memory_budget=10**12).bits.values()) == {4}
    with pytest.raises(QuantizationError, match="below the least this recipe stores: 2.1"):
        budget.plan_bits(table, sizes, BASE, target_bpw=2.0)
    bpw = budget.plan_bits(table, sizes, BASE, target_bpw=3.5)
    assert bpw.bits_per_weight <= 3.5 and len(set(bpw.bits.values())) > 1


def test_sensitivity_stops_between_blocks(demo_model):
    cancel, seen = CancelToken(), []

    def on_event(event):
        seen.append(event)
        cancel.cancel()

    with pytest.raises(Cancelled):
        jobs.run(budget.sensitivity(demo_model, BASE, cancel), on_event)
    assert len(seen) == 1


def test_mixed_bits_are_refused_where_they_cannot_apply():
    with pytest.raises(QuantizationError, match="only the weight-only grid methods .*SMOOTHQUANT W8A8"):
        QuantRecipe(method="smoothquant", wbits=8, abits=8, target_bpw=4.0).validate()
    with pytest.raises(QuantizationError, match="RTN W4A8 ties every layer"):
        QuantRecipe(method="rtn", wbits=4, abits=8, memory_budget=10**9).validate()
    with pytest.raises(QuantizationError, match="gives x 5 bits; GPTQ quantizes weights to 8, 4, 3, 2"):
        QuantRecipe(method="gptq", layer_bits=(("x", 5),)).validate()
    with pytest.raises(QuantizationError, match="not both"):
        QuantRecipe(memory_budget=10**9, target_bpw=3.0).validate()
    with pytest.raises(ModelLoadError, match="layer_bits must map layer names to bits"):
        check_qconfig({"quant_method": "dllm_studio", "bits": 4, "layer_bits": {"a": 5}})


def test_cli_quantize_prints_the_plan_before_quantizing(capsys, tmp_path, demo_model):
    sizes = budget.stored_sizes(demo_model, BASE)
    target = sizes.fixed + sum(b[3] for b in sizes.bytes.values())
    code = main(["quantize", "demo", "--method", "rtn", "--memory-budget", str(target), "--calib-samples", "2",
                 "--seq-len", "32", "--out", str(tmp_path / "q")])
    out = capsys.readouterr().out
    assert code == 0
    lines = out.splitlines()
    plan = lines.index("bit plan (bits per layer, by block):")
    assert lines[plan - 1].startswith("sensitivity block   4/4")
    assert lines[plan + 1].startswith("  block 0  q ") and f"of a {target / 1e6:.2f} MB budget" in lines[plan + 6]
    assert lines[plan + 7].startswith("  layer   1/28") and "RTN W2-4A16 mixed g128" in out  # then quantizing
    recipe = json.loads((tmp_path / "q" / "recipe.json").read_text())
    assert recipe["memory_budget"] == target and set(recipe["layer_bits"].values()) == {2, 3, 4}
    assert main(["quantize", "demo", "--method", "rtn", "--memory-budget", "5GB", "--format", "gptq",
                 "--out", str(tmp_path / "g")]) == 1
    assert "holds one `bits`" in capsys.readouterr().err and not (tmp_path / "g").exists()
