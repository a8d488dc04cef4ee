"""How much of a denoising step is the sampler's own work, rather than the model's forward pass?

Builds a small random LLaDA-architecture model in memory (no download), then in one run:
  1. times `steps` bare forward passes over the same sequence length (the floor), and
  2. runs the real sampler (`sampling.denoise`, events and all) for the same number of steps,
and prints the sampler's overhead per step as a fraction of the step's wall time. Target: < 5%.

    python benchmarks/bench_sampler.py [--d-model 512] [--layers 6] [--vocab 8192] [--gen-length 128] [--remasking ...]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from dllm_studio import jobs
from dllm_studio.models.llada import LLaDA, LLaDAConfig, LLaDAModelLM
from dllm_studio.sampling import GenerationConfig


def small_llada(d_model: int, layers: int, vocab: int) -> LLaDA:
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    cfg = LLaDAConfig(d_model=d_model, n_heads=d_model // 64, n_layers=layers, mlp_hidden_size=int(d_model * 8 / 3),
                      vocab_size=vocab, max_sequence_length=4096, mask_token_id=vocab - 1, eos_token_id=vocab - 2)
    torch.manual_seed(0)
    module = LLaDAModelLM(cfg)
    words = {f"w{i}": i for i in range(vocab)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(words, unk_token="w0")))
    return LLaDA(module, tokenizer, config={}, path=".", source="random", mask_token_id=vocab - 1,
                 stop_token_ids=(vocab - 2,), context_length=4096, hidden_size=d_model, num_layers=layers,
                 vocab_size=vocab)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--prompt-length", type=int, default=64)
    parser.add_argument("--gen-length", type=int, default=128)
    parser.add_argument("--block-length", type=int, default=32)
    parser.add_argument("--remasking", default="low_confidence")
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    model = small_llada(args.d_model, args.layers, args.vocab)
    prompt = list(range(1, args.prompt_length + 1))
    config = GenerationConfig(gen_length=args.gen_length, steps=args.gen_length, block_length=args.block_length,
                              remasking=args.remasking, temperature=args.temperature)
    x = torch.tensor([prompt + [model.mask_token_id] * args.gen_length])
    model.forward(x)  # warm-up

    bare, sampler, inside = [], [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        for _ in range(config.steps):
            model.forward(x).float()
        bare.append((time.perf_counter() - t0) / config.steps)
        result = jobs.run(model.denoise(prompt, config))
        sampler.append(result.stats.wall_time_s / config.steps)
        inside.append(result.stats.forward_time_s / config.steps)

    step, floor, fwd = statistics.median(sampler), statistics.median(bare), statistics.median(inside)
    print(f"model: LLaDA d_model={args.d_model} layers={args.layers} vocab={args.vocab} "
          f"({model.num_parameters() / 1e6:.1f}M params), sequence {len(prompt)}+{args.gen_length} tokens, "
          f"{config.steps} steps, remasking={args.remasking}, temperature={args.temperature}, "
          f"torch threads={torch.get_num_threads()}")
    print(f"bare forward pass:           {1000 * floor:8.2f} ms/step")
    print(f"sampler step (wall):         {1000 * step:8.2f} ms/step")
    print(f"  of which inside the model: {1000 * fwd:8.2f} ms/step")
    print(f"sampler overhead vs bare forward:  {(step - floor) / step:6.1%} of the step")
    print(f"sampler overhead vs its own model: {(step - fwd) / step:6.1%} of the step  (target < 5%)")


if __name__ == "__main__":
    main()
