"""How long Cancel takes to stop a quantization, per method, and whether it leaves the loaded model as it was.

A random LLaDA checkpoint (by default 2 blocks of the 8B's shape: d_model 4096, MLP 12288, bf16; built by
`bench_streaming.make_checkpoint` into the work folder, or reused from there) is loaded once. For each method,
`quantize` runs on a thread with the default calibration (32 x 256); after `--after` seconds the token is
cancelled and the time until the job raises `Cancelled` is measured, with the last event it had reported (where
the cancel landed) and whether a hash of every weight is the same as before. The issue's target: under 2 s.

    python benchmarks/bench_cancel.py [--work DIR] [--after 20] [--methods awq gptq ...]
                                      [--blocks 2 --d-model 4096 --mlp 12288] [--json OUT]
    python benchmarks/bench_cancel.py --work /tmp/tiny --d-model 256 --mlp 768 --after 1   # checks the script
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_streaming import make_checkpoint  # noqa: E402

OWN = ("rtn", "gptq", "awq", "smoothquant", "quarot", "duquant", "tlq", "ars")


def weights_hash(model) -> str:
    """One digest over every tensor of the module, bit for bit."""
    digest = hashlib.sha256()
    for name, tensor in model.module.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def recipe_for(method: str, samples: int, seq_len: int):
    """The method at 4-bit weights: weight-only where it offers that, else W4A4."""
    from dllm_studio.quant.methods import METHODS
    from dllm_studio.quant.recipe import QuantRecipe

    wbits, abits = (4, 16) if (4, 16) in METHODS[method].settings else (4, 4)
    return QuantRecipe(method=method, wbits=wbits, abits=abits, calib_samples=samples, seq_len=seq_len)


def cancel_latency(model, recipe, after: float) -> dict:
    """Run `quantize` on a thread, cancel it `after` seconds in: the seconds until it raised Cancelled."""
    from dllm_studio import jobs
    from dllm_studio.errors import Cancelled
    from dllm_studio.events import CancelToken
    from dllm_studio.quant.pipeline import quantize

    token, last, ended = CancelToken(), [], {}

    def on_event(event) -> None:
        if type(event).__name__ != "MemorySample":
            where = getattr(event, "doing", None) or getattr(event, "name", getattr(event, "block", ""))
            last[:] = [f"{type(event).__name__} {where}"]

    def work() -> None:
        try:
            jobs.run(quantize(model, recipe, token), on_event)
            ended["outcome"] = "finished"
        except Cancelled:
            ended["outcome"] = "cancelled"
        except Exception as exc:  # reported, not raised: the other methods still run
            ended["outcome"] = f"failed: {type(exc).__name__}: {exc}"
        ended["at"] = time.perf_counter()

    thread = threading.Thread(target=work, name=f"quantize-{recipe.method}")
    thread.start()
    thread.join(after)
    pressed = time.perf_counter()
    token.cancel()
    thread.join()
    row = {"method": recipe.method, "setting": f"W{recipe.wbits}A{recipe.abits}", "outcome": ended["outcome"],
           "last_event": last[0] if last else "none"}
    if ended["outcome"] == "cancelled":
        row["latency_s"] = round(ended["at"] - pressed, 3)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", metavar="DIR", default=str(Path.home() / ".cache" / "dllm-bench"),
                        help="where the checkpoint is built or found (default ~/.cache/dllm-bench)")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--d-model", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=12288)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--after", type=float, nargs="+", default=[20.0], metavar="S",
                        help="seconds into a run to cancel; several: a run per method for each")
    parser.add_argument("--methods", nargs="+", metavar="METHOD", help=f"default: those of {', '.join(OWN)} that exist")
    parser.add_argument("--calib", nargs=2, type=int, default=(32, 256), metavar=("SAMPLES", "SEQ"))
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads (default: as the app)")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args()

    from dllm_studio.hardware import cpu_units
    from dllm_studio.models import load_model
    from dllm_studio.quant.methods import METHODS
    from dllm_studio.threads import use_threads

    threads = use_threads(args.threads)
    print(f"CPU: {cpu_units().line()}; torch {torch.__version__}, {threads} threads")
    shape = "" if (args.d_model, args.mlp) == (4096, 12288) else f"-{args.d_model}x{args.mlp}"
    folder = make_checkpoint(Path(args.work) / f"llada-{args.blocks}-blocks{shape}", blocks=args.blocks,
                             vocab=args.vocab, d_model=args.d_model, mlp=args.mlp)
    model = load_model(folder, check_memory=False)
    print(f"{folder}: {args.blocks} blocks, d_model {args.d_model}, MLP {args.mlp}, {model.dtype}; "
          f"calibration {args.calib[0]} x {args.calib[1]}; cancel {', '.join(f'{a:g}' for a in args.after)} s in")
    before = weights_hash(model)
    rows = []
    runs = [(m, after) for m in args.methods or [m for m in OWN if m in METHODS] for after in args.after]
    for method, after in runs:
        row = {**cancel_latency(model, recipe_for(method, *args.calib), after), "after_s": after}
        row["weights_unchanged"] = weights_hash(model) == before
        rows.append(row)
        latency = (f"Cancelled {row['latency_s']:6.3f} s after cancel()" if "latency_s" in row
                   else f"{row['outcome']} before the cancel")
        print(f"  {method:12} {row['setting']:6} at {after:5g} s: {latency:34}  weights unchanged: "
              f"{'yes' if row['weights_unchanged'] else 'NO'}  (last event: {row['last_event']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_units().line(), "threads": threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
