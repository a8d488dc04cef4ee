"""Calibration masking: today's stratified ratios unchanged, and the sampler's timesteps as a second choice."""

import json

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.errors import ModelLoadError, QuantizationError
from dllm_studio.models import read_recipe
from dllm_studio.quant.calibration import builtin_token_stream, calibration_batch
from dllm_studio.quant.recipe import QuantRecipe
from dllm_studio.sampling import GenerationConfig, denoise


def _stratified_before_timesteps(model, recipe):
    """calibration_batch as it was before timestep masking (commit 7b1f3fc), for the built-in text."""
    gen = torch.Generator().manual_seed(recipe.seed)
    tokens = torch.tensor(builtin_token_stream(model))
    n, length = recipe.calib_samples, recipe.seq_len
    starts = torch.randint(0, len(tokens) - length + 1, (n,), generator=gen)
    ids = torch.stack([tokens[s:s + length] for s in starts.tolist()])
    if not recipe.masked_calib:
        return ids, torch.zeros_like(ids, dtype=torch.bool)
    ratios = (torch.randperm(n, generator=gen) + torch.rand(n, generator=gen)) / n
    masked = torch.rand(n, length, generator=gen) < ratios[:, None]
    return torch.where(masked, model.mask_token_id, ids), masked


@pytest.mark.parametrize("seed", [0, 7])
def test_the_default_masking_is_todays(demo_model, seed):
    recipe = QuantRecipe(calib_samples=8, seq_len=48, seed=seed)
    assert recipe.calib_masking == "stratified" and recipe.masked_calib
    ids, masked = calibration_batch(demo_model, recipe)
    expected_ids, expected_masked = _stratified_before_timesteps(demo_model, recipe)
    assert torch.equal(ids, expected_ids) and torch.equal(masked, expected_masked)


