"""Batched decoding: aggregate tokens/s of B sequences decoded together, picogpt against transformers.

    python benchmarks/bench_batch.py [--sizes gpt2 gpt2-medium] [--batches 1 2 4 8 16] [--dtypes float32 int8]

Random weights of GPT-2's real shapes. For each batch size B: B different prompts of 13 to 16 tokens
(ragged: transformers gets them left-padded with an attention mask, picogpt gives each row its own
positions), greedy, KV cache on both engines, every row decoding --new-tokens tokens (no early end).
Aggregate decode tokens/s = B * (new_tokens - 1) / the time from each engine's first new token to its
last (transformers reports its tokens to a streamer), so prefill is not counted; time to first token =
prefill of all B prompts and the first pick.
One process, one run, engines interleaved, best of --repeats.
"""

import argparse
import os
import tempfile
import time

import numpy as np
import torch
import transformers
from compare_torch import SHAPES, random_checkpoint

import picogpt
from picogpt import formats
from picogpt.generate import decode_rows


def picogpt_generate(model):
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731

    def generate(prompts, n):
        """(seconds to the first new token, seconds for the n - 1 decode steps after it)"""
        start = time.perf_counter()
        for i, _ in enumerate(decode_rows(model.forward_rows, model.params, model.config, prompts, n, [greedy] * len(prompts), eot=None)):
            if i == 0:
                first = time.perf_counter()
        return first - start, time.perf_counter() - first

    return generate


class Clock:
    """A transformers streamer that notes when each new token arrives (its first put() is the prompt)."""

    def __init__(self):
        self.times = []

    def put(self, value):
        self.times.append(time.perf_counter())

    def end(self):
        pass


def torch_generate(hf):
    def generate(prompts, n):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock, start = Clock(), time.perf_counter()
        with torch.no_grad():
            hf.generate(ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0, streamer=clock)
        first = clock.times[1]  # times[0]: the prompt
        return first - start, clock.times[-1] - first

    return generate


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"], choices=SHAPES)
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "int8"], choices=formats.DTYPES)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
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
                runs = {e: [] for e in engines}
                for _ in range(args.repeats):
                    for e, generate in engines.items():
                        runs[e].append(generate(prompts, args.new_tokens))
                first = {e: min(t for t, _ in r) for e, r in runs.items()}
                rate = {e: batch * (args.new_tokens - 1) / min(d for _, d in r) for e, r in runs.items()}
                for e in engines:
                    single.setdefault(e, rate[e])
                    print(f"| {name} | {e} | {batch} | {rate[e]:.1f} | {rate[e] / single[e]:.2f}x | "
                          f"{rate[e] / rate['torch float32']:.2f}x | {1000 * first[e]:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
