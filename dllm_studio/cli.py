"""`dllm-studio`: the engine from a terminal.

    dllm-studio info MODEL [--json]
    dllm-studio generate MODEL --prompt TEXT [--gen-length N] [--steps N] [--block-length N] [--show-steps] [--json]
    dllm-studio eval MODEL --suite qa|math|code|text|all|PATH [--limit N] [--split test|train] [--json OUT]
    dllm-studio quantize MODEL --method rtn|gptq|awq|bnb-nf4|... --wbits 8|4|3|2 --out DIR [--format native|gptq] [--verify] ...
    dllm-studio export QUANTIZED_FOLDER --format native|gptq --out DIR [--verify] [--force]
    dllm-studio export MODEL --method ... --wbits ... --format native|gptq --out DIR [--verify]   (quantize's recipe flags)
    dllm-studio compare BASE QUANT [QUANT ...] --suite qa|math|code|text|all|qa,math|PATH [--limit N] [--report DIR] [--json]
    dllm-studio study MODEL --methods rtn,gptq,awq --bits w8a16,w4a16,w3a16,w2a16 --suite all --report DIR [--limit N]

MODEL is `demo` (the bundled model), a local folder, or a hub id such as GSAI-ML/LLaDA-8B-Instruct.
Errors print one line and exit with status 1; set DLLM_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from dllm_studio.errors import DllmError
from dllm_studio.events import (DenoiseStep, DownloadProgress, EvalProgress, Event, ExportProgress, LoadProgress,
                                LoadWarning)
from dllm_studio.memory import human, quantized_sizes

EXAMPLES = """examples:
  dllm-studio info demo
  dllm-studio info GSAI-ML/LLaDA-8B-Instruct --json
  dllm-studio generate demo --prompt "What is the capital of France?" --show-steps
  dllm-studio generate ./my-llada --prompt "Write a haiku" --gen-length 64 --steps 64 --block-length 32
  dllm-studio eval ./my-llada --suite all --limit 20 --json results.json
  dllm-studio eval ./my-llada --suite my_tasks.jsonl --steps 8
  dllm-studio quantize demo --method gptq --wbits 4 --out demo-gptq-w4
  dllm-studio quantize ./my-llada --method awq --wbits 3 --calib corpus.txt --format gptq --out llada-awq-w3
  dllm-studio eval demo-gptq-w4 --suite all
  dllm-studio export demo-rtn-w4 --format gptq --out demo-rtn-w4-gptq --verify
  dllm-studio export demo --method rtn --wbits 4 --format gptq --out demo-rtn-w4-gptq --verify
  dllm-studio compare demo demo-gptq-w4 --suite all --report cmp-gptq-w4
  dllm-studio study demo --methods rtn,gptq,awq --bits w8a16,w4a16,w3a16,w2a16 --suite all --report study-demo
