"""How fast and how big quantized models run, per kernel and per library runtime, against full precision.

For (a) the bundled demo and (b) a random LLaDA-8B-shaped model of 2 blocks (d_model 4096, MLP 12288,
32 heads; the demo's small vocabulary, so the linears dominate as they do at 32 blocks), one denoising step
(a forward over T tokens) is timed at T = 32 (a cached Fast-dLLM block) and T = 256 (a full-sequence step)
for: fp32, bf16, our W8/W4/W3/W2 (RTN, g128, and symmetric per-channel W8 / W8A8 / W4A8 / W4A4: the
layers the weight-and-activation methods produce, without QuaRot's and DuQuant's online rotations) on every kernel that can
run them and on the kernel the per-machine choice picks, and each installed library runtime. All configs
are timed interleaved round-robin in one process (medians), and printed as ratios to the fastest
full-precision dtype on this machine, with the bytes each holds. Peak RSS of a few steps at 256 and at 32
tokens is measured in a fresh process per config, holding the model as a loaded checkpoint would (quantized
layers created packed, never dense), with the peak reset once it is held.

    python benchmarks/bench_runtimes.py [--skip-large] [--rounds 3] [--all] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
DEMO = ROOT / "resources" / "models" / "demo"
TOKENS = (32, 256)


def build(which: str) -> torch.nn.Module:
    """The fp32 module of the demo or of the 2-block 8B-shaped model (random N(0, 0.02) weights)."""
    from safetensors.torch import load_file

    from dllm_studio.models.llada import LLaDAConfig, LLaDAModelLM

    config = json.loads((DEMO / "config.json").read_text())
    if which == "large":
        config.update(d_model=4096, n_layers=2, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288,
                      max_sequence_length=4096)
    torch.manual_seed(0)
    module = LLaDAModelLM(LLaDAConfig.from_dict(config))
    with torch.no_grad():
        if which == "demo":
            module.load_state_dict(load_file(str(DEMO / "model.safetensors")), strict=False)
        else:
            for p in module.parameters():
                if p.dim() >= 2:
                    p.normal_(0, 0.02)
    return module.eval()


def quantized(module: torch.nn.Module, bits: int, group: int | None, symmetric: bool, act_bits: int = 16):
    """A copy with every block linear rounded to nearest (the head stays, as the default recipe keeps it)."""
    import copy

    from dllm_studio.quant.grid import Grid, rtn
    from dllm_studio.quant.qlinear import QuantLinear

    out = copy.deepcopy(module)
    for name, linear in list(out.named_modules()):
        if isinstance(linear, torch.nn.Linear) and ".blocks." in name:
            q, s, z = rtn(linear.weight.detach().float(), Grid(bits, symmetric), group)
            layer = QuantLinear.from_codes(q, s, z, bits, group, act_bits=act_bits,
                                           bias=None if linear.bias is None else linear.bias.detach())
            parent, _, child = name.rpartition(".")
            setattr(out.get_submodule(parent), child, layer)
    return out


LIBRARY = [("bnb-nf4", 4, 16), ("bnb-fp4", 4, 16), ("bnb-int8", 8, 16), ("quanto", 8, 16), ("quanto", 4, 16),
           ("quanto", 2, 16), ("quanto", 8, 8), ("torchao", 8, 16), ("torchao", 8, 8)]


def runtime_models(module: torch.nn.Module, skip_a8: bool) -> dict[str, torch.nn.Module]:
    """Each installed library runtime's copy of `module` (its block linears converted), by recipe label."""
    import copy

    from dllm_studio.quant import runtimes
    from dllm_studio.quant.recipe import QuantRecipe

    out = {}
    for method, wbits, abits in LIBRARY:
        if runtimes.unavailable(method) or (skip_a8 and abits == 8):
            continue
        recipe = QuantRecipe(method=method, wbits=wbits, abits=abits)
        model = copy.deepcopy(module)
        convert = runtimes.BY_METHOD[method].code().convert
        for name, linear in list(model.named_modules()):
            if isinstance(linear, torch.nn.Linear) and ".blocks." in name:
                inputs = torch.randn(64, linear.in_features, generator=torch.Generator().manual_seed(0)).to(linear.weight.dtype)
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, convert(linear, recipe, inputs))
        out[recipe.label] = model
    return out


def pin(module: torch.nn.Module, kernel: str | None) -> None:
    """Run every quantized layer with `kernel` (None: the per-machine choice, measured at the first call)."""
    from dllm_studio.quant import kernels

    for m in module.modules():
        if hasattr(m, "kernel_choice"):
            can = kernel is None or kernels.KERNELS[kernel].unsupported(m, torch.device("cpu")) is None
            m.kernel_choice = {} if kernel is None else {b: (kernel if can else "dequant") for b in kernels.BUCKETS}


