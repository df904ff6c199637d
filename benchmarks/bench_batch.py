"""Batched decoding: aggregate tokens/s of B sequences decoded together, picogpt against transformers.

    python benchmarks/bench_batch.py [--sizes gpt2 gpt2-medium] [--batches 1 2 4 8 16] [--dtypes float32 int8]

Random weights of GPT-2's real shapes. For each batch size B: B different prompts of 13 to 16 tokens
(ragged: transformers gets them left-padded with an attention mask, picogpt gives each row its own
positions), greedy, KV cache on both engines, every row decoding --new-tokens tokens (no early end).
Aggregate decode tokens/s = B * (new_tokens - 1) / (time for new_tokens - time for 1), so prefill is
not counted; time to first token = the time for 1 new token (prefill of all B prompts + one pick).
One process, one run, engines interleaved, best of --repeats.
"""

import argparse
import os
import tempfile

import numpy as np
import torch
import transformers
from compare_torch import SHAPES, best_of, random_checkpoint

import picogpt
from picogpt import formats
from picogpt.generate import decode_rows


def picogpt_generate(model):
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731

    def generate(prompts, n):
        for _ in decode_rows(model.forward_rows, model.params, model.config, prompts, n, [greedy] * len(prompts), eot=None):
            pass

    return generate


def torch_generate(hf):
    def generate(prompts, n):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

    return generate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"], choices=SHAPES)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "int8"], choices=formats.DTYPES)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    print(f"{os.cpu_count()} cores; torch {torch.__version__}, transformers {transformers.__version__}; "
          f"greedy, prompts of 13-16 tokens, {args.new_tokens} new tokens per row; best of {args.repeats}")  # fmt: skip
    print()
    print("| model | engine | batch | decode tok/s (all rows) | vs batch 1 | vs torch | time to first token ms |")
    print("|---|---|---|---|---|---|---|")
    for name in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            random_checkpoint(name, folder)
            hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
            base = picogpt.load(folder)
            engines = {f"picogpt {d}": picogpt_generate(base if d == "float32" else picogpt.load(folder, dtype=d)) for d in args.dtypes}
            engines["torch float32"] = torch_generate(hf)
            single = {}
            for batch in args.batches:
                prompts = [[int(t) for t in rng.integers(0, 50257, 16 - i % 4)] for i in range(batch)]
                for generate in engines.values():
                    generate(prompts, 2)  # warm up: compile, allocate
                first = {e: best_of(lambda: g(prompts, 1), args.repeats) for e, g in engines.items()}
                full = {e: best_of(lambda: g(prompts, args.new_tokens), args.repeats) for e, g in engines.items()}
                rate = {e: batch * (args.new_tokens - 1) / (full[e] - first[e]) for e in engines}
                for e in engines:
                    single.setdefault(e, rate[e])
                    print(f"| {name} | {e} | {batch} | {rate[e]:.1f} | {rate[e] / single[e]:.2f}x | "
                          f"{rate[e] / rate['torch float32']:.2f}x | {1000 * first[e]:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