"""

# The sampler's flags, shared by generate and eval: flag, argparse options, help, generate's default.
SAMPLER_FLAGS = (
    ("--gen-length", {"type": int, "default": 64}, "answer length in tokens", "default 64"),
    ("--steps", {"type": int}, "denoising steps in all", "default: gen-length"),
    ("--block-length", {"type": int}, "semi-autoregressive block length", "default: min(32, gen-length)"),
    ("--remasking", {"default": "low_confidence", "choices": ["low_confidence", "random", "margin", "entropy"]},
     "which predictions to commit first", "default low_confidence"),
    ("--temperature", {"type": float, "default": 0.0}, "0 = greedy; > 0 samples", "default 0"),
    ("--cfg", {"type": float, "default": 0.0}, "classifier-free guidance scale (doubles the cost)", ""),
    ("--seed", {"type": int, "default": 0}, "random seed; equal seeds give identical answers", ""),
    ("--forbid-eos", {"action": "store_true"}, "never end the answer early (EOS logits = -inf)", ""),
    ("--defer-eos", {"action": "store_true"}, "commit end-of-text tokens only after all others", ""),
    ("--cache", {"default": "none", "choices": ["none", "prefix", "dual"]},
     "Fast-dLLM KV cache: each block's first step runs the whole sequence, later ones only the block and what "
     "follows (prefix) or the block alone (dual), reusing the rest's keys/values: faster, approximate",
     "default none"),
    ("--refresh-after", {"type": int}, "with a cache: also refill it after a step that committed more than this "
     "many tokens (a parallel step is where cached keys go stale; dLLM Studio's addition to Fast-dLLM)",
     "default: once per block"),
    ("--threshold", {"type": float}, "parallel decoding: a step also commits every token of the block whose "
     "confidence is at least this (0.9 in Fast-dLLM); steps become a ceiling", "default off"),
    ("--factor", {"type": float}, "parallel decoding by Fast-dLLM's factor rule: the n most confident while the "
     "n-th has confidence >= 1 - factor/(n+1)", "default off"),
)
CONFIG_FIELDS = {"cfg": "cfg_scale"}  # argparse dest -> GenerationConfig field, where they differ


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dllm-studio", description="Quantize and chat with diffusion LLMs.",
                                     epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = commands.add_parser("info", help="describe a model: family, size, memory per bit-width")
    _model_args(info)
    info.add_argument("--json", action="store_true", help="print JSON instead of a table")
    info.set_defaults(run=cmd_info)

    gen = commands.add_parser("generate", help="generate an answer by iterative unmasking")
    _model_args(gen)
    gen.add_argument("--prompt", required=True, help="the user's message (or raw text with --no-chat-template)")
    _sampler_args(gen, per_suite=False)
    gen.add_argument("--no-chat-template", action="store_true", help="use the prompt as raw text (base models)")
    gen.add_argument("--show-steps", action="store_true", help="print the answer after every step, masks visible")
    gen.add_argument("--json", action="store_true", help="print text, stats and per-step commits as JSON")
    gen.set_defaults(run=cmd_generate)

    ev = commands.add_parser("eval", help="score a model on task suites: accuracy, likelihood, speed, memory")
    _model_args(ev)
    _suite_args(ev)
    ev.add_argument("--json", metavar="OUT", help="also write every number and every item's answer to this JSON file")
    _sampler_args(ev, per_suite=True)
    ev.set_defaults(run=cmd_eval)

    cmp = commands.add_parser(
        "compare", help="the same suites, items, settings and seeds on a base model and quantized variants",
        description="Evaluate BASE, then each QUANT in turn (one model held at a time), and report per suite: "
                    "accuracy with 95 % intervals, the change against BASE (the seed study's band only where a "
                    "paired test is significant), agreement, decision flips, speed, memory and size.")
    _model_args(cmp, positional=False)
    cmp.add_argument("base", metavar="BASE", help="the reference model: 'demo', a folder or a hub id")
    cmp.add_argument("variants", nargs="+", metavar="QUANT", help="quantized model folders (or any model) to compare")
    _suite_args(cmp)
    cmp.add_argument("--report", metavar="DIR", help="write report.json, report.csv and report.html here")
    cmp.add_argument("--no-flips", action="store_true",
                     help="skip the decision flips (teacher-forcing each variant on BASE's steps costs one more "
                          "forward per step)")
    cmp.add_argument("--json", action="store_true", help="print the whole report, per item answers and flips, as JSON")
    _sampler_args(cmp, per_suite=True)
    cmp.set_defaults(run=cmd_compare)

    st = commands.add_parser(
        "study", help="quantize every method x bit-width, evaluate each and tabulate it as the seed study does",
        description="Each valid (method, setting) is quantized from MODEL and evaluated on the suites; invalid "
                    "ones are skipped with the reason. Results are cached under --report, so a rerun after an "
                    "interruption resumes where it stopped; Ctrl-C keeps finished cells.")
    _model_args(st)
    st.add_argument("--methods", default="rtn,gptq,awq", help="comma-separated methods (default rtn,gptq,awq)")
    st.add_argument("--bits", default="w8a16,w4a16,w3a16,w2a16",
                    help="comma-separated settings such as w4a16, w3a16, w8a8, w4a4 (default w8a16,w4a16,w3a16,w2a16); "
                         "a mixed-precision cell adds a budget after @, planned per layer up to the setting's bits "
                         "(rtn, gptq, awq at A16): w4a16@3.25 stored bits per weight, w4a16@1.2MB or @5GB the whole "
                         "model's weight bytes")
    _suite_args(st)
    st.add_argument("--report", required=True, metavar="DIR", help="the report folder (and the cache of results)")
    st.add_argument("--calib-samples", type=int, metavar="N", help="calibration samples per recipe (default 32)")
    st.add_argument("--seq-len", type=int, metavar="N", help="calibration tokens per sample (default 256)")
    _sampler_args(st, per_suite=True)
    st.set_defaults(run=cmd_study)

    from dllm_studio.quant.methods import METHODS, QUANTIZED_TENSORS

    settings = ("Methods and the settings each produces (--wbits/--abits):\n" + "\n".join(
        f"  {name:12} {', '.join(f'W{w}A{a}' for w, a in spec.settings)}" for name, spec in METHODS.items())
        + f"\nWith --abits 8 or 4, {QUANTIZED_TENSORS}.")
    qu = commands.add_parser(
        "quantize", help="quantize a model (weight-only, or weights and activations) and save the result",
        description=f"Quantize block by block, printing one line per block, then save to --out. {settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(qu)
    _recipe_args(qu, method_required=True)
    _output_args(qu)
    qu.add_argument("--profile-json", metavar="FILE", help="also write every event (layer statistics, errors, memory) here")
    qu.set_defaults(run=cmd_quantize)

    ex = commands.add_parser(
        "export", help="write a quantized folder in another format, or quantize and write one, and verify it",
        description="MODEL is a quantized folder (written by quantize, native or GPTQ layout), written again in\n"
                    "--format; or a full-precision model with a recipe (the flags of quantize), quantized in memory\n"
                    f"first. With --verify the written folder is reloaded and its logits compared.\n{settings}",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    _model_args(ex)
    _recipe_args(ex, method_required=False)
    _output_args(ex)
    ex.set_defaults(run=cmd_export)
    return parser


def _recipe_args(parser: argparse.ArgumentParser, method_required: bool) -> None:
    """The recipe's flags, for quantize and export. An absent flag leaves no attribute (QuantRecipe's default
    applies), so export can tell a recipe given from none."""
    from dllm_studio.quant.methods import METHODS
    from dllm_studio.quant.recipe import CALIB_MASKINGS, QuantRecipe

    d = QuantRecipe()
    dests = []

    def add(*flags, to=parser, **options) -> None:
        dests.append(to.add_argument(*flags, default=argparse.SUPPRESS, **options).dest)

    add("--method", required=method_required, choices=list(METHODS),
        help="; ".join(f"{k}: {v.description}" for k, v in METHODS.items()))
    add("--wbits", type=int, help=f"weight bits (default {d.wbits}; valid per method above)")
    add("--abits", type=int,
        help=f"activation bits: 16 (weight-only), 8 or 4, per token (default {d.abits}; valid per method above)")
    add("--alpha", type=float, metavar="A", help="SmoothQuant/DuQuant migration strength in [0, 1] (default 0.5)")
    add("--clip", type=float, metavar="R",
        help="activation clip ratio in (0, 1]: each token's scale covers R x its max |x| (default 1.0; DuQuant 0.9)")
    add("--group-size", type=int, metavar="G",
        help=f"input columns sharing a scale (default {d.group_size}; 0 = one per output channel)")
    add("--sym", action="store_true", help="symmetric grid (default asymmetric, with zero points)")
    add("--act-order", action="store_true", help="GPTQ: quantize columns by decreasing importance")
    add("--calib", metavar="TEXTFILE",
        help=f"calibration text: 'builtin' (the demo tasks and sentences) or a UTF-8 text file (default {d.calib})")
    add("--calib-samples", type=int, metavar="N", help=f"default {d.calib_samples}")
    add("--seq-len", type=int, metavar="N", help=f"tokens per sample (default {d.seq_len})")
    add("--no-masked-calib", action="store_true",
        help="calibrate on clean text (the seed study's setting) instead of masked inputs")
    add("--calib-masking", choices=list(CALIB_MASKINGS),
        help="how calibration inputs are masked: " + "; ".join(f"{k}: {v}" for k, v in CALIB_MASKINGS.items())
             + f" (default {d.calib_masking})")
    add("--calib-steps", type=int, metavar="N",
        help="timesteps masking: the step count of the sampler schedule it follows (default: the sampler's default)")
    add("--skip", nargs="*", metavar="ROLE|GLOB",
        help="layers left in full precision: roles (q k v o gate up down head) or name globs, 'none' for none "
             f"(default: {' '.join(d.skip)})")
    add("--seed", type=int, help=f"random seed: calibration samples, QuaRot's rotation, AWQ's search (default {d.seed})")
    budget = parser.add_mutually_exclusive_group()  # what a mixed-precision plan (`quant.budget`) aims at
    add("--memory-budget", metavar="SIZE", to=budget, help=(
        "mixed precision (rtn, gptq, awq): the bytes the whole model's weights may take as stored, e.g. 5GB "
        "(decimal units): the tensors left unquantized at the model's dtype plus the quantized linears' codes, "
        "scales and zero points. Each block linear gets 2 bits up to --wbits (the most), chosen by a knapsack on "
        "an error proxy measured on the calibration data; the plan is printed before quantizing"))
    add("--target-bpw", type=float, metavar="BITS", to=budget, help=(
        "mixed precision like --memory-budget, to stored bits per quantized weight (scales and zero points "
        "included), e.g. 3.5"))
    parser.set_defaults(recipe_dests=tuple(dests))


def _recipe_flags(args: argparse.Namespace) -> dict:
    """The recipe flags given on the command line, by argparse dest."""
    return {dest: getattr(args, dest) for dest in args.recipe_dests if hasattr(args, dest)}


def _recipe(flags: dict):
    """The validated QuantRecipe the recipe flags describe (`_recipe_flags`; --method among them)."""
    from dllm_studio.quant.recipe import QuantRecipe

    fields = dict(flags)
    if "group_size" in fields:
        fields["group_size"] = fields["group_size"] or None  # 0: per output channel
    if "sym" in fields:
        fields["symmetric"] = fields.pop("sym")
    if "no_masked_calib" in fields:
        fields["masked_calib"] = not fields.pop("no_masked_calib")
    if "skip" in fields:
        fields["skip"] = tuple(s for s in fields["skip"] if s != "none")
    if "memory_budget" in fields:
        from dllm_studio.shards import parse_size

        fields["memory_budget"] = parse_size(fields["memory_budget"])
    return QuantRecipe(**fields).validate()


def _output_args(parser: argparse.ArgumentParser) -> None:
    """Where and how quantize and export write the folder."""
    from dllm_studio.quant.recipe import FORMATS

    parser.add_argument("--format", default="native", choices=list(FORMATS),
                        help="native: dLLM Studio's packed layout; gptq: the GPTQ checkpoint format other tools load")
    parser.add_argument("--out", required=True, metavar="DIR", help="folder to create (refused if it exists, unless --force)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--verify", action="store_true",
                        help="reload the written folder and compare its logits with the model in memory (exit "
                             "status 1 if it predicts another token anywhere); the folder is kept either way")
    parser.add_argument("--max-shard-size", type=_shard_size, default="5GB", metavar="SIZE",
                        help="largest weights file, as huggingface_hub's max_shard_size: 5GB, 500MB, 2GiB or bytes "
                             "(KB/MB/GB count 1000s, KiB/MiB/GiB 1024s; default 5GB); a larger model is written as "
                             "model-00001-of-0000N.safetensors... with model.safetensors.index.json")
    parser.add_argument("--streaming", choices=("auto", "on", "off"), default="auto",
                        help="quantizing: read one block at a time from the checkpoint's shards and write it to --out "
                             "at once, so neither model is ever held whole (auto: when the model and its working "
                             "set would not fit in memory)")
    parser.add_argument("--no-resume", action="store_true",
                        help="streaming: start over instead of continuing a run that was interrupted (a rerun of "
                             "the same command continues at the first unfinished block)")


def _shard_size(text: str) -> int:
    """--max-shard-size in bytes; a bad size is argparse's error, shown before any model loads."""
    from dllm_studio.errors import ExportError
    from dllm_studio.shards import parse_size

    try:
        return parse_size(text)
    except ExportError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _sampler_args(parser: argparse.ArgumentParser, per_suite: bool) -> None:
    """Add SAMPLER_FLAGS. Per suite, an absent flag leaves no attribute, so only flags given override."""
    for flag, options, text, default in SAMPLER_FLAGS:
        if per_suite:
            options, default = {**options, "default": argparse.SUPPRESS}, "default: per suite"
        parser.add_argument(flag, **options, help=f"{text} ({default})" if default else text)