def nbytes(module: torch.nn.Module) -> int:
    """Bytes of parameters and buffers the module holds (library modules' packed data included)."""
    seen, total = set(), 0
    for t in [*module.parameters(), *module.buffers()]:
        for part in _storages(t):
            if part.data_ptr() not in seen:
                seen.add(part.data_ptr())
                total += part.numel() * part.element_size()
    return total


def _storages(t: torch.Tensor) -> list[torch.Tensor]:
    inner = getattr(t, "__tensor_flatten__", None)
    if inner is None:
        return [t]
    names, _ = t.__tensor_flatten__()
    return [p for n in names for p in _storages(getattr(t, n))]


def configs(module: torch.nn.Module, which: str, skip_a8: bool) -> list[tuple[str, torch.nn.Module, str | None, str]]:
    """(label, module, pinned kernel, dtype) per config."""
    from dllm_studio.quant import kernels

    bf16 = build(which).to(torch.bfloat16)
    rows = [("fp32", module, None, "fp32"), ("bf16", bf16, None, "bf16")]
    fast = "bf16" if _fast_bf16() else "fp32"
    grids = [("W4 g128", 4, 128, False, 16), ("W3 g128", 3, 128, False, 16), ("W2 g128", 2, 128, False, 16),
             ("W8 g128", 8, 128, False, 16), ("W8 per-channel sym", 8, None, True, 16),
             ("W8A8 per-channel sym", 8, None, True, 8), ("W4A8 per-channel sym", 4, None, True, 8),
             ("W4A4 per-channel sym", 4, None, True, 4)]  # W4A4: simulated (no int4 x int4 kernel in torch)
    base = module if fast == "fp32" else bf16
    for label, bits, group, sym, act in grids:
        q = quantized(base, bits, group, sym, act)
        probe = next(m for m in q.modules() if hasattr(m, "kernel_choice"))
        for name in kernels.KERNELS:
            if kernels.KERNELS[name].unsupported(probe, torch.device("cpu")) is None:
                rows.append((f"{label} · {name}", q, name, fast))
        rows.append((f"{label} · chosen", q, None, fast))
    for name, m in runtime_models(bf16, skip_a8).items():
        rows.append((f"{name} (library)", m, None, "bf16"))
    return rows


def _fast_bf16() -> bool:
    from dllm_studio.hardware import cpu_units

    return cpu_units().fast_bf16


def step_ms(module: torch.nn.Module, ids: torch.Tensor) -> float:
    with torch.no_grad():
        start = time.perf_counter()
        module(ids, None)
        return (time.perf_counter() - start) * 1e3


def run(which: str, rounds: int, skip_a8: bool) -> list[dict]:
    module = build(which)
    rows = configs(module, which, skip_a8)
    vocab = module.config.vocab_size if hasattr(module, "config") else 100
    ids = {t: torch.randint(0, min(vocab, 100), (1, t)) for t in TOKENS}
    times = {(label, t): [] for label, *_ in rows for t in TOKENS}
    chosen = {}  # label -> each layer's choice, made once in the warm-up and restored per round
    for label, m, kernel, _ in rows:  # warm-up: builds kernels and measures the per-machine choice
        pin(m, kernel)
        for t in TOKENS:
            step_ms(m, ids[t])
        chosen[label] = [(q, dict(q.kernel_choice)) for q in m.modules() if hasattr(q, "kernel_choice")]
    for _ in range(rounds):
        for label, m, kernel, _ in rows:
            for q, choice in chosen[label]:
                q.kernel_choice = dict(choice)
            for t in TOKENS:
                times[(label, t)].append(step_ms(m, ids[t]))
    ms = {k: statistics.median(v) for k, v in times.items()}
    base = {t: min(ms[("fp32", t)], ms[("bf16", t)]) for t in TOKENS}
    out = []
    for label, m, kernel, dtype in rows:
        from dllm_studio.quant import kernels as k

        for q, choice in chosen[label]:
            q.kernel_choice = dict(choice)
        described = k.describe(k.choices(m)) if kernel is None and label.endswith("chosen") else ""
        out.append({"model": which, "config": label, "dtype": dtype, "bytes": nbytes(m),
                    **{f"ms_{t}": round(ms[(label, t)], 2) for t in TOKENS},
                    **{f"ratio_{t}": round(ms[(label, t)] / base[t], 2) for t in TOKENS}, "kernels": described})
    return out


