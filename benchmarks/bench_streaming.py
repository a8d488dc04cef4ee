"""Quantizing models larger than memory: streaming blocks from the shards against quantizing in memory.

Each run is the CLI's `quantize` in a fresh process (so each peak RSS is its own), on random LLaDA-8B-shaped
checkpoints (d_model 4096, 32 heads, MLP 12288, bf16, sharded like the hub's) written to a work folder (never
committed), with the demo's tokenizer so the built-in calibration text encodes. Printed side by side:
  small   2 blocks (vocab 4096, ~0.94 GB), GPTQ W4 g128, default calibration (32 x 256): in memory vs
          streaming: peak RSS, seconds per block, and their ratios;
  resume  8 blocks: a streaming RTN run killed (SIGKILL) after block 3, rerun: where it resumed and whether its
          weights, config and recipe are byte-identical to an uninterrupted run's;
  8b      32 blocks, vocab 126464 (~16 GB on disk): streaming RTN W4 end to end (and GPTQ W4 with --gptq-8b,
          long): peak RSS, time, output size.

    python benchmarks/bench_streaming.py [--only small resume 8b] [--gptq-8b] [--calib-8b 8 128] [--work DIR]
                                         [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "resources" / "models" / "demo"
SHARD = "3GB"  # LLaDA-8B-Instruct's shards are a few GB each


def make_checkpoint(folder: Path, blocks: int, vocab: int, d_model: int = 4096, mlp: int = 12288) -> Path:
    """A random LLaDA checkpoint in bf16 shards with an index, written one tensor at a time (never whole)."""
    from dllm_studio import jobs
    from dllm_studio.models.llada import LLaDAConfig, LLaDAModelLM
    from dllm_studio.models.base import build_on_meta
    from dllm_studio.shards import TensorEntry, parse_size, write_sharded

    if (folder / "config.json").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((DEMO / "config.json").read_text())
    config.update(d_model=d_model, n_layers=blocks, n_heads=d_model // 128, n_kv_heads=d_model // 128,
                  mlp_hidden_size=mlp, vocab_size=vocab, embedding_size=vocab, max_sequence_length=4096,
                  torch_dtype="bfloat16")
    config.pop("single_turn", None)
    shapes = {n: tuple(t.shape) for n, t in build_on_meta(lambda: LLaDAModelLM(LLaDAConfig.from_dict(config)))
              .state_dict().items()}

    def random(index: int, shape: tuple[int, ...]):
        def load() -> torch.Tensor:
            g = torch.Generator().manual_seed(index)
            if len(shape) == 1:  # a norm's gain
                return (1 + 0.1 * torch.randn(shape, generator=g)).to(torch.bfloat16)
            return (0.02 * torch.randn(shape, generator=g)).to(torch.bfloat16)
        return load

    entries = [TensorEntry(n, torch.bfloat16, s, random(i, s)) for i, (n, s) in enumerate(shapes.items())]
    jobs.run(write_sharded(folder, entries, parse_size(SHARD), {"format": "pt"}))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    for f in DEMO.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "generation_config", "chat_template")):
            shutil.copy2(f, folder / f.name)
    return folder


def child(argv: list[str]) -> None:
    """The CLI in this (fresh) process; its peak RSS and wall time as the last line."""
    from dllm_studio.cli import main
    from dllm_studio.memory import peak_rss_bytes

    start = time.perf_counter()
    code = main(argv)
    print(json.dumps({"rc": code, "seconds": time.perf_counter() - start, "peak_rss_bytes": peak_rss_bytes()}))


def child_blocks(model: str, method: str, blocks: int, samples: int, seq_len: int, out: str) -> None:
    """Stream the first `blocks` blocks of `model` in this (fresh) process, then stop (Cancel): seconds per block
    and the peak RSS, which a block's working set sets (every block of a model is alike), as one JSON line."""
    from dllm_studio import jobs
    from dllm_studio.errors import Cancelled
    from dllm_studio.events import BlockQuantized, CancelToken
    from dllm_studio.memory import peak_rss_bytes
    from dllm_studio.models import load_model
    from dllm_studio.quant.recipe import QuantRecipe
    from dllm_studio.quant.streaming import quantize_to_folder

    cancel, times = CancelToken(), []

    def on_event(event) -> None:
        if isinstance(event, BlockQuantized):
            times.append(event.elapsed_s)
            print(f"block {event.block}/{event.blocks}  {event.elapsed_s:.1f} s", flush=True)
            if event.block == blocks:
                cancel.cancel()

    described = load_model(model, device="meta", check_memory=False)
    recipe = QuantRecipe(method=method, wbits=4, calib_samples=samples, seq_len=seq_len)
    try:
        jobs.run(quantize_to_folder(described, recipe, out, force=True, resume=False, cancel=cancel), on_event)
    except Cancelled:
        pass
    per_block = (times[-1] - times[0]) / (len(times) - 1) if len(times) > 1 else times[0]
    print(json.dumps({"blocks": len(times), "s_per_block": per_block, "peak_rss_bytes": peak_rss_bytes()}))


