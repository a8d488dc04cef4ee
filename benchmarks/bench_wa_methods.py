"""What the weight-and-activation methods do, side by side in one run: errors, outliers, and demo accuracy.

For the bundled demo and for the demo with planted outliers (`quant.planted`: 4 channels of every block
linear's input scaled 50-100x, the readers' weights scaled back, so full precision is unchanged), each method
and setting is quantized with the same calibration, and printed:
- the mean relative output error of the quantized linears on their calibration inputs, activations rounded
  as the layers round them (`LayerQuantized.relative_error`), and its ratio to round-to-nearest's;
- the relative error of the whole model's logits against full precision on held-out token windows;
- for methods that change the linears' inputs, the mean kurtosis and max/median channel ratio of those
  inputs before -> after (the point of rotating), and LRQ-DiT ARS's per-layer choices;
- with --accuracy, the demo's qa and math accuracy of each quantized model against full precision.
Also twin-log (TLQ) against uniform RTN weight error on Gaussian-with-long-tails weights.

    python benchmarks/bench_wa_methods.py [--accuracy] [--limit N] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SETTINGS = [("rtn", 8, 8), ("smoothquant", 8, 8), ("quarot", 8, 8), ("duquant", 8, 8),
            ("rtn", 4, 8), ("smoothquant", 4, 8), ("quarot", 4, 8), ("duquant", 4, 8), ("ars", 4, 8),
            ("rtn", 4, 4), ("smoothquant", 4, 4), ("quarot", 4, 4), ("duquant", 4, 4), ("ars", 4, 4)]
ACCURACY = [("smoothquant", 8, 8), ("rtn", 8, 8), ("smoothquant", 4, 4), ("quarot", 4, 4), ("duquant", 4, 4),
            ("ars", 4, 4), ("rtn", 4, 4)]


def quantized(model, method, wbits, abits):
    from dllm_studio import jobs
    from dllm_studio.events import LayerQuantized, LayerTransformed
    from dllm_studio.quant.pipeline import quantize
    from dllm_studio.quant.recipe import QuantRecipe

    events = []
    started = time.perf_counter()
    result = jobs.run(quantize(model, QuantRecipe(method=method, wbits=wbits, abits=abits)), events.append)
    errors = [e.relative_error for e in events if isinstance(e, LayerQuantized)]
    moved = [e for e in events if isinstance(e, LayerTransformed)]
    return result.model, {
        "seconds": round(time.perf_counter() - started, 1),
        "layer_error": sum(errors) / len(errors),
        "kurtosis": (_mean(e.kurtosis_before for e in moved), _mean(e.kurtosis_after for e in moved)) if moved else None,
        "max_median": (_mean(e.outlier_ratio_before for e in moved), _mean(e.outlier_ratio_after for e in moved))
        if moved else None,
        "choices": _count(e.transform for e in moved) if method == "ars" else None,
    }


def _mean(values):
    values = list(values)
    return sum(values) / len(values)


def _count(names):
    counts: dict[str, int] = {}
    for n in names:
        counts[n] = counts.get(n, 0) + 1
    return counts


def logits_error(model, reference_model, ids) -> float:
    ref = reference_model.forward(ids)
    return float((model.forward(ids) - ref).norm() / ref.norm())


def accuracy(model, suite: str, limit: int | None) -> float:
    from dllm_studio import jobs
    from dllm_studio.eval.runner import evaluate

    return jobs.run(evaluate(model, suite, limit=limit)).accuracy


def twin_log_vs_rtn() -> list[dict]:
    from dllm_studio.quant.grid import Grid, dequantize, rtn
    from dllm_studio.quant.twin_log import codebook_dequantize, twin_log

    torch.manual_seed(0)
    w = torch.distributions.StudentT(3.0).sample((512, 1024)) * 0.02  # Gaussian-like with long tails
    rows = []
    for bits in (3, 4):
        tlq = codebook_dequantize(*twin_log(w, bits))
        uniform = dequantize(*rtn(w, Grid(bits), None), None)
        grouped = dequantize(*rtn(w, Grid(bits), 128), 128)
        err = lambda a: float((a - w).norm() / w.norm())  # noqa: E731
        rows.append({"bits": bits, "tlq": err(tlq), "rtn_per_channel": err(uniform), "rtn_g128": err(grouped)})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--accuracy", action="store_true", help="also score the demo's qa and math suites")
    parser.add_argument("--limit", type=int, help="items per suite for --accuracy (default: all)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()
    torch.manual_seed(0)
    from dllm_studio.hardware import cpu_units
    from dllm_studio.models import load_model
    from dllm_studio.quant.planted import plant_outliers

    print(cpu_units().line(), f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    demo = load_model("demo")
    planted = plant_outliers(demo)
    ids = torch.randint(3, demo.vocab_size, (8, 128), generator=torch.Generator().manual_seed(7))
    report = {"errors": [], "accuracy": [], "twin_log": twin_log_vs_rtn()}
    for name, model in (("demo", demo), ("planted outliers", planted)):
        print(f"\n{name}: mean layer error (x RTN at the same setting), logits error vs full precision, "
              "inputs before -> after")
        baseline = {}
        for method, wbits, abits in SETTINGS:
            q, row = quantized(model, method, wbits, abits)
            row.update(model=name, method=method, setting=f"W{wbits}A{abits}", logits_error=logits_error(q, model, ids))
            if method == "rtn":
                baseline[row["setting"]] = row["layer_error"]
            ratio = row["layer_error"] / baseline[row["setting"]]
            moved = ""
            if row["kurtosis"]:
                moved = (f"  kurtosis {row['kurtosis'][0]:6.2f} -> {row['kurtosis'][1]:5.2f}, "
                         f"max/median {row['max_median'][0]:5.1f} -> {row['max_median'][1]:4.1f}")
            if row["choices"]:
                moved += "  " + ", ".join(f"{k} x{v}" for k, v in row["choices"].items())
            print(f"  {method:12} {row['setting']:5} layer {row['layer_error']:.4f} ({ratio:4.2f}x)  "
                  f"logits {row['logits_error']:.4f}  {row['seconds']:5.1f} s{moved}")
            report["errors"].append(row)
    print("\ntwin-log vs uniform weights, Student-t(3) x 0.02, 512 x 1024: relative weight error")
    for row in report["twin_log"]:
        print(f"  W{row['bits']}: TLQ {row['tlq']:.4f}  RTN per-channel {row['rtn_per_channel']:.4f} "
              f"({row['tlq'] / row['rtn_per_channel']:.2f}x)  RTN g128 {row['rtn_g128']:.4f}")
    if args.accuracy:
        print(f"\ndemo accuracy (test split{'' if args.limit is None else f', first {args.limit} items'})")
        fp = {suite: accuracy(demo, suite, args.limit) for suite in ("qa", "math")}
        print(f"  {'full precision':20} qa {fp['qa']:.3f}  math {fp['math']:.3f}")
        report["accuracy"].append({"method": "fp", **fp})
        for method, wbits, abits in ACCURACY:
            q, _ = quantized(demo, method, wbits, abits)
            scores = {suite: accuracy(q, suite, args.limit) for suite in ("qa", "math")}
            print(f"  {method + f' W{wbits}A{abits}':20} qa {scores['qa']:.3f} ({100 * (scores['qa'] - fp['qa']):+.1f} pts)"
                  f"  math {scores['math']:.3f} ({100 * (scores['math'] - fp['math']):+.1f} pts)")
            report["accuracy"].append({"method": method, "setting": f"W{wbits}A{abits}", **scores})
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
