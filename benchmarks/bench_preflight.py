"""Does the memory preflight hold? Per method, the estimate the Quantize page shows against the measured peak.

Each method runs in a fresh process: the model is loaded (as the GUI holds it when you press Start), the kernel's
high-water mark of resident memory is reset (/proc/self/clear_refs), the model is quantized, and the mark is read
back. The estimate is what the preflight says the run needs beyond what is resident (`working_set` less the loaded
model; streaming: all of it, as nothing is loaded); the measured figure is the high-water mark less the RSS at
Start. Printed per method: both, their ratio, the part the estimate says dominates, and whether it held.

    python benchmarks/bench_preflight.py [--model DIR | --work DIR] [--methods gptq:w4a16 awq:w4a16 ...]
                                         [--calib 32 256] [--streaming] [--json OUT]

Default model: the random LLaDA-8B-shaped checkpoint of 2 blocks (d_model 4096, MLP 12288) that
bench_streaming.py builds (in --work, reused if there). Linux only (VmHWM).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

METHODS = ("rtn:w4a16", "gptq:w4a16", "awq:w4a16", "tlq:w4a16", "smoothquant:w8a8", "quarot:w4a4",
           "duquant:w4a4", "ars:w4a4")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(model_path: str, method: str, setting: str, samples: int, seq_len: int, streaming: bool, out: str) -> None:
    from dllm_studio import jobs
    from dllm_studio.models import load_model
    from dllm_studio.quant.pipeline import quantize, working_set
    from dllm_studio.quant.recipe import QuantRecipe
    from dllm_studio.study import parse_setting

    wbits, abits = parse_setting(setting)
    recipe = QuantRecipe(method=method, wbits=wbits, abits=abits, calib_samples=samples, seq_len=seq_len).validate()
    model = load_model(model_path, device="meta" if streaming else "cpu", check_memory=False)
    parts = working_set(model, recipe, streaming=streaming)
    if not streaming:
        parts.pop("model")  # resident already, as in the GUI
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    at_start = _status("VmRSS")
    started = time.perf_counter()
    if streaming:
        from dllm_studio.quant.streaming import quantize_to_folder

        jobs.run(quantize_to_folder(model, recipe, out, force=True, resume=False))
    else:
        jobs.run(quantize(model, recipe))
    print(json.dumps({"estimate": sum(parts.values()), "parts": parts, "measured": _status("VmHWM") - at_start,
                      "rss_at_start": at_start, "seconds": time.perf_counter() - started}))


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="a checkpoint folder (default: the 2-block 8B-shaped one, built in --work)")
    parser.add_argument("--work", default=str(Path.home() / ".cache" / "dllm-bench"), help="where checkpoints live")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), metavar="METHOD:SETTING")
    parser.add_argument("--calib", nargs=2, type=int, default=(32, 256), metavar=("SAMPLES", "SEQ"))
    parser.add_argument("--streaming", action="store_true", help="the streaming preflight instead")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        model, method, setting, samples, seq, streaming, out = args.child
        child(model, method, setting, int(samples), int(seq), streaming == "1", out)
        return
    import torch

    from bench_streaming import make_checkpoint
    from dllm_studio.hardware import cpu_units

    model = Path(args.model) if args.model else make_checkpoint(Path(args.work) / "llada-2-blocks", 2, 4096)
    print(f"CPU: {cpu_units().line()}; {torch.get_num_threads()} threads; model {model}; calibration "
          f"{args.calib[0]} x {args.calib[1]}; {'streaming' if args.streaming else 'in memory'}")
    rows = {}
    for entry in args.methods:
        method, setting = entry.split(":")
        out = Path(args.work) / f"preflight-{method}"
        proc = subprocess.run([sys.executable, __file__, "--child", str(model), method, setting, *map(str, args.calib),
                               "1" if args.streaming else "0", str(out)], capture_output=True, text=True)
        if proc.returncode:
            print(f"{entry}: failed\n{proc.stderr[-2000:]}")
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        top = max(row["parts"], key=row["parts"].get)
        held = row["estimate"] >= row["measured"]
        print(f"{entry:18s} estimate {gb(row['estimate'])}  measured {gb(row['measured'])}  "
              f"({row['measured'] / row['estimate']:.2f}x)  {'holds' if held else 'LOW'}; dominated by {top} "
              f"{gb(row['parts'][top])}; {row['seconds']:.0f} s", flush=True)
        rows[entry] = {**row, "holds": held}
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
