"""What Fast-dLLM's KV caches and parallel decoding save, and what they cost in accuracy, in one run.

Every config is cache none / prefix / dual x confidence threshold off / 0.9 (and, on the demo, dual + 0.9 with
the cache also refilled after a step that committed more than one token: `refresh_after`), compared with the uncached
fixed-step run (by default one token per step: LLaDA's reference algorithm) of the same model:
(a) the bundled demo at full precision, GPTQ W4 g128 (the default recipe) and W8A8 (SmoothQuant by default,
    or RTN), both quantized from the demo in this run: qa and math accuracy on the held-out (test) splits,
    forward passes and full-sequence-equivalent passes per answer (a cached window counts its share of the
    sequence's tokens), tokens committed per step and wall per answer, over the answers of both suites
    (each item answered under every config in turn, so the machine's load falls on all alike);
(b) a random LLaDA-8B-shaped model of 2 blocks (`bench_runtimes.build("large")`: d_model 4096, 32 heads,
    MLP 12288, the demo's vocabulary so the linears dominate) at this machine's fastest full-precision dtype:
    one answer of 256 tokens in blocks of 32 after a prompt of 256 random tokens, every config timed for
    real, with the bytes the cache held. Threshold off only: random weights are rarely 0.9-confident.

    python benchmarks/bench_decoding.py [--limit N] [--demo-only | --large-only] [--steps 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_runtimes import build  # noqa: E402  (it also puts the repository root on sys.path)

SUITES = ("qa", "math")
CACHES = ("none", "prefix", "dual")
THRESHOLDS = (None, 0.9)
# Fast-dLLM's grid, then dLLM Studio's refresh after a step that committed more than one token (dual, 0.9).
DEMO_CONFIGS = [{"cache": c, "threshold": t} for c in CACHES for t in THRESHOLDS] + [
    {"cache": "dual", "threshold": 0.9, "refresh_after": 1}]
# `--grid threshold`: the baseline and the threshold rows only, without the slow fixed-step cached runs.
THRESHOLD_GRID = [c for c in DEMO_CONFIGS if c["threshold"] is not None and c["cache"] in ("none", "dual")]


# ---- summaries (pure) ---------------------------------------------------------------------------------

def cost(records: list) -> dict:
    """Per-answer cost over eval `ItemRecord`s (or anything with their counters)."""
    n, steps = len(records), sum(r.steps for r in records)
    return {"passes": sum(r.forward_passes for r in records) / n,
            "equivalents": sum(r.forward_equivalents for r in records) / n,
            "tokens_per_step": sum(r.committed_tokens for r in records) / steps,
            "wall_ms": 1000 * sum(r.wall_time_s for r in records) / n}


def relative(row: dict, base: dict) -> dict:
    """`row`'s costs as ratios to `base`'s, and its accuracies as deltas in points."""
    out = {f"{k}_ratio": row[k] / base[k] for k in ("passes", "equivalents", "wall_ms")}
    out.update({f"{s}_delta_pts": 100 * (row[s] - base[s]) for s in SUITES})
    return out


def label(cache: str, threshold: float | None, refresh_after: int | None = None) -> str:
    refresh = "" if refresh_after is None else f" · refresh > {refresh_after}"
    return f"{cache} · {'fixed' if threshold is None else f'thr {threshold}'}{refresh}"


def markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


# ---- (a) the demo -----------------------------------------------------------------------------------

def demo_models(w8a8: str) -> list[tuple[str, object]]:
    from dllm_studio import jobs
    from dllm_studio.models import load_model
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    demo = load_model("demo")
    out = [("full precision", demo)]
    for name, recipe in (("GPTQ W4 g128", QuantRecipe()), (f"{w8a8} W8A8", QuantRecipe(method=w8a8, wbits=8, abits=8))):
        out.append((name, jobs.run(quantize(demo, recipe)).model))
    return out


def demo_rows(model, name: str, generation: dict, limit: int | None, grid: list[dict]) -> list[dict]:
    """One row per config: accuracies, per-answer costs, and both relative to the uncached fixed-step run.

    Every item is answered under every config before the next item, so a change in the machine's load
    (other processes on a shared CPU) falls on all configs alike rather than on whichever ran then.
    """
    from dllm_studio import jobs
    from dllm_studio.eval.runner import evaluate
    from dllm_studio.eval.suites import Suite, load_suite

    configs = [{**generation, **config} for config in grid]
    for overrides in configs:  # warm-up: quantized layers build and choose their kernels at the first call
        jobs.run(evaluate(model, "qa", overrides, limit=1))
    records = [{s: [] for s in SUITES} for _ in configs]
    for suite in map(load_suite, SUITES):  # the test split: held out from the demo's training
        for item in suite.items[:limit]:
            one = Suite(suite.name, suite.path, (item,))
            for done, overrides in zip(records, configs):
                done[suite.name] += jobs.run(evaluate(model, one, overrides)).records
    rows = [{"model": name, "cache": overrides["cache"], "threshold": overrides["threshold"],
             "refresh_after": overrides.get("refresh_after"),
             **{s: sum(bool(r.correct) for r in done[s]) / len(done[s]) for s in SUITES},
             "items": {s: len(done[s]) for s in SUITES}, **cost([r for s in SUITES for r in done[s]])}
            for done, overrides in zip(records, configs)]
    for row in rows:
        row.update(relative(row, rows[0]))
    return rows


def print_demo(rows: list[dict]) -> None:
    header = ["model", "config", "qa acc (Δ pts)", "math acc (Δ pts)", "passes/answer (×)", "equiv/answer (×)",
              "tokens/step", "wall/answer ms (×)"]
    print(markdown(header, [[
        r["model"], label(r["cache"], r["threshold"], r["refresh_after"]),
        *(f"{r[s]:.3f} ({r[f'{s}_delta_pts']:+.1f})" for s in SUITES),
        f"{r['passes']:.1f} ({r['passes_ratio']:.2f})", f"{r['equivalents']:.2f} ({r['equivalents_ratio']:.2f})",
        f"{r['tokens_per_step']:.2f}", f"{r['wall_ms']:.1f} ({r['wall_ms_ratio']:.2f})"] for r in rows]), flush=True)


# ---- (b) the 8B-shaped model -----------------------------------------------------------------------------

def large_model(demo, dtype: torch.dtype):
    """The random 2-block 8B-shaped module behind the demo's tokenizer and special tokens."""
    from dllm_studio.models.llada import LLaDA

    module = build("large").to(dtype)
    cfg = module.config
    return LLaDA(module, demo.tokenizer, config=cfg.raw, path=demo.path, source="random LLaDA-8B-shaped, 2 blocks",
                 mask_token_id=demo.mask_token_id, stop_token_ids=demo.stop_token_ids,
                 context_length=cfg.max_sequence_length, hidden_size=cfg.d_model, num_layers=cfg.n_layers,
                 vocab_size=cfg.vocab_size)