def _sampler_overrides(args: argparse.Namespace) -> dict:
    """GenerationConfig fields for the sampler flags present in `args`."""
    dests = (flag.removeprefix("--").replace("-", "_") for flag, *_ in SAMPLER_FLAGS)
    return {CONFIG_FIELDS.get(d, d): getattr(args, d) for d in dests if hasattr(args, d)}


def _suite_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--suite", required=True, metavar="SUITE",
                        help="qa, math, code, text, all (the four shipped suites), several as qa,math, or the path "
                             "of a JSONL suite file")
    parser.add_argument("--split", default="test", choices=["test", "train"], help="shipped suites' split (default test)")
    parser.add_argument("--limit", type=int, metavar="N", help="score only each suite's first N items")
    parser.add_argument("--unsafe-code-eval", action="store_true",
                        help="run the code suite's generated code even where no OS sandbox (bubblewrap) can isolate it")


def _model_args(parser: argparse.ArgumentParser, positional: bool = True) -> None:
    if positional:
        parser.add_argument("model", metavar="MODEL", help="'demo', a local model folder, or a hub id (org/name)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                        help="precision to run at (default auto: bfloat16 on a GPU or a CPU with AVX512-BF16/AMX, "
                             "else float32; the checkpoint's own if only that fits; `info` says which and why)")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda (default cpu; info reads no weights)")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="allow running Python code shipped in the model folder (only for families without a native port)")
    parser.add_argument("--no-memory-check", action="store_true",
                        help="run even when the memory estimate exceeds the free RAM/VRAM")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="CPU threads to compute with (default: physical cores minus one, at least one, "
                             "as the desktop app uses)")