def _sampler_layouts(model, config):
    """Per step of the real sampler: how many positions of each block are masks before that step."""
    steps = []
    jobs.run(denoise(model, model.chat_ids([{"role": "user", "content": "Hi"}]), config), steps.append)
    before = [tuple(range(config.gen_length))] + [step.masked for step in steps[:-1]]
    L = config.block_length
    return sorted(tuple(sum(p // L == b for p in masked) for b in range(config.num_blocks)) for masked in before)


@pytest.mark.parametrize("steps", [None, 32])
def test_timestep_masking_lays_out_the_samplers_own_steps(demo_model, steps):
    # As many samples as steps and a window as long as the answer: each step once, its blocks exactly.
    config = GenerationConfig() if steps is None else GenerationConfig(steps=steps)
    recipe = QuantRecipe(calib_masking="timesteps", calib_steps=steps, calib_samples=config.steps,
                         seq_len=config.gen_length)
    ids, masked = calibration_batch(demo_model, recipe)
    L = config.block_length
    layouts = sorted(tuple(int(row[b * L:(b + 1) * L].sum()) for b in range(config.num_blocks)) for row in masked)
    assert layouts == _sampler_layouts(demo_model, config)
    assert torch.equal(ids == demo_model.mask_token_id, masked)
    clean_ids, _ = calibration_batch(demo_model, QuantRecipe(calib_samples=config.steps, seq_len=config.gen_length,
                                                             masked_calib=False))
    assert torch.equal(ids[~masked], clean_ids[~masked])  # the same windows, only masked


def test_timestep_masking_scales_the_blocks_onto_a_shorter_window(demo_model):
    # 32 tokens for a 64-token answer in two blocks: blocks of 16, before the first block's step 8 of 32 it
    # holds 24 of 32 masks -> 12 of 16; the second block is all masks.
    recipe = QuantRecipe(calib_masking="timesteps", calib_samples=64, seq_len=32)
    _, masked = calibration_batch(demo_model, recipe)
    counts = sorted((int(row[:16].sum()), int(row[16:].sum())) for row in masked)
    assert counts == sorted([((32 - s + 1) // 2, 16) for s in range(32)] + [(0, (32 - s + 1) // 2) for s in range(32)])


def test_seeds_reproduce_the_timestep_masks(demo_model):
    recipe = QuantRecipe(calib_masking="timesteps", calib_samples=6, seq_len=40, seed=3)
    first, again = calibration_batch(demo_model, recipe), calibration_batch(demo_model, recipe)
    other = calibration_batch(demo_model, QuantRecipe(calib_masking="timesteps", calib_samples=6, seq_len=40, seed=4))
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert not torch.equal(first[1], other[1])


def test_clean_text_ignores_the_masking_choice(demo_model):
    recipe = QuantRecipe(calib_samples=5, seq_len=32, masked_calib=False)
    ids, masked = calibration_batch(demo_model, recipe)
    timesteps = calibration_batch(demo_model, QuantRecipe(calib_samples=5, seq_len=32, masked_calib=False,
                                                          calib_masking="timesteps"))
    assert not masked.any() and torch.equal(ids, timesteps[0])
    assert torch.equal(ids, _stratified_before_timesteps(demo_model, recipe)[0])


class _NoMaskModel:
    family, mask_token_id, context_length = "autoregressive", None, 1024

    class tokenizer:
        @staticmethod
        def encode(text, add_special_tokens=False):
            return [ord(c) for c in text]


@pytest.mark.parametrize("masking", ["stratified", "timesteps"])
def test_a_model_without_a_mask_token_is_refused_unless_clean(tmp_path, masking):
    text = tmp_path / "calib.txt"
    text.write_text("plain running text for calibration " * 4, encoding="utf-8")
    recipe = QuantRecipe(calib=str(text), calib_samples=2, seq_len=16, calib_masking=masking)
    with pytest.raises(QuantizationError, match="has no mask token"):
        calibration_batch(_NoMaskModel(), recipe)
    ids, masked = calibration_batch(_NoMaskModel(), QuantRecipe(calib=str(text), calib_samples=2, seq_len=16,
                                                                masked_calib=False, calib_masking=masking))
    assert ids.shape == (2, 16) and not masked.any()


@pytest.mark.parametrize("settings, message", [
    ({"calib_masking": "buckets"}, "Unknown calibration masking 'buckets'; choose one of stratified, timesteps"),
    ({"calib_steps": 32}, "stratified masking has none"),
    ({"calib_masking": "timesteps", "calib_steps": 0}, "at least one sampler step"),
])
def test_the_recipe_refuses_bad_masking_settings(settings, message):
    with pytest.raises(QuantizationError, match=message):
        QuantRecipe(**settings).validate()


def test_steps_the_sampler_cannot_split_over_its_blocks_are_refused(demo_model):
    recipe = QuantRecipe(calib_masking="timesteps", calib_steps=33, calib_samples=2, seq_len=32).validate()
    with pytest.raises(QuantizationError, match="cannot be split evenly over 2 blocks"):
        calibration_batch(demo_model, recipe)


def test_the_recipe_round_trips_and_reads_an_old_recipe_json(tmp_path):
    recipe = QuantRecipe(method="rtn", calib_masking="timesteps", calib_steps=32)
    assert QuantRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe
    old = {k: v for k, v in QuantRecipe(masked_calib=False).to_dict().items() if k not in ("calib_masking", "calib_steps")}
    assert QuantRecipe.from_dict(old) == QuantRecipe(masked_calib=False)
    (tmp_path / "recipe.json").write_text(json.dumps(old))
    assert read_recipe(tmp_path) == QuantRecipe(masked_calib=False)
    (tmp_path / "recipe.json").write_text(json.dumps({**old, "calib_steps": "32"}))
    with pytest.raises(ModelLoadError, match="'calib_steps' has the invalid value '32'"):
        read_recipe(tmp_path)


def test_the_cli_flags_reach_the_recipe(capsys):
    from dllm_studio.cli import _recipe, _recipe_flags, build_parser

    argv = ["quantize", "demo", "--method", "rtn", "--out", "q", "--calib-masking", "timesteps", "--calib-steps", "32"]
    recipe = _recipe(_recipe_flags(build_parser().parse_args(argv)))
    assert (recipe.calib_masking, recipe.calib_steps, recipe.masked_calib) == ("timesteps", 32, True)
    assert _recipe(_recipe_flags(build_parser().parse_args(argv[:6]))).calib_masking == "stratified"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["quantize", "--help"])
    assert "--calib-masking {stratified,timesteps}" in capsys.readouterr().out


def test_a_timestep_calibrated_quantization_records_its_masking(demo_model, tmp_path):
    from dllm_studio.quant.export import save_quantized
    from dllm_studio.quant.pipeline import quantize

    recipe = QuantRecipe(method="rtn", wbits=4, calib_samples=4, seq_len=32, calib_masking="timesteps")
    result = jobs.run(quantize(demo_model, recipe))
    out = save_quantized(result.model, tmp_path / "q", profile={"summary": result.summary})
    assert json.loads((out / "recipe.json").read_text())["calib_masking"] == "timesteps"
    assert read_recipe(out) == recipe
    assert ("masked text (masked as the sampler's input before its steps, stratified over the steps: 64 steps, "
            "64 tokens in blocks of 32)") in (out / "README.md").read_text()


@pytest.mark.gui
def test_the_quantize_page_builds_the_recipe_with_the_masking_chosen(quantize_page, studio_settings):
    page = quantize_page
    assert (page.recipe().masked_calib, page.recipe().calib_masking) == (True, "stratified")
    expected = {"timesteps": (True, "timesteps"), "none": (False, "stratified"), "stratified": (True, "stratified")}
    for data, (masked, masking) in expected.items():
        page.masking.setCurrentIndex(page.masking.findData(data))
        recipe = page.recipe()
        assert (recipe.masked_calib, recipe.calib_masking) == (masked, masking)
        assert (studio_settings.get("quantize/masked_calib"), studio_settings.get("quantize/calib_masking")) == \
            (masked, masking)
    assert "sampler's steps" in page.masking.toolTip()
