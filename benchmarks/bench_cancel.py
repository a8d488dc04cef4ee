"""How long Cancel takes to stop a quantization, per method, and whether it leaves the loaded model as it was.

A random LLaDA checkpoint (by default 2 blocks of the 8B's shape: d_model 4096, MLP 12288, bf16; built by
`bench_streaming.make_checkpoint` into the work folder, or reused from there) is loaded once. For each method,
`quantize` runs on a thread with the default calibration (32 x 256); after `--after` seconds the token is
cancelled and the time until the job raises `Cancelled` is measured, with the last event it had reported (where
the cancel landed) and whether a hash of every weight is the same as before. The issue's target: under 2 s.

`--face` chooses who presses cancel: `engine` (the token, as above), `cli` (`dllm-studio quantize` in a
subprocess gets SIGINT `--after` seconds after it said its weights were loaded; measured until it exits, which
must be with 130 and no output folder) or `gui` (the main window, offscreen, runs the Quantize page; Run > Stop,
what Esc triggers, `--after` seconds after Start; measured until the session is idle again and the page says
"cancelled", with the open model's weights hashed as in the engine face).

    python benchmarks/bench_cancel.py [--work DIR] [--after 20] [--methods awq gptq ...] [--face engine|cli|gui]
                                      [--blocks 2 --d-model 4096 --mlp 12288] [--json OUT]
    python benchmarks/bench_cancel.py --work /tmp/tiny --d-model 256 --mlp 768 --after 1   # checks the script
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
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


def cli_latency(folder: Path, recipe, after: float, out: Path) -> dict:
    """`dllm-studio quantize` in a subprocess, interrupted `after` seconds after its weights were loaded."""
    command = [sys.executable, "-m", "dllm_studio.cli", "quantize", str(folder), "--method", recipe.method,
               "--wbits", str(recipe.wbits), "--abits", str(recipe.abits), "--calib-samples", str(recipe.calib_samples),
               "--seq-len", str(recipe.seq_len), "--out", str(out), "--streaming", "off", "--force"]
    shutil.rmtree(out, ignore_errors=True)  # a folder left from an earlier run would pass for this one's output
    # A job started in the background by a shell inherits SIGINT ignored (POSIX), and Python then leaves it so:
    # the child gets the default back, as a terminal's foreground command has it.
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines, progressing = [], threading.Event()

    def read() -> None:
        for line in proc.stdout:
            lines.append(line.rstrip())
            if line.strip() == "ready":  # the weights are loaded: quantization starts
                progressing.set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    progressing.wait(120)  # a load this slow still gets its SIGINT, a little later into the run
    time.sleep(after)
    pressed = time.perf_counter()
    proc.send_signal(signal.SIGINT)
    code = proc.wait()
    ended = time.perf_counter()
    reader.join(5)
    row = {"method": recipe.method, "setting": f"W{recipe.wbits}A{recipe.abits}",
           "outcome": "cancelled" if code == 130 else f"exit {code}",
           "last_event": next((l for l in reversed(lines[:-1]) if l.strip()), ""), "said": lines[-1] if lines else "",
           "output_absent": not out.exists()}
    if code == 130:
        row["latency_s"] = round(ended - pressed, 3)
    return row


def gui_latency(window, recipe, after: float) -> dict:
    """The window's Quantize page runs `recipe`; Run > Stop `after` seconds after Start, timed until idle."""
    from PySide6.QtWidgets import QApplication

    from ui.pages.quantize import ABITS_ROLE

    page, session = window.quantize, window.session

    def pump(until, limit: float) -> bool:
        deadline = time.perf_counter() + limit
        while not until() and time.perf_counter() < deadline:
            QApplication.processEvents()
            time.sleep(0.005)
        return until()

    window.show_page("quantize")
    page.method.setCurrentIndex(page.method.findData(recipe.method))
    page.bits.setCurrentIndex(next(i for i in range(page.bits.count()) if page.bits.itemData(i) == recipe.wbits
                                   and page.bits.itemData(i, ABITS_ROLE) == recipe.abits))
    page.samples.setValue(recipe.calib_samples)
    page.seq_len.setValue(recipe.seq_len)
    page.start_button.click()
    started = pump(lambda: session.busy, 30)
    pump(lambda: not session.busy, after)
    if not session.busy:
        return {"method": recipe.method, "outcome": "finished" if started else "did not start",
                "last_event": page.progress.text()}
    last = page.progress.text()
    pressed = time.perf_counter()
    window.stop_action.trigger()  # what Esc does
    pump(lambda: not session.busy, 600)
    ended = time.perf_counter()
    said = page.progress.text()
    row = {"method": recipe.method, "setting": f"W{recipe.wbits}A{recipe.abits}",
           "outcome": "cancelled" if said.startswith("cancelled") else said, "last_event": last}
    if row["outcome"] == "cancelled":
        row["latency_s"] = round(ended - pressed, 3)
    return row


def open_window(folder: Path):
    """The main window (offscreen), settings in a scratch folder, with `folder` opened."""
    import tempfile

    os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
    from PySide6.QtCore import QSettings
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    QSettings.setPath(QSettings.Format.IniFormat, QSettings.Scope.UserScope, tempfile.mkdtemp())
    from ui.app import create_window
    from ui.settings import Settings

    window = create_window(str(folder), Settings())
    window.show()
    deadline = time.perf_counter() + 600
    while (window.session.model is None or window.session.busy) and time.perf_counter() < deadline:
        app.processEvents()
        time.sleep(0.01)
    return app, window


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
    parser.add_argument("--face", choices=("engine", "cli", "gui"), default="engine",
                        help="who cancels: the token, Ctrl-C on the CLI, or Run > Stop in the window")
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
    if args.face == "gui":
        sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
        app, window = open_window(folder)
        model = window.session.model
    else:  # the CLI face's subprocess loads its own; this one is only for the dtype line
        model = load_model(folder, device="meta" if args.face == "cli" else "cpu", check_memory=False)
    print(f"{folder}: {args.blocks} blocks, d_model {args.d_model}, MLP {args.mlp}, {model.dtype}; "
          f"calibration {args.calib[0]} x {args.calib[1]}; {args.face} cancels "
          f"{', '.join(f'{a:g}' for a in args.after)} s in")
    before = None if args.face == "cli" else weights_hash(model)
    rows = []
    runs = [(m, after) for m in args.methods or [m for m in OWN if m in METHODS] for after in args.after]
    for method, after in runs:
        recipe = recipe_for(method, *args.calib)
        if args.face == "cli":
            row = cli_latency(folder, recipe, after, Path(args.work) / f"cancel-{method}")
        elif args.face == "gui":
            row = gui_latency(window, recipe, after)
        else:
            row = cancel_latency(model, recipe, after)
        row["after_s"] = after
        if before is not None:
            row["weights_unchanged"] = weights_hash(model) == before
            left = f"weights unchanged: {'yes' if row['weights_unchanged'] else 'NO'}"
        else:
            left = f"output folder {'absent' if row['output_absent'] else 'LEFT'}, said {row['said']!r}"
        rows.append(row)
        latency = (f"Cancelled {row['latency_s']:6.3f} s after cancel()" if "latency_s" in row
                   else f"{row['outcome']} before the cancel")
        print(f"  {method:12} {row['setting']:6} at {after:5g} s: {latency:34}  {left}  (last event: "
              f"{row['last_event']})", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps({"cpu": cpu_units().line(), "threads": threads, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