def quantize(model: Path, out: Path, *options: str, kill_after_block: int | None = None) -> dict:
    """Run `dllm-studio quantize` in a child; with `kill_after_block`, SIGKILL it once that block is reported."""
    argv = [sys.executable, __file__, "--child", "quantize", str(model), "--out", str(out), "--force", *options]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines, blocks = [], []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("block"):
            blocks.append(line)
            print("   ", line.rstrip(), flush=True)
            if kill_after_block is not None and len(blocks) == kill_after_block:
                os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    if kill_after_block is not None:
        return {"killed_after": len(blocks)}
    if proc.returncode:
        sys.exit("".join(lines[-30:]))
    result = json.loads(lines[-1])
    result["lines"] = lines
    return result


def per_block(run: dict) -> float:
    """Seconds per block from the CLI's block lines (elapsed at the last block over the blocks done)."""
    last = [l for l in run["lines"] if l.startswith("block")][-1].split()
    return float(last[last.index("s") - 1]) / int(last[1].split("/")[0])


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def bench_small(work: Path) -> dict:
    model = make_checkpoint(work / "llada-2-blocks", blocks=2, vocab=4096)
    recipe = ["--method", "gptq", "--wbits", "4"]
    memory = quantize(model, work / "out-memory", *recipe, "--streaming", "off")
    streamed = quantize(model, work / "out-streamed", *recipe, "--streaming", "on")
    row = {"in_memory": {"peak_rss": memory["peak_rss_bytes"], "s_per_block": per_block(memory)},
           "streaming": {"peak_rss": streamed["peak_rss_bytes"], "s_per_block": per_block(streamed)}}
    print(f"small (2 blocks, GPTQ W4 g128, 32 x 256): peak RSS in memory {gb(memory['peak_rss_bytes'])}, streaming "
          f"{gb(streamed['peak_rss_bytes'])} ({streamed['peak_rss_bytes'] / memory['peak_rss_bytes']:.2f}x); "
          f"s/block {row['in_memory']['s_per_block']:.1f} vs {row['streaming']['s_per_block']:.1f} "
          f"({row['streaming']['s_per_block'] / row['in_memory']['s_per_block']:.2f}x)")
    return row


def bench_resume(work: Path) -> dict:
    model = make_checkpoint(work / "llada-8-blocks", blocks=8, vocab=4096, d_model=1024, mlp=2816)
    recipe = ["--method", "rtn", "--wbits", "4", "--streaming", "on", "--max-shard-size", "40MB"]
    quantize(model, work / "resume-whole", *recipe)
    killed = quantize(model, work / "resume-out", *recipe, kill_after_block=3)
    resumed = quantize(model, work / "resume-out", *recipe)
    started = next(l for l in resumed["lines"] if l.startswith("streaming from"))
    compared = sorted(p.name for p in (work / "resume-whole").iterdir()
                      if p.suffix == ".safetensors" or p.name in ("config.json", "recipe.json",
                                                                   "model.safetensors.index.json"))
    same = all((work / "resume-out" / n).read_bytes() == (work / "resume-whole" / n).read_bytes() for n in compared)
    print(f"resume (8 blocks, RTN W4): killed after block {killed['killed_after']}; rerun: {started.strip()}; "
          f"{len(compared)} files byte-identical to an uninterrupted run: {same}")
    return {"killed_after": killed["killed_after"], "rerun": started.strip(), "files": compared, "identical": same}