def large_rows(model, prompt_length: int, generation: dict, rounds: int) -> list[dict]:
    """Each cache's answer to one random prompt, timed `rounds` times interleaved (median wall)."""
    from dllm_studio import jobs
    from dllm_studio.sampling import GenerationConfig

    specials = {model.mask_token_id, *model.stop_token_ids}
    vocabulary = torch.tensor([t for t in range(model.vocab_size) if t not in specials])
    picks = torch.randint(0, len(vocabulary), (prompt_length,), generator=torch.Generator().manual_seed(0))
    prompt = vocabulary[picks].tolist()
    configs = {cache: GenerationConfig(**generation, cache=cache) for cache in CACHES}
    model.forward(torch.tensor([prompt + [model.mask_token_id] * generation["gen_length"]]))  # warm-up
    walls, stats = {c: [] for c in CACHES}, {}
    for _ in range(rounds):
        for cache, config in configs.items():
            stats[cache] = jobs.run(model.denoise(prompt, config)).stats
            walls[cache].append(stats[cache].wall_time_s)
            print(f"  {cache}: {stats[cache].wall_time_s:.1f} s", file=sys.stderr, flush=True)
    rows = [{"cache": c, "wall_s": statistics.median(walls[c]), "walls_s": walls[c],
             "passes": stats[c].forward_passes, "equivalents": stats[c].forward_equivalents,
             "tokens_per_step": stats[c].tokens_per_step, "cache_refreshes": stats[c].cache_refreshes,
             "cache_bytes": stats[c].cache_bytes} for c in CACHES]
    for row in rows:
        row["wall_ratio"] = row["wall_s"] / rows[0]["wall_s"]
    return rows


def print_large(rows: list[dict]) -> None:
    header = ["cache", "wall/answer s", "× none", "passes", "equiv", "tokens/step", "refreshes", "cache MB"]
    print(markdown(header, [[
        r["cache"], f"{r['wall_s']:.1f}", f"{r['wall_ratio']:.2f}", str(r["passes"]), f"{r['equivalents']:.2f}",
        f"{r['tokens_per_step']:.2f}", str(r["cache_refreshes"]), f"{r['cache_bytes'] / 2**20:.1f}"] for r in rows]))