DESKTOP_OPTIONS = ("--smoke", "--theme")  # `dllm-studio --smoke out.png` checks the desktop app


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in DESKTOP_OPTIONS:
        return open_desktop(argv)
    args = build_parser().parse_args(argv)
    try:
        from dllm_studio.threads import use_threads

        args.threads = use_threads(args.threads)
        return args.run(args)
    except DllmError as exc:
        if os.environ.get("DLLM_DEBUG"):
            raise
        print(f"error: {' '.join(filter(None, (str(exc), cli_remedy(exc))))}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:  # Ctrl-C; a quantization says what it left
        print(f"\ninterrupted{f': {exc}' if str(exc) else ''}.", file=sys.stderr)
        return INTERRUPTED


INTERRUPTED = 130  # the shell's status for a program stopped by SIGINT


def entry() -> None:
    """The `dllm-studio` program: `main`, then out. After Ctrl-C it leaves at once: Python's own shutdown, tearing
    torch and its modules down, takes 1-2 s on 2 busy cores (measured), which the user would count as the cancel
    still running. Nothing is lost by skipping it: every file is written atomically, and what an interrupted
    run left was said above."""
    status = main()
    if status == INTERRUPTED:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)
    sys.exit(status)


def cli_remedy(error: DllmError) -> str | None:
    """The flag that changes the outcome, for the errors whose remedy is a switch (the GUI names its own controls)."""
    from dllm_studio.errors import (FolderExistsError, InsufficientMemoryError, RemoteCodeRefusedError,
                                    SandboxUnavailableError)

    if isinstance(error, FolderExistsError):
        return "Choose another --out or pass --force to replace it."
    if isinstance(error, InsufficientMemoryError):
        return "Pass --no-memory-check to try anyway."
    if isinstance(error, RemoteCodeRefusedError):
        return "Pass --trust-remote-code to run it."
    if isinstance(error, SandboxUnavailableError):
        return "Pass --unsafe-code-eval to run the code suite without isolation."
    return None


def open_desktop(argv: list[str] | None = None) -> int:
    """`dllm-studio` with no command opens the desktop studio: the face registered under the entry-point
    group "dllm_studio.faces" (the engine never imports Qt; the installed app tells it where its window is)."""
    from importlib.metadata import entry_points

    faces = entry_points(group="dllm_studio.faces", name="gui")
    if not faces:
        build_parser().print_help()
        print("\nThe desktop studio is not installed with this engine; use a command above.", file=sys.stderr)
        return 2
    return next(iter(faces)).load()(argv or [])


def _load(args: argparse.Namespace, device: str | None = None, stages: bool = True, model: str | None = None,
          whole: bool = True):
    """Load MODEL (or `model`) as the flags say, printing a download's progress and, with `stages`, the loading stages.
    `whole=False`: the model will never be held whole (streaming), so "auto" takes the fast dtype even where the
    whole model would not fit at it."""
    from dllm_studio.models import load_model

    def on_event(event: Event) -> None:
        if stages or isinstance(event, DownloadProgress):
            _print_progress(event)

    return load_model(model or args.model, dtype=args.dtype, device=device or args.device, runs_on=args.device,
                      trust_remote_code=args.trust_remote_code, on_event=on_event,
                      check_memory=whole and not args.no_memory_check)


def _print_progress(event: Event) -> None:
    if isinstance(event, DownloadProgress):
        total = f"{event.total / 1e6:,.1f}" if event.total else "?"
        print(f"\rdownloading {event.repo_id}: {event.downloaded / 1e6:,.1f} / {total} MB", end="", file=sys.stderr)
    elif isinstance(event, (LoadProgress, ExportProgress)) and event.total:  # one line, redrawn per step on a terminal
        if event.done == event.total or sys.stderr.isatty():
            stage = f"writing {event.stage}" if isinstance(event, ExportProgress) else event.stage
            print(f"\r{stage} {event.done}/{event.total}", end="\n" if event.done == event.total else "",
                  file=sys.stderr)
    elif isinstance(event, LoadProgress):
        print(event.stage, file=sys.stderr)
    elif isinstance(event, LoadWarning):
        print(f"warning: {event.message}", file=sys.stderr)


# ---- info ---------------------------------------------------------------------------------------

