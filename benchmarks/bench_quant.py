"""What quantizing costs, and how fast the quantized model runs, measured side by side in one run.

For the bundled demo model and a larger random LLaDA-shaped model (default 12 blocks x 1024 hidden,
written to a temporary folder like a real checkpoint), and for each method:
  1. quantize it in a fresh process (so each peak RSS is its own) and save the result: wall time, peak RSS;
  2. time one denoising step (a forward pass over prompt + gen_length tokens) of the original at bf16
     and fp32 and of every quantized model at bf16 and fp32, interleaved round-robin, medians;
and print the quantized steps as ratios to the original at the same dtype, measured in this run.

    python benchmarks/bench_quant.py [--methods rtn gptq awq] [--wbits 4] [--large-blocks 12]
                                     [--large-hidden 1024] [--skip-large] [--rounds 5] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "resources" / "models" / "demo"


def make_large(folder: Path, blocks: int, hidden: int) -> Path:
    """A random LLaDA-architecture checkpoint with the demo's tokenizer (so calibration text encodes)."""
    from safetensors.torch import save_file

    from dllm_studio.models.llada import LLaDAConfig, LLaDAModelLM

    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((DEMO / "config.json").read_text())
    config.update(d_model=hidden, n_layers=blocks, n_heads=hidden // 64, n_kv_heads=hidden // 64,
                  mlp_hidden_size=(int(hidden * 8 / 3) + 127) // 128 * 128, torch_dtype="float32")
    torch.manual_seed(0)
    module = LLaDAModelLM(LLaDAConfig.from_dict(config))
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in DEMO.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
            shutil.copy2(f, folder / f.name)
    return folder


def child(model: str, method: str, wbits: int, samples: int, seq_len: int, out: str) -> None:
    """Quantize in this (fresh) process and report seconds and peak RSS as one JSON line."""
    from dllm_studio import jobs
    from dllm_studio.memory import peak_rss_bytes
    from dllm_studio.models import load_model
    from dllm_studio.quant.export import save_quantized
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    loaded = load_model(model, dtype="float32")
    start = time.perf_counter()
    result = jobs.run(quantize(loaded, QuantRecipe(method=method, wbits=wbits, calib_samples=samples, seq_len=seq_len)))
    seconds = time.perf_counter() - start
    save_quantized(result.model, out, force=True, profile={"summary": result.summary})
    print(json.dumps({"seconds": seconds, "peak_rss_bytes": peak_rss_bytes(),
                      "bits_per_weight": result.summary["bits_per_weight"],
                      "linear_bytes_before": result.summary["linear_bytes_before"],
                      "linear_bytes_after": result.summary["linear_bytes_after"]}))


def step_latency(models: dict[str, object], length: int, rounds: int) -> dict[str, float]:
    """Median ms of one forward pass per model, interleaved so drift hits every model alike."""
    times: dict[str, list[float]] = {name: [] for name in models}
    for name, model in models.items():  # warm-up
        model.forward(torch.full((1, length), 5))
    for _ in range(rounds):
        for name, model in models.items():
            x = torch.full((1, length), 5)
            t0 = time.perf_counter()
            model.forward(x)
            times[name].append((time.perf_counter() - t0) * 1000)
    return {name: statistics.median(v) for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", nargs="+", default=["rtn", "gptq", "awq"])
    parser.add_argument("--wbits", type=int, default=4)
    parser.add_argument("--large-blocks", type=int, default=12)
    parser.add_argument("--large-hidden", type=int, default=1024)
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--length", type=int, default=96, help="tokens per denoising step (prompt + gen_length)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--child", nargs=6, metavar=("MODEL", "METHOD", "BITS", "SAMPLES", "SEQ", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, method, bits, samples, seq, out = args.child
        child(model, method, int(bits), int(samples), int(seq), out)
        return

    from dllm_studio.models import load_model

    work = Path(tempfile.mkdtemp(prefix="bench_quant_"))
    targets = [("demo", str(DEMO), 32, 256)]
    if not args.skip_large:
        name = f"random-{args.large_blocks}x{args.large_hidden}"
        targets.append((name, str(make_large(work / name, args.large_blocks, args.large_hidden)), 16, 128))
    report = {"device": "cpu", "threads": torch.get_num_threads(), "wbits": args.wbits, "models": {}}
    try:
        for label, path, samples, seq in targets:
            rows = {}
            for method in args.methods:
                out = work / f"{label}-{method}"
                proc = subprocess.run([sys.executable, __file__, "--child", path, method, str(args.wbits), str(samples),
                                       str(seq), str(out)], capture_output=True, text=True, check=True)
                rows[method] = json.loads(proc.stdout.strip().splitlines()[-1])
            models = {}
            for dtype in ("bfloat16", "float32"):
                models[f"original {dtype}"] = load_model(path, dtype=dtype)
                for method in args.methods:
                    models[f"{method} {dtype}"] = load_model(work / f"{label}-{method}", dtype=dtype)
            latency = step_latency(models, args.length, args.rounds)
            report["models"][label] = {"quantize": rows, "step_ms": latency}
            _print(label, args.wbits, rows, latency)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


def _print(label: str, wbits: int, rows: dict, latency: dict) -> None:
    from dllm_studio.memory import human

    print(f"\n{label}: W{wbits} g128, {torch.get_num_threads()} threads")
    print(f"{'method':<8}{'quantize s':>11}{'peak RSS':>11}{'bits/w':>8}{'linears':>22}"
          f"{'step bf16':>11}{'x bf16':>8}{'step fp32':>11}{'x fp32':>8}")
    base16, base32 = latency["original bfloat16"], latency["original float32"]
    print(f"{'original':<8}{'-':>11}{'-':>11}{'-':>8}{'-':>22}{base16:>9.1f}ms{1:>8.2f}{base32:>9.1f}ms{1:>8.2f}")
    for method, r in rows.items():
        q16, q32 = latency[f"{method} bfloat16"], latency[f"{method} float32"]
        sizes = f"{human(r['linear_bytes_before'])} -> {human(r['linear_bytes_after'])}"
        print(f"{method:<8}{r['seconds']:>11.1f}{human(r['peak_rss_bytes']):>11}{r['bits_per_weight']:>8.3f}{sizes:>22}"
              f"{q16:>9.1f}ms{q16 / base16:>8.2f}{q32:>9.1f}ms{q32 / base32:>8.2f}")


if __name__ == "__main__":
    main()