# ---- main -------------------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    only = parser.add_mutually_exclusive_group()
    only.add_argument("--demo-only", action="store_true")
    only.add_argument("--large-only", action="store_true")
    parser.add_argument("--limit", type=int, help="demo: items per suite (default: all of the test split)")
    parser.add_argument("--demo-gen-length", type=int, default=64)
    parser.add_argument("--demo-block-length", type=int, default=32)
    parser.add_argument("--demo-steps", type=int, default=64, help="default: one token per step")
    parser.add_argument("--w8a8", choices=("smoothquant", "rtn"), default="smoothquant")
    parser.add_argument("--grid", choices=("full", "threshold"), default="full",
                        help="demo: every config, or the baseline and the threshold rows (minutes instead of ~40)")
    parser.add_argument("--prompt-length", type=int, default=256, help="8B-shaped: random prompt tokens")
    parser.add_argument("--gen-length", type=int, default=256, help="8B-shaped")
    parser.add_argument("--block-length", type=int, default=32, help="8B-shaped")
    parser.add_argument("--steps", type=int, default=256, help="8B-shaped: a multiple of gen/block (default: one "
                        "token per step; uncached that is ~18 min on a 2-core AVX2 CPU)")
    parser.add_argument("--rounds", type=int, default=1, help="8B-shaped: interleaved timings per cache (median)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from dllm_studio.errors import InvalidSettingsError
    from dllm_studio.hardware import cpu_units
    from dllm_studio.sampling import GenerationConfig

    demo = {"gen_length": args.demo_gen_length, "block_length": args.demo_block_length, "steps": args.demo_steps}
    large = {"gen_length": args.gen_length, "block_length": args.block_length, "steps": args.steps}
    for generation in (demo, large):  # refused now, not after the other part's minutes
        try:
            GenerationConfig(**generation).validate()
        except InvalidSettingsError as exc:
            parser.error(str(exc))
    fast = torch.bfloat16 if cpu_units().fast_bf16 else torch.float32
    print(f"# {cpu_units().line()}; torch {torch.__version__}; "
          f"fastest full precision here: {str(fast).removeprefix('torch.')}")
    report: dict = {"cpu": cpu_units().line(), "threads": torch.get_num_threads()}
    if not args.large_only:
        grid = DEMO_CONFIGS if args.grid == "full" else [DEMO_CONFIGS[0], *THRESHOLD_GRID]
        report["demo"] = run_demo(demo, args.limit, args.w8a8, grid)
    if not args.demo_only:
        report["large"] = run_large(large, args.prompt_length, args.rounds, fast)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")


def run_demo(generation: dict, limit: int | None, w8a8: str, grid: list[dict]) -> dict:
    items = "" if limit is None else f", first {limit} items each"
    print(f"\n## demo: {' and '.join(SUITES)} test splits{items}; gen {generation['gen_length']}, block "
          f"{generation['block_length']}, steps {generation['steps']} (a ceiling with a threshold); greedy, "
          "low-confidence remasking")
    print("Ratios (×) and accuracy deltas are against the same model's `none · fixed` row; costs are per answer "
          "over both suites; wall is the sampler's own time.\n")
    rows = []
    for name, model in demo_models(w8a8):
        rows += demo_rows(model, name, generation, limit, grid)
        print_demo(rows[-len(grid):])
        print()
    return {"settings": {**generation, "limit": limit, "w8a8": w8a8, "grid": grid}, "rows": rows}


def run_large(generation: dict, prompt_length: int, rounds: int, dtype: torch.dtype) -> dict:
    from dllm_studio.models import load_model

    model = large_model(load_model("demo"), dtype)
    print(f"\n## random LLaDA-8B-shaped model, 2 blocks ({model.num_parameters() / 1e6:.0f}M parameters, "
          f"{str(dtype).removeprefix('torch.')}): prompt {prompt_length} random tokens, gen "
          f"{generation['gen_length']}, block {generation['block_length']}, steps {generation['steps']}, threshold "
          f"off (random weights are rarely confident enough for a threshold to fire); {rounds} round(s), timed "
          "for real\n", flush=True)
    rows = large_rows(model, prompt_length, generation, rounds)
    print_large(rows)
    return {"settings": {**generation, "prompt_length": prompt_length, "rounds": rounds, "dtype": str(dtype)},
            "rows": rows}

if __name__ == "__main__":
    main()
