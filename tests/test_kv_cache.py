"""Fast-dLLM on our models: the KV-cache seam, prefix and dual caches, parallel decoding by threshold or factor."""

import json

import pytest
import torch

from dllm_studio import jobs
from dllm_studio.cli import main
from dllm_studio.errors import InvalidSettingsError
from dllm_studio.events import DenoiseStep
from dllm_studio.models.cache import KVCache
from dllm_studio.sampling import GenerationConfig, GenerationStats, _step_logits, denoise, parallel_count

MATH = [{"role": "user", "content": "What is 15 - 2?"}]


def tokens_with_masks(model, length=24, masked=range(12, 24), seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(3, model.vocab_size, (1, length), generator=g)
    x[0, list(masked)] = model.mask_token_id
    return x


@pytest.fixture(params=["llada", "dream"])
def native(request):
    return request.getfixturevalue(request.param)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_a_window_over_unchanged_tokens_reproduces_the_full_forward(native, mode):
    """What the cache holds is exactly what a full forward computes, so a window over tokens that have not changed
    since the cache filled must give the full forward's logits: positions, rotary tables and the swapped-in keys agree."""
    x, lo, hi = tokens_with_masks(native), 12, 16
    full = native.forward(x)
    cache = KVCache()
    filled = native.forward(x, cache=cache, logits_for=slice(lo, hi))
    torch.testing.assert_close(filled, full[:, lo:hi], rtol=0, atol=1e-5)
    assert cache.length == x.shape[1]
    stop = hi if mode == "dual" else x.shape[1]
    if mode == "prefix":
        cache.truncate(lo)
        assert cache.length == lo
    window = native.forward(x[:, lo:stop], positions=torch.arange(lo, stop), cache=cache, logits_for=slice(0, hi - lo))
    torch.testing.assert_close(window, full[:, lo:hi], rtol=0, atol=1e-5)


def test_a_window_is_rotated_at_its_own_positions(llada):
    """Rotary attention sees only relative positions, so a whole sequence shifted is the same; a window is not:
    its queries meet cached keys rotated at their true positions."""
    x = tokens_with_masks(llada)
    torch.testing.assert_close(llada.forward(x, positions=torch.arange(5, 5 + x.shape[1])), llada.forward(x),
                               rtol=0, atol=1e-5)
    cache = KVCache()
    llada.forward(x, cache=cache)
    right = llada.forward(x[:, 12:16], positions=torch.arange(12, 16), cache=cache)
    wrong = llada.forward(x[:, 12:16], positions=torch.arange(13, 17), cache=cache)
    assert (right - wrong).abs().max() > 1e-3


def test_a_cache_needs_a_contiguous_window_and_a_full_first_forward(llada):
    x = tokens_with_masks(llada)
    with pytest.raises(ValueError, match="whole sequence"):
        llada.forward(x[:, 4:8], positions=torch.arange(4, 8), cache=KVCache())
    cache = KVCache()
    llada.forward(x, cache=cache)
    with pytest.raises(ValueError, match="contiguous"):
        llada.forward(x[:, [4, 6]], positions=torch.tensor([4, 6]), cache=cache)


@pytest.mark.parametrize("mode", ["prefix", "dual"])
@pytest.mark.parametrize("cfg", [0.0, 1.5])
def test_step_logits_agree_with_and_without_a_cache_while_tokens_are_unchanged(native, mode, cfg):
    """The sampler's one model call: the block's logits from the refill and from a cached window equal the
    uncached ones, with Dream's one-position shift (its window starts one early) and CFG's second row."""
    x, lo, hi = tokens_with_masks(native), 12, 18
    config = GenerationConfig(gen_length=12, steps=12, block_length=6, cfg_scale=cfg, cache=mode)
    plain = _step_logits(native, x, lo, hi, GenerationConfig(gen_length=12, steps=12, block_length=6, cfg_scale=cfg),
                         GenerationStats(), None, {})
    stats, cache, calls = GenerationStats(), KVCache(), {}
    refill = _step_logits(native, x, lo, hi, config, stats, cache, calls)
    window = _step_logits(native, x, lo, hi, config, stats, cache, calls)
    assert plain.shape == refill.shape == window.shape == (hi - lo, native.vocab_size)
    torch.testing.assert_close(refill, plain, rtol=0, atol=1e-5)
    torch.testing.assert_close(window, plain, rtol=0, atol=1e-5)
    shift, rows = int(native.shift_logits), 2 if cfg else 1
    assert cache.length == (lo - shift if mode == "prefix" else x.shape[1])
    window_tokens = (hi if mode == "dual" else x.shape[1]) - (lo - shift)
    assert stats.forward_passes == 2 * rows and stats.cache_refreshes == 1
    assert stats.forward_equivalents == pytest.approx(rows * (1 + window_tokens / x.shape[1]))
    assert calls == {x.shape[1]: 1, window_tokens: 1}


@pytest.mark.parametrize("mode", ["prefix", "dual"])
def test_cached_generation_refreshes_once_per_block_and_counts_its_work(llada, mode):
    prompt = [1, 2, 3, 4, 5]
    config = GenerationConfig(gen_length=24, steps=12, block_length=8, cache=mode)
    events = []
    result = jobs.run(denoise(llada, prompt, config), events.append)
    steps = [e for e in events if isinstance(e, DenoiseStep)]
    assert [e.refreshed for e in steps] == [True, False, False, False] * 3
    assert [len(e.committed) for e in steps] == [2] * 12 and not steps[-1].masked
    T, s = len(prompt) + 24, result.stats
    windows = [(hi if mode == "dual" else T) - lo for lo, hi in ((5, 13), (13, 21), (21, 29)) for _ in range(3)]
    assert s.forward_passes == 12 and s.cache_refreshes == 3
    assert s.forward_equivalents == pytest.approx(3 + sum(windows) / T)
    assert s.tokens_per_step == 2.0 and s.committed_tokens == 24
    assert s.cache_bytes == (2 * llada.num_layers * T * llada.hidden_size * 4 if mode == "dual" else
                             max(2 * llada.num_layers * lo * llada.hidden_size * 4 for lo in (5, 13, 21)))


def test_without_cache_or_threshold_the_settings_change_nothing(llada):
    base = GenerationConfig(gen_length=16, steps=8, block_length=8)
    explicit = GenerationConfig(gen_length=16, steps=8, block_length=8, cache="none", threshold=None, factor=None)
    a, b = jobs.run(denoise(llada, [1, 2, 3], base)), jobs.run(denoise(llada, [1, 2, 3], explicit))
    assert a.token_ids == b.token_ids and a.stats.forward_equivalents == a.stats.forward_passes == 8
    assert not any(e.refreshed for e in a.steps) and a.stats.cache_refreshes == a.stats.cache_bytes == 0


def test_the_demo_answers_the_same_with_either_cache(demo_model):
    """The demo is sure of its answers, so the approximation costs nothing here; `bench_decoding.py` measures it."""
    prompt = demo_model.chat_ids(MATH)
    answers = {mode: jobs.run(denoise(demo_model, prompt, GenerationConfig(gen_length=64, steps=64, cache=mode)))
               for mode in ("none", "prefix", "dual")}
    assert {r.text for r in answers.values()} == {"15 - 2 = 13"}
    assert answers["dual"].stats.forward_equivalents < answers["prefix"].stats.forward_equivalents < 64


def test_refresh_after_refills_the_cache_after_a_step_that_committed_many(demo_model):
    """The demo commits most of a block in its first step; with refresh_after=1 the next step runs the whole
    sequence again instead of reusing keys computed while those tokens were masks."""
    prompt = demo_model.chat_ids([{"role": "user", "content": "There were 15 birds on a tree and 2 flew away. "
                                                               "How many birds are left?"}])
    fast = dict(gen_length=32, steps=32, block_length=8, cache="dual", threshold=0.9)
    once = jobs.run(denoise(demo_model, prompt, GenerationConfig(**fast)))
    again = jobs.run(denoise(demo_model, prompt, GenerationConfig(**fast, refresh_after=1)))
    for result in (once, again):
        previous = [None] + [e for e in result.steps[:-1]]
        first_of_block = [p is None or p.block != e.block for p, e in zip(previous, result.steps)]
        many = [p is not None and p.block == e.block and len(p.committed) > 1 for p, e in zip(previous, result.steps)]
        expected = first_of_block if result is once else [a or b for a, b in zip(first_of_block, many)]
        assert [e.refreshed for e in result.steps] == expected
    assert again.stats.cache_refreshes > once.stats.cache_refreshes
    with pytest.raises(InvalidSettingsError, match="refresh_after needs a cache"):
        GenerationConfig(refresh_after=1).validate()


# ---- parallel decoding ---------------------------------------------------------------------------

def test_threshold_commits_every_confident_token_and_at_least_the_share():
    scores = torch.tensor([0.95, 0.5, 0.92, 0.1], dtype=torch.float64)
    rule = GenerationConfig(threshold=0.9)
    assert parallel_count(scores, 1, rule) == 2
    assert parallel_count(scores, 3, rule) == 3  # never fewer than the fixed schedule's share
    assert parallel_count(scores, 0, GenerationConfig(threshold=0.99)) == 1  # at least one
    assert parallel_count(scores, 1, GenerationConfig()) == 1 and parallel_count(scores, 9, GenerationConfig()) == 4


def test_factor_commits_the_leading_run_that_is_sure_enough():
    # The n-th best must reach 1 - factor/(n+1): 0.5, 0.667, 0.75, 0.8 for factor 1; -0.2, 0.2 for 2.4.
    rule = GenerationConfig(factor=1.0)
    assert parallel_count(torch.tensor([0.7, 0.99, 0.9, 0.79], dtype=torch.float64), 1, rule) == 3  # 0.7 < 0.8
    assert parallel_count(torch.tensor([0.81, 0.99, 0.9, 0.85], dtype=torch.float64), 1, rule) == 4
    assert parallel_count(torch.tensor([0.4, 0.3], dtype=torch.float64), 0, rule) == 1  # at least one
    assert parallel_count(torch.tensor([0.4, 0.3], dtype=torch.float64), 0, GenerationConfig(factor=2.4)) == 2


@pytest.mark.parametrize("mode", ["none", "dual"])
def test_threshold_decoding_takes_fewer_steps_and_commits_only_confident_tokens(demo_model, mode):
    prompt = demo_model.chat_ids(MATH)
    config = GenerationConfig(gen_length=64, steps=64, block_length=32, cache=mode, threshold=0.9)
    result = jobs.run(denoise(demo_model, prompt, config))
    steps = result.steps
    assert result.text == "15 - 2 = 13"
    assert len(steps) == result.stats.steps < 64 and all(e.total_steps == 64 for e in steps)
    assert sum(len(e.committed) for e in steps) == 64 and not steps[-1].masked
    assert any(len(e.committed) > 1 for e in steps)
    for e in steps:  # beyond the most confident one, which a step commits anyway, every commit reached 0.9
        assert all(c >= 0.9 for c in sorted((c.confidence for c in e.committed), reverse=True)[1:])
    assert result.stats.tokens_per_step == 64 / len(steps)


def test_a_low_threshold_on_an_unsure_model_still_ends_every_block(llada):
    config = GenerationConfig(gen_length=16, steps=16, block_length=8, threshold=0.02, cache="dual")
    result = jobs.run(denoise(llada, [1, 2, 3], config))
    assert llada.mask_token_id not in result.token_ids
    assert [e.block for e in result.steps] == sorted(e.block for e in result.steps)
    assert result.stats.committed_tokens == 16


@pytest.mark.parametrize("settings, message", [
    (dict(threshold=0.9, remasking="random"), "random remasking has no scale"),
    (dict(threshold=0.9, remasking="entropy"), "entropy remasking has no scale"),
    (dict(threshold=0.9, factor=1.0), "not both"),
    (dict(threshold=1.5), r"threshold must be in \(0, 1\]"),
    (dict(factor=0.0), "factor must be positive"),
    (dict(cache="full"), "cache must be one of none, prefix, dual"),
])
def test_impossible_settings_are_refused(settings, message):
    with pytest.raises(InvalidSettingsError, match=message):
        GenerationConfig(**settings).validate()


# ---- quantized models and dtypes ---------------------------------------------------------------------

@pytest.mark.parametrize("recipe", [dict(method="rtn", wbits=4), dict(method="smoothquant", wbits=8, abits=8),
                                    dict(method="quarot", wbits=4, abits=4), dict(method="tlq", wbits=3)])
def test_quantized_layers_run_cached_windows_exactly_as_full_forwards(demo_model, recipe):
    """Weight-only grids, int8 activations, QuaRot's rotated stream with its online Hadamard, twin-log codebooks:
    every one works token by token (activations are rounded per token), so a window over unchanged tokens gives
    the full forward's logits, and a cached answer is the uncached one where the demo is sure."""
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    model = jobs.run(quantize(demo_model, QuantRecipe(**recipe, calib_samples=4, seq_len=64))).model
    x, lo, hi = tokens_with_masks(model, 40, range(20, 40)), 20, 28
    full, cache = model.forward(x), KVCache()
    model.forward(x, cache=cache)
    window = model.forward(x[:, lo:hi], positions=torch.arange(lo, hi), cache=cache, logits_for=slice(0, hi - lo))
    torch.testing.assert_close(window, full[:, lo:hi], rtol=0, atol=1e-4)
    prompt = demo_model.chat_ids(MATH)
    fast = jobs.run(denoise(model, prompt, GenerationConfig(cache="dual", threshold=0.9)))
    assert fast.token_ids == jobs.run(denoise(model, prompt, GenerationConfig())).token_ids


def test_the_cache_holds_keys_and_values_in_the_activation_dtype(llada_dir):
    from dllm_studio.models import load_model

    model = load_model(llada_dir, dtype="bfloat16")
    cache = KVCache()
    model.forward(tokens_with_masks(model), cache=cache)
    assert {t.dtype for kv in cache._layers for t in kv} == {torch.bfloat16}
    assert cache.nbytes == 2 * model.num_layers * 24 * model.hidden_size * 2


# ---- the CLI --------------------------------------------------------------------------------------

def test_generate_json_reports_the_cache_and_the_parallel_steps(capsys):
    code = main(["generate", "demo", "--prompt", "What is 15 - 2?", "--cache", "dual", "--threshold", "0.9", "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and out["text"] == "15 - 2 = 13"
    assert out["settings"]["cache"] == "dual" and out["settings"]["threshold"] == 0.9
    stats, steps = out["stats"], out["steps"]
    assert stats["steps"] == len(steps) and stats["cache_refreshes"] == sum(s["refreshed"] for s in steps) == 2
    assert stats["tokens_per_step"] == 64 / len(steps) and stats["forward_equivalents"] <= stats["forward_passes"]


def test_eval_json_reports_passes_equivalents_and_tokens_per_step(capsys, tmp_path):
    out_file = tmp_path / "eval.json"
    code = main(["eval", "demo", "--suite", "math", "--limit", "3", "--gen-length", "64", "--steps", "64",
                 "--block-length", "32", "--cache", "dual", "--threshold", "0.9", "--json", str(out_file)])
    assert code == 0
    suite = json.loads(out_file.read_text())["suites"][0]
    records = suite["records"]
    assert suite["settings"]["cache"] == "dual" and len(records) == 3
    assert suite["forward_equivalents_per_item"] == pytest.approx(sum(r["forward_equivalents"] for r in records) / 3)
    assert suite["tokens_per_step"] == pytest.approx(3 * 64 / sum(r["steps"] for r in records))
    assert suite["forward_equivalents_per_item"] < suite["forward_passes_per_item"] <= 64