def bench_8b(work: Path, gptq: bool, calib: tuple[int, int], gptq_blocks: int = 0) -> dict:
    t0 = time.perf_counter()
    model = make_checkpoint(work / "llada-8b-shaped", blocks=32, vocab=126464)
    on_disk = sum(p.stat().st_size for p in model.iterdir())
    print(f"8B-shaped checkpoint: {gb(on_disk)} in {len(list(model.glob('*.safetensors')))} shards "
          f"(built in {time.perf_counter() - t0:.0f} s)")
    rows = {}
    for method in (["rtn"] if not gptq_blocks else []) + (["gptq"] if gptq else []):
        out = work / f"out-8b-{method}"
        run = quantize(model, out, "--method", method, "--wbits", "4", "--streaming", "on",
                       "--calib-samples", str(calib[0]), "--seq-len", str(calib[1]))
        size = sum(p.stat().st_size for p in out.iterdir())
        rows[method] = {"peak_rss": run["peak_rss_bytes"], "seconds": run["seconds"], "output_bytes": size}
        print(f"8B-shaped {method.upper()} W4 streaming ({calib[0]} x {calib[1]} calibration tokens): peak RSS "
              f"{gb(run['peak_rss_bytes'])}, "
              f"{run['seconds'] / 60:.1f} min, output {gb(size)}")
        shutil.rmtree(out, ignore_errors=True)
    if gptq_blocks:
        out = work / "out-8b-gptq-partial"
        proc = subprocess.run([sys.executable, __file__, "--child-blocks", str(model), "gptq", str(gptq_blocks),
                               "32", "256", str(out)], capture_output=True, text=True)
        if proc.returncode:
            sys.exit(proc.stdout[-3000:] + proc.stderr[-3000:])
        run = json.loads(proc.stdout.strip().splitlines()[-1])
        rows["gptq_first_blocks"] = run
        print(f"8B-shaped GPTQ W4 streaming, default calibration (32 x 256), first {run['blocks']} of 32 blocks: "
              f"peak RSS {gb(run['peak_rss_bytes'])}, {run['s_per_block']:.0f} s per block "
              f"(whole model: about {run['s_per_block'] * 32 / 60:.0f} min)")
        shutil.rmtree(work / f".{out.name}.partial", ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=("small", "resume", "8b"), default=["small", "resume", "8b"])
    parser.add_argument("--gptq-8b", action="store_true", help="also GPTQ W4 on the 32-block model (hours on 2 cores)")
    parser.add_argument("--calib-8b", nargs=2, type=int, default=(8, 128), metavar=("SAMPLES", "SEQ"),
                        help="calibration of the 32-block runs (default 8 x 128: the default 32 x 256 costs an hour "
                             "of calibration forwards on 2 cores for RTN alone)")
    parser.add_argument("--gptq-8b-blocks", type=int, default=0, metavar="N",
                        help="instead of the whole 32-block RTN run: GPTQ W4 (default calibration) on its first N "
                             "blocks, for the peak RSS and seconds per block")
    parser.add_argument("--work", metavar="DIR", help="keep checkpoints here (reused by later runs)")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--child", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    parser.add_argument("--child-blocks", nargs=6, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        child(args.child)
        return
    if args.child_blocks:
        model, method, blocks, samples, seq, out = args.child_blocks
        child_blocks(model, method, int(blocks), int(samples), int(seq), out)
        return
    from dllm_studio.hardware import cpu_units

    print(f"CPU: {cpu_units().line()}; {torch.get_num_threads()} threads; "
          f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 1e9:.0f} GB RAM")
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_streaming_"))
    report = {}
    try:
        if "small" in args.only:
            report["small"] = bench_small(work)
        if "resume" in args.only:
            report["resume"] = bench_resume(work)
        if "8b" in args.only:
            report["8b"] = bench_8b(work, args.gptq_8b, tuple(args.calib_8b), args.gptq_8b_blocks)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