def cmd_info(args: argparse.Namespace) -> int:
    import dataclasses

    # Described from config.json and the safetensors headers alone: no weights are read, so even a
    # model too large for this machine can be inspected before deciding to load or quantize it.
    from dllm_studio.hardware import cpu_units
    from dllm_studio.quant.kernels import SIMULATED_NOTE

    model = _load(args, device="meta")
    info = model.info()
    plan = _kernel_plan(model, args.device)
    if args.json:
        print(json.dumps({**dataclasses.asdict(info), "cpu": cpu_units().line(), **({"kernels": plan} if plan else {})},
                         indent=2))
        return 0
    rows = [("family", info.family), ("path", info.path), ("parameters", f"{info.parameters:,}"),
            ("layers", info.layers), ("hidden size", info.hidden_size), ("vocabulary", f"{info.vocab_size:,}"),
            ("mask token id", info.mask_token_id), ("context length", f"{info.context_length:,}"),
            ("logits shifted", "yes" if info.shift_logits else "no"),
            ("weights dtype", info.dtype_reason or info.dtype), ("cpu", cpu_units().line())]
    if info.quantization:
        rows.append(("quantization", info.quantization))
    rows += [(f"memory {name}", human(n)) for name, n in info.memory_bytes.items()]
    for row in plan:
        chosen = ", ".join(f"{row['chosen'][b] or 'measured at first use'} at {b} tokens" for b in sorted(row["chosen"]))
        simulated = f"; {SIMULATED_NOTE}" if row["simulated"] else ""
        rows.append((f"kernels {row['shape']}",
                     f"{row['layers']} layers: {chosen} (can run: {', '.join(row['runnable'])}){simulated}"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    return 0


def _kernel_plan(model, device: str) -> list[dict]:
    """How the quantized layers would run on `device` (`kernels.plan`); [] for a full-precision model."""
    import torch

    from dllm_studio.quant import kernels

    return kernels.plan(model.module, torch.device(device), model.dtype)


# ---- generate -----------------------------------------------------------------------------------

def cmd_generate(args: argparse.Namespace) -> int:
    from dllm_studio import jobs
    from dllm_studio.sampling import GenerationConfig, check_prompt

    check_prompt(args.prompt)
    config = GenerationConfig(
        gen_length=args.gen_length, steps=args.steps or args.gen_length,
        block_length=args.block_length or min(32, args.gen_length), remasking=args.remasking,
        temperature=args.temperature, cfg_scale=args.cfg, seed=args.seed,
        forbid_eos=args.forbid_eos, defer_eos=args.defer_eos, cache=args.cache, refresh_after=args.refresh_after,
        threshold=args.threshold, factor=args.factor)
    config.validate()  # before loading: a bad flag should not cost a model load
    model = _load(args)
    if args.no_chat_template:
        prompt_ids = model.tokenizer.encode(args.prompt)
    else:
        prompt_ids = model.chat_ids([{"role": "user", "content": args.prompt}])
    on_step = _step_printer(model) if args.show_steps and not args.json else None
    result = jobs.run(model.denoise(prompt_ids, config), on_step)
    if args.json:
        print(json.dumps({
            "model": args.model, "prompt": args.prompt, "text": result.text, "settings": vars(config),
            "answer_token_ids": result.token_ids, "stats": {**result.stats.to_dict(), "threads": args.threads,
                                                       "dtype_reason": model.dtype_reason},
            "steps": [{"step": s.step, "block": s.block, "masked": len(s.masked), "refreshed": s.refreshed,
                       "committed": [vars(c) for c in s.committed]} for s in result.steps],
        }, indent=2))
        return 0
    print(result.text)
    s = result.stats
    print(f"[{s.steps} steps, {s.forward_passes} forward passes ({s.forward_equivalents:.1f} full-sequence "
          f"equivalents{_cache_note(s)}), {s.tokens_per_step:.2f} tokens/step, {s.ms_per_step:.1f} ms/step, "
          f"{s.wall_time_s:.2f} s, {s.answer_tokens} answer tokens, {s.answer_tokens_per_s:.1f} tok/s]", file=sys.stderr)
    return 0


def _cache_note(stats) -> str:
    return f", {stats.cache_refreshes} cache refreshes, cache {human(stats.cache_bytes)}" if stats.cache_refreshes else ""


MASK_GLYPH = "░"


def _step_printer(model):
    """Print the partly unmasked answer after every step, as llama.cpp's --diffusion-visual does."""
    redraw = sys.stdout.isatty()

    def on_event(event: Event) -> None:
        if not isinstance(event, DenoiseStep):
            return
        text = "".join(MASK_GLYPH if i in set(event.masked) else piece
                       for i, piece in enumerate(model.token_pieces(event.tokens)))
        header = f"step {event.step}/{event.total_steps} (block {event.block}, {len(event.masked)} masked)"
        print(("\x1b[H\x1b[J" if redraw else "") + f"{header}\n{text}", flush=True)

    return on_event


# ---- eval ---------------------------------------------------------------------------------------

def cmd_eval(args: argparse.Namespace) -> int:
    from dllm_studio import jobs
    from dllm_studio.errors import InvalidSettingsError
    from dllm_studio.eval.runner import evaluate

    # Suites, settings and the output folder are checked before loading: a typo should not cost a model load.
    out = Path(args.json) if args.json else None
    if out is not None and (out.is_dir() or not out.parent.is_dir()):
        problem = "it is a folder" if out.is_dir() else f"the folder {out.parent} does not exist"
        raise InvalidSettingsError(f"Cannot write {out}: {problem}.")
    suites, overrides = _suites_checked(args)
    model = _load(args)
    if args.suite == "all" and model.mask_token_id is None:
        # The text suite's likelihood needs a mask token; such families still answer the other suites.
        print(f"skipping the text suite: {model.family} models have no mask token", file=sys.stderr)
        suites = [s for s in suites if s.name != "text"]
    results = []
    for suite in suites:
        results.append(jobs.run(evaluate(model, suite, overrides, args.limit, unsafe_code_eval=args.unsafe_code_eval),
                                _print_eval_progress))
        for skipped in results[-1].skipped:
            print(f"skipped item {skipped.id}: {skipped.reason}", file=sys.stderr)
        if out is not None:  # after every suite, so an interrupted run keeps what it finished
            _write_json(out, {"model": args.model, "split": args.split, "overrides": overrides, "threads": args.threads,
                              "suites": [r.to_dict() for r in results]})
    _print_eval_table(results)
    return 0


def _print_eval_progress(event: Event) -> None:
    if not isinstance(event, EvalProgress):
        return
    head = f"{event.suite} {event.done}/{event.total} {event.item_id}"
    if event.accuracy is None:
        mean = "-" if event.nll_per_token is None else f"{event.nll_per_token:.4f}"
        print(f"{head} (mean nll/token {mean})", file=sys.stderr)
    else:
        print(f"{head}: {'correct' if event.correct else 'wrong'} (accuracy {event.accuracy:.3f})", file=sys.stderr)


def _print_eval_table(results: list) -> None:
    header = ("suite", "items", "skipped", "score", "ms/step", "tokens/step", "passes/answer", "full-seq/answer",
              "s/answer", "peak RSS")
    rows = [header] + [(r.suite, str(r.items), str(len(r.skipped)), _score(r), "-" if r.ms_per_step is None else f"{r.ms_per_step:.1f}",
                        "-" if r.tokens_per_step is None else f"{r.tokens_per_step:.2f}",
                        f"{r.forward_passes_per_item:.1f}", f"{r.forward_equivalents_per_item:.1f}",
                        f"{r.wall_time_per_item_s:.2f}", human(r.peak_rss_bytes)) for r in results]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    for row in rows:
        print("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))))


def _score(result) -> str:
    if result.nll_per_token is not None:
        return f"nll {result.nll_per_token:.4f}"
    return "-" if result.accuracy is None else f"acc {result.accuracy:.3f}"


# ---- quantize -----------------------------------------------------------------------------------

def cmd_quantize(args: argparse.Namespace) -> int:
    recipe = _recipe(_recipe_flags(args))
    _refuse_before_loading(args, recipe)
    profile_out = Path(args.profile_json) if args.profile_json else None
    recipe, profile, events, report = _quantize_and_export(args, recipe, _load(args, device="meta", stages=False))
    if profile_out is not None:
        _write_json(profile_out, {**profile, "recipe": recipe.to_dict(), "threads": args.threads, "events": events})
    print(f"saved {report['path']} ({report['format']} format)")
    return _print_verdict(report)


def cmd_export(args: argparse.Namespace) -> int:
    from dllm_studio.errors import ExportError, QuantizationError
    from dllm_studio.quant.export import check_format, read_profile

    flags = _recipe_flags(args)
    recipe = _recipe(flags) if "method" in flags else None
    _refuse_before_loading(args, recipe)
    described = _load(args, device="meta", stages=False)  # reads no weights: which case this is, and the checks
    if described.config.get("quantization_config"):
        if flags:
            given = " ".join(f"--{dest.replace('_', '-')}" for dest in flags)
            raise QuantizationError(f"{args.model} is already quantized ({described.info().quantization}); the "
                                    f"recipe ({given}) would quantize it twice. Drop those flags to write it in "
                                    "another format, or give the full-precision model to quantize it afresh.")
        if described.quantization is None:
            raise ExportError(f"{args.model} holds no recipe.json (it was not written by dLLM Studio), so dLLM Studio "
                              "cannot describe how it was made; export the folders quantize writes.")
        check_format(described.quantization, args.format, described.module)  # its layers, not only its recipe
        model = _load(args)
        report = _export(args, model, read_profile(model.path))
    elif recipe is None:
        raise QuantizationError(f"{args.model} is not quantized: give a recipe (--method, --wbits) or a quantized folder.")
    else:
        *_, report = _quantize_and_export(args, recipe, described)
    print(f"exported {report['path']} ({report['format']} format)")
    width = max(len(name) for name, _ in report["files"])
    for name, size in report["files"]:
        print(f"  {name:<{width}}  {human(size)}")
    print(f"total {human(report['total_bytes'])}")
    return _print_verdict(report)


def _refuse_before_loading(args: argparse.Namespace, recipe) -> None:
    """What can be refused from the flags alone: a format the recipe cannot be stored in, an existing --out."""
    from dllm_studio.errors import FolderExistsError
    from dllm_studio.quant.export import check_format

    if recipe is not None:
        check_format(recipe, args.format)
    out = Path(args.out)
    if out.exists() and not args.force:
        raise FolderExistsError(out)


def _quantize_and_export(args: argparse.Namespace, recipe, described) -> tuple[object, dict, list[dict], dict]:
    """Quantize MODEL (`described`: its meta copy) with `recipe` in memory, a line per block and the summary on
    stdout, then write --out (`_export`). A recipe with a memory budget or target bits per weight is planned first
    (`quant.budget`: a line per block measured, then the bit map). Returns the recipe quantized with (its plan
    recorded), the profile, every event, and the export's report."""
    from dllm_studio import jobs
    from dllm_studio.quant import runtimes
    from dllm_studio.quant.pipeline import check_supported, quantize, working_set

    note = getattr(runtimes.BY_METHOD.get(recipe.method), "note", None)
    if note:
        print(f"note: {note}.", file=sys.stderr)
    if recipe.abits < 16 and recipe.method not in runtimes.METHODS:
        from dllm_studio.quant.methods import QUANTIZED_TENSORS

        print(f"note: {QUANTIZED_TENSORS}.", file=sys.stderr)
    check_supported(described)
    if _streams(args, described, recipe):
        return _quantize_streaming(args, recipe, described)
    _preflight(f"Quantizing {args.model}", working_set(described, recipe), args)
    model = _load(args)
    events = []
    on_event = _quantize_printer(events)
    recipe = _planned(recipe, model, on_event)
    try:
        result = jobs.run(quantize(model, recipe), on_event)
    except KeyboardInterrupt:  # raised between two operations: the pipeline worked on block copies only
        raise KeyboardInterrupt("nothing was quantized or written") from None
    _print_summary(recipe, result)
    profile = {"summary": result.summary, "layers": result.layers}
    return recipe, profile, events, _export(args, result.model, profile)


def _preflight(what: str, parts: dict[str, int], args: argparse.Namespace) -> None:
    """Refuse a run the free memory cannot hold (unless --no-memory-check); else say what it will need, on stderr."""
    from dllm_studio.memory import available_bytes, human, largest_part, preflight

    free = available_bytes(args.device)
    needed = preflight(what, parts, args.device, force=args.no_memory_check, available=free)
    print(f"memory: needs about {human(needed)} ({largest_part(parts)}); {human(free)} free", file=sys.stderr)


def _streams(args: argparse.Namespace, described, recipe) -> bool:
    """Whether to quantize streaming from the shards: as asked, or (auto) when the model and its working set
    would not fit in the free memory and its weights can stream."""
    from dllm_studio.errors import QuantizationError
    from dllm_studio.memory import HEADROOM, available_bytes, human
    from dllm_studio.quant.pipeline import working_set
    from dllm_studio.quant.streaming import streaming_problem

    if args.streaming == "off":
        return False
    problem = streaming_problem(described)
    if args.streaming == "on":
        if problem:
            raise QuantizationError(f"{args.model} cannot be quantized streaming from its shards: {problem}.")
    else:
        needed, free = sum(working_set(described, recipe).values()), available_bytes(args.device)
        if problem or needed <= free * HEADROOM:
            return False
        print(f"note: quantizing in memory would need about {human(needed)} and {human(free)} is free: streaming "
              "blocks from the shards instead (--streaming off to refuse).", file=sys.stderr)
    if args.verify:
        raise QuantizationError("--verify compares the written folder with the quantized model in memory, and a "
                                "streaming run never holds one: drop --verify (run `dllm-studio eval OUT` or `compare` "
                                "on the folder instead), or quantize in memory with --streaming off.")
    return True


def _quantize_streaming(args: argparse.Namespace, recipe, described) -> tuple[object, dict, list[dict], dict]:
    """`_quantize_and_export` for a streaming run: the blocks go straight from the shards to --out."""
    from dllm_studio import jobs
    from dllm_studio.quant.pipeline import working_set
    from dllm_studio.quant.streaming import FromShards, quantize_to_folder

    described = _load(args, device="meta", stages=False, whole=False)  # at the dtype one block at a time needs
    _preflight(f"Quantizing {args.model} streaming from its shards", working_set(described, recipe, streaming=True),
               args)
    events = []
    printer = _quantize_printer(events)

    def on_event(event: Event) -> None:
        if type(event).__name__ == "StreamingStarted":
            events.append(event.to_dict())
            print(f"streaming from {event.shards} shard{'s' * (event.shards != 1)}: blocks {event.first_block}-"
                  f"{event.blocks} of {event.blocks}" + (f" ({event.note})" if event.note else ""), flush=True)
        elif isinstance(event, ExportProgress):
            _print_progress(event)
        else:
            printer(event)

    recipe = _planned(recipe, described, on_event, FromShards(described, args.device))
    try:
        result, report = jobs.run(quantize_to_folder(described, recipe, args.out, fmt=args.format,
                                                     max_shard_size=args.max_shard_size, force=args.force,
                                                     resume=not args.no_resume, device=args.device), on_event)
    except KeyboardInterrupt:
        partial = Path(args.out).parent / f".{Path(args.out).name}.partial"
        kept = (f"the finished blocks are kept in {partial}: run the same command again to resume"
                if partial.is_dir() else "nothing was written")
        raise KeyboardInterrupt(kept) from None
    _print_summary(recipe, result)
    return recipe, {"summary": result.summary, "layers": result.layers}, events, report


def _planned(recipe, model, on_event, store=None):
    """`recipe` with its memory budget (or target bits per weight) planned into bits per layer, the bit map
    printed; the recipe itself when it sets none. `store`: where the sensitivity pass reads the blocks."""
    if recipe.memory_budget is None and recipe.target_bpw is None:
        return recipe
    from dllm_studio import jobs
    from dllm_studio.quant.budget import budget_plan

    plan = jobs.run(budget_plan(model, recipe, store=store), on_event)
    print(plan.text(), flush=True)
    return plan.apply(recipe)


def _quantize_printer(events: list[dict]):
    """A quantization's event handler for the terminal: a line per quantized layer (with the share of the run's
    work done and the time left), per block and per transformed layer; every event is kept, as a dict, in
    `events`."""

    def on_event(event: Event) -> None:
        events.append(event.to_dict())
        if type(event).__name__ == "SensitivityProgress":
            print(f"sensitivity block {event.block:>3}/{event.blocks}  {event.elapsed_s:6.1f} s  ETA {event.eta_s:5.1f} s",
                  flush=True)
        elif type(event).__name__ == "LayerTransformed":
            print(f"  {event.name}  {event.transform}: kurtosis {event.kurtosis_before:.2f} -> {event.kurtosis_after:.2f}, "
                  f"max/median {event.outlier_ratio_before:.1f} -> {event.outlier_ratio_after:.1f}"
                  + (f"  ({event.detail})" if event.detail else ""), flush=True)
        elif type(event).__name__ == "LayerQuantized":
            print(f"  layer {event.layer:>3}/{event.layers}  {event.name}  error {event.relative_error:.4f}  "
                  f"{event.seconds:6.2f} s  {event.fraction:6.1%} done  ETA {event.eta_s:5.1f} s", flush=True)
        elif type(event).__name__ == "BlockQuantized":
            print(f"block {event.block:>3}/{event.blocks}  max outlier {event.max_outlier_ratio:7.1f}x  "
                  f"error {event.mean_relative_error:.4f}  RSS {human(event.rss_bytes)}  "
                  f"{event.elapsed_s:6.1f} s  ETA {event.eta_s:5.1f} s", flush=True)

    return on_event


def _print_summary(recipe, result) -> None:
    s = result.summary
    print(f"{recipe.label}: {s['quantized_layers']} layers in {s['seconds']:.1f} s, peak RSS {human(s['peak_rss_bytes'])}")
    linears, whole = quantized_sizes(s, result.model.dtype)
    print(f"{linears} ({s['bits_per_weight']:.3f} bits per weight; storage theory {s['theory_bits_per_weight']:.3f})")
    print(whole)
    in_memory = any(not t.is_meta for t in result.model.module.parameters())  # a streamed model is on disk only
    if recipe.abits < 16 and in_memory:
        from dllm_studio.quant import kernels

        print(f"kernels here: {kernels.describe(kernels.choices(result.model.module))}")


def _export(args: argparse.Namespace, model, profile: dict) -> dict:
    """Write the quantized `model` to --out in --format, progress on stderr; with --verify, reload and compare."""
    from dllm_studio import jobs
    from dllm_studio.quant.export import export

    return jobs.run(export(model, args.out, fmt=args.format, force=args.force, profile=profile, check=args.verify,
                           max_shard_size=args.max_shard_size), _print_progress)


def _print_verdict(report: dict) -> int:
    """With --verify, say what the reload showed; exit status 1 when it predicts another token somewhere."""
    from dllm_studio.quant.export import verdict_text

    if "argmax_disagreements" not in report:
        return 0
    text, ok = verdict_text(report)
    print(text)
    return 0 if ok else 1


# ---- compare and study ----------------------------------------------------------------------------

def _suites_checked(args: argparse.Namespace) -> tuple[list, dict]:
    """The suites and sampler overrides the flags ask for, refused before any model is loaded."""
    from dllm_studio.compare import checked_suites
    from dllm_studio.errors import InvalidSettingsError
    from dllm_studio.eval.scoring import require_sandbox
    from dllm_studio.eval.suites import SUITES

    names = SUITES if args.suite == "all" else (args.suite,) if Path(args.suite).is_file() else args.suite.split(",")
    overrides = _sampler_overrides(args)
    suites = checked_suites([name.strip() for name in names], args.split, overrides)
    if args.limit is not None and args.limit < 1:
        raise InvalidSettingsError(f"--limit must be at least 1, not {args.limit}.")
    if any(suite.name == "code" for suite in suites):
        require_sandbox(args.unsafe_code_eval)
    return suites, overrides


def _report_folder(args: argparse.Namespace) -> Path | None:
    from dllm_studio.errors import InvalidSettingsError

    folder = Path(args.report) if args.report else None
    if folder is not None and folder.exists() and not folder.is_dir():
        raise InvalidSettingsError(f"Cannot write the report into {folder}: it is a file.")
    return folder


def _print_job_progress(event: Event) -> None:
    """Compare's and study's progress lines: what starts, with the ETA over the whole run."""
    name = type(event).__name__
    eta = getattr(event, "eta_s", None)
    eta = "" if eta is None else f", ETA {eta:.0f} s"
    if name == "CompareStage":
        print(f"[{event.index}/{event.total}] {event.suite} on {event.model} ({event.elapsed_s:.0f} s{eta})",
              file=sys.stderr)
    elif name == "SensitivityProgress":  # a budget cell's plan, before it quantizes
        print(f"  planning: sensitivity block {event.block}/{event.blocks}", file=sys.stderr)
    elif name == "StudyProgress":
        print(f"[cell {event.cell}/{event.cells}] {event.label}: {event.stage} ({event.elapsed_s:.0f} s{eta})",
              file=sys.stderr)
    elif name == "SuiteCompared":
        row = event.row
        from dllm_studio.report import change_text, score_text

        print(f"  {row['model']} {row['suite']}: {score_text(row)}  {change_text(row)}  {row['verdict']}",
              file=sys.stderr)


def cmd_compare(args: argparse.Namespace) -> int:
    from dllm_studio import jobs
    from dllm_studio.compare import Candidate, compare
    from dllm_studio.report import TABLE_HEADER, row_cells, text_table, write_report

    suites, overrides = _suites_checked(args)
    folder = _report_folder(args)
    specs = [args.base, *args.variants]
    for spec in specs:  # a mistyped folder is found now, not after the base's evaluation (meta: no weights read)
        _load(args, device="meta", stages=False, model=spec)
    labels = _labels(specs)
    candidates = [Candidate(label, load=lambda spec=spec: _load(args, model=spec, stages=False))
                  for label, spec in zip(labels, specs)]
    report = jobs.run(compare(candidates, suites, limit=args.limit, overrides=overrides, split=args.split,
                              flips=not args.no_flips, unsafe_code_eval=args.unsafe_code_eval), _print_job_progress)
    for note in report["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if folder is not None:
        write_report(report, folder)
    if args.json:
        print(json.dumps(report, indent=1, ensure_ascii=False))
    else:
        print(text_table([row_cells(r) for r in report["rows"]], TABLE_HEADER))
    if folder is not None:
        print(f"report: {folder / 'report.html'} (and report.json, report.csv)", file=sys.stderr)
    return 0


def _labels(specs: list[str]) -> list[str]:
    """Each model's name in the tables: its folder's name ('demo' for the demo), made unique."""
    labels = []
    for spec in specs:
        name = Path(spec).name or spec
        label, n = name, 2
        while label in labels:
            label, n = f"{name} ({n})", n + 1
        labels.append(label)
    return labels


def cmd_study(args: argparse.Namespace) -> int:
    from dllm_studio import jobs
    from dllm_studio.compare import Candidate
    from dllm_studio.report import study_grid, study_sizes, text_table
    from dllm_studio.study import parse_setting, plan, study

    suites, overrides = _suites_checked(args)
    methods = [m.strip().lower() for m in args.methods.split(",") if m.strip()]
    settings = [parse_setting(b) for b in args.bits.split(",") if b.strip()]
    recipe = {k: v for k, v in (("calib_samples", args.calib_samples), ("seq_len", args.seq_len)) if v is not None}
    skipped = [c for c in plan(methods, settings, recipe) if c["status"] == "skipped"]
    for cell in skipped:  # what will be skipped, said before the model loads
        print(f"skipping {cell['label']}: {cell['reason']}", file=sys.stderr)
    base = Candidate(_labels([args.model])[0], load=lambda: _load(args, stages=False))
    try:
        report = jobs.run(study(base, methods, settings, suites, args.report, limit=args.limit, overrides=overrides,
                                split=args.split, recipe=recipe, unsafe_code_eval=args.unsafe_code_eval),
                          _print_job_progress)
    except KeyboardInterrupt:
        print(f"the finished cells are kept in {args.report} (its report.html shows them); the same command "
              "resumes after them", file=sys.stderr)
        raise
    for cell in report["cells"]:  # budgets this model's weights cannot fit, found once it loaded
        if cell["status"] == "skipped" and all(c["label"] != cell["label"] for c in skipped):
            print(f"skipped {cell['label']}: {cell['reason']}", file=sys.stderr)
    header, grid = study_grid(report)
    print(text_table(grid, header))
    if any(len(s) == 3 for s in settings):  # budgeted cells are read against the uniform ones by their bytes
        header, sizes = study_sizes(report)
        print("\n" + text_table(sizes, header))
    print(f"report: {Path(args.report) / 'report.html'} (and report.json, report.csv)", file=sys.stderr)
    return 0


def _write_json(path: Path, data: dict) -> None:
    """Write `data` to `path` as indented JSON, all or nothing (`files.atomic_write_text`)."""
    from dllm_studio.files import atomic_write_text

    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


if __name__ == "__main__":
    entry()