def materialised(which: str, config: str) -> torch.nn.Module:
    """The model as it is held after loading a checkpoint: built on meta, its quantized layers created packed,
    then given memory once (random values), so no dense copy of a quantized layer ever exists, as when a
    quantized folder is opened."""
    from dllm_studio.models.llada import LLaDAConfig, LLaDAModelLM
    from dllm_studio.quant.qlinear import QuantLinear

    settings = json.loads((DEMO / "config.json").read_text())
    if which == "large":
        settings.update(d_model=4096, n_layers=2, n_heads=32, n_kv_heads=32, mlp_hidden_size=12288)
    dtype = torch.float32 if config == "fp32" or (config != "bf16" and not _fast_bf16()) else torch.bfloat16
    with torch.device("meta"):
        module = LLaDAModelLM(LLaDAConfig.from_dict(settings)).to(dtype)
        if config not in ("fp32", "bf16"):
            for name, linear in list(module.named_modules()):
                if isinstance(linear, torch.nn.Linear) and ".blocks." in name:
                    parent, _, child = name.rpartition(".")
                    setattr(module.get_submodule(parent), child,
                            QuantLinear(linear.in_features, linear.out_features, int(config[1]), 128, dtype=dtype))
    module.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, QuantLinear):
                for t in (m.qweight, m.qzeros):
                    t.copy_(torch.randint(0, 256, t.shape, dtype=torch.uint8, generator=gen))
                m.scales.copy_(torch.rand(m.scales.shape, generator=gen) * 1e-2)
        for p in module.parameters():
            p.normal_(0, 0.02, generator=gen)
    return module.eval()


def rss_child(which: str, config: str) -> None:
    """Hold one config as loaded, reset the peak, run a few steps at 256 and at 32 tokens (so both buckets'
    kernels are built, as in a chat with cached blocks); print the peak as JSON."""
    def status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key):
                return int(line.split()[1]) * 1024
        return 0

    import dllm_studio.models.llada  # noqa: F401  (imports count as the bare process, not as the model)
    import dllm_studio.quant.qlinear  # noqa: F401

    baseline = status("VmRSS")
    module = materialised(which, config)
    _trim()  # hand back the heap the random initialisation freed, so `held` is the model
    held = status("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM: the peak from here on
    for tokens in (256, 32):
        ids = torch.randint(0, 100, (1, tokens))
        for _ in range(3):
            step_ms(module, ids)
    print(json.dumps({"config": config, "baseline": baseline, "held": held, "peak": status("VmHWM")}))


def _trim() -> None:
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the peak then includes the allocator's cache
        pass


def rss(which: str, configs_: list[str]) -> list[dict]:
    rows = []
    for config in configs_:
        done = subprocess.run([sys.executable, __file__, "--rss-child", which, config], capture_output=True,
                              text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--skip-large", action="store_true")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json")
    parser.add_argument("--all", action="store_true", help="also the library W8A8 runtimes on the large model")
    parser.add_argument("--rss-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_child:
        rss_child(*args.rss_child)
        return
    from dllm_studio.hardware import cpu_units

    print(f"# {cpu_units().line()}; torch {torch.__version__}; fastest full precision here: "
          f"{'bf16' if _fast_bf16() else 'fp32'}")
    results = {"cpu": cpu_units().line(), "steps": [], "rss": {}}
    for which in ("demo",) + (() if args.skip_large else ("large",)):
        # the library W8A8 paths take ~10x fp32 on AVX2-only CPUs (no VNNI): minutes per step at 8B shapes
        rows = run(which, args.rounds, skip_a8=which == "large" and not cpu_units().vnni and not args.all)
        results["steps"] += rows
        print(f"\n## {which}: ms per step and ratio to the fastest full-precision dtype (lower is better)")
        print(f"{'config':<34} {'bytes':>10} {'T=32 ms':>9} {'ratio':>6} {'T=256 ms':>9} {'ratio':>6}  chosen kernels")
        for r in rows:
            print(f"{r['config']:<34} {r['bytes'] / 2**20:>8.1f}MB {r['ms_32']:>9.1f} {r['ratio_32']:>6.2f} "
                  f"{r['ms_256']:>9.1f} {r['ratio_256']:>6.2f}  {r['kernels']}", flush=True)
        peaks = rss(which, ["fp32", "bf16", "W4", "W2"])
        results["rss"][which] = peaks
        fast = min((p for p in peaks if p["config"] in ("fp32", "bf16")), key=lambda p: p["peak"])
        print(f"\n## {which}: peak RSS of 3 steps at 256 and 3 at 32 tokens (fresh process; peak reset after building)")
        for p in peaks:
            print(f"{p['config']:<6} peak {p['peak'] / 2**20:8.1f} MB ({p['peak'] / fast['peak']:.2f}x {fast['config']}); "
                  f"above the bare process: {(p['peak'] - p['baseline']) / 2**20:8.1f} MB "
                  f"({(p['peak'] - p['baseline']) / max(fast['peak'] - fast['baseline'], 1):.2f}x)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
