"""How true the quantization's progress is: the ETA it shows against the time that really remained.

Each method quantizes a random LLaDA checkpoint (by default 2 blocks of the 8B's shape, built by
`bench_streaming.make_checkpoint` in the work folder or reused from there); every `Progress` event's fraction
and ETA are recorded with the time they came. At the end, for each event after the first 10 % of the run's wall
time, the ETA is compared with the time that actually remained. Printed per method: the run's time, the ETA's
error at 10/25/50/75/90 % of the run and the worst after 10 % (the issue's target: within ±30 %), and how far the
work fraction was from the time fraction at those points.

    python benchmarks/bench_eta.py [--work DIR] [--methods gptq awq ...] [--calib 32 256] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_cancel import recipe_for  # noqa: E402
from bench_streaming import make_checkpoint  # noqa: E402

POINTS = (0.10, 0.25, 0.50, 0.75, 0.90)


def trace(model, recipe) -> tuple[float, list[tuple[float, float, float | None]]]:
    """Quantize; (wall seconds, [(seconds in, fraction, eta) per Progress event])."""
    from dllm_studio import jobs
    from dllm_studio.events import Progress
    from dllm_studio.quant.pipeline import quantize

    started, seen = time.perf_counter(), []

    def on_event(event) -> None:
        if isinstance(event, Progress):
            seen.append((time.perf_counter() - started, event.fraction, event.eta_s))

    jobs.run(quantize(model, recipe), on_event)
    return time.perf_counter() - started, seen


def errors(total: float, seen: list[tuple[float, float, float | None]]) -> dict:
    """The ETA's relative error (shown − true) / true, and the work fraction less the time fraction, at each of
    POINTS (the last event before it), and the worst ETA error after 10 % of the run."""
    def at(point: float):
        before = [s for s in seen if s[0] <= point * total and s[2] is not None]
        return before[-1] if before else None

    rows = {}
    for point in POINTS:
        event = at(point)
        if event is not None:
            t, fraction, eta = event
            rows[f"{point:.0%}"] = {"eta_error": (eta - (total - t)) / (total - t), "fraction_minus_time": fraction - t / total}
    late = [(eta - (total - t)) / (total - t) for t, _, eta in seen
            if eta is not None and t >= 0.1 * total and total - t > 1.0]  # the last second's ratio is noise
    return {"points": rows, "worst_after_10%": max(late, key=abs) if late else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "dllm-bench"))
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=12288)
    parser.add_argument("--methods", nargs="+", default=["gptq", "awq", "rtn"])
    parser.add_argument("--calib", nargs=2, type=int, default=(32, 256), metavar=("SAMPLES", "SEQ"))
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from dllm_studio.hardware import cpu_units
    from dllm_studio.models import load_model

    shape = "" if (args.d_model, args.mlp) == (4096, 12288) else f"-{args.d_model}x{args.mlp}"
    folder = make_checkpoint(Path(args.work) / f"llada-{args.blocks}-blocks{shape}", blocks=args.blocks, vocab=4096,
                             d_model=args.d_model, mlp=args.mlp)
    model = load_model(folder, check_memory=False)
    print(f"CPU: {cpu_units().line()}; {torch.get_num_threads()} threads; {folder.name}, calibration "
          f"{args.calib[0]} x {args.calib[1]}")
    report = {}
    for method in args.methods:
        total, seen = trace(model, recipe_for(method, *args.calib))
        row = errors(total, seen)
        report[method] = {"seconds": total, "events": len(seen), **row}
        points = "  ".join(f"{p} {v['eta_error']:+.0%} (work−time {v['fraction_minus_time']:+.2f})"
                           for p, v in row["points"].items())
        worst = row["worst_after_10%"]
        print(f"{method:6s} {total:7.0f} s, {len(seen)} events; ETA error at {points}; worst after 10 %: "
              f"{'—' if worst is None else f'{worst:+.0%}'}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
