"""Scoring speed: tokens/s of `model.logprobs` (sliding windows, prefill-sized passes) against the
Hugging Face perplexity guide's loop on transformers, same weights, same windows, same log-probabilities.

    python benchmarks/bench_score.py [--sizes gpt2] [--tokens 2048] [--stride 512] [--dtypes float32 int8]

Random weights of GPT-2's real shapes and random token ids (the hub is out of reach here); one
process, engines interleaved, best of --repeats.
"""

import argparse
import tempfile
import time

import numpy as np
import torch
import transformers
from compare_torch import random_checkpoint

import picogpt


def torch_logprobs(hf, ids, stride):
    """The perplexity guide's loop: log-probability of every token after the first."""
    n_ctx, out, prev_end = hf.config.n_positions, np.full(len(ids), np.nan), 0
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids[begin:end]])).logits[0], dim=-1)
        first = max(prev_end, begin + 1)
        out[first:end] = (
            logp[first - 1 - begin : end - 1 - begin].gather(1, torch.tensor(ids[first:end])[:, None])[:, 0].numpy()
        )
        prev_end = end
        if end == len(ids):
            break
    return out


def best(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "int8"])
    p.add_argument("--tokens", type=int, default=2048)
    p.add_argument("--stride", type=int, default=512)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    print(
        f"{torch.get_num_threads()} threads; torch {torch.__version__}, transformers {transformers.__version__}; "
        f"{args.tokens} tokens, windows of 1024, stride {args.stride}; best of {args.repeats}\n"
    )
    print("| model | engine | score tok/s | vs torch | mean nll | max abs logprob diff vs torch |")
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            random_checkpoint(size, folder)
            hf = transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="eager").eval()
            ids = [int(t) for t in rng.integers(0, 50257, args.tokens)]
            models = {dtype: picogpt.load(folder, dtype=dtype) for dtype in args.dtypes}
            for m in models.values():
                m.logprobs(ids[:600], stride=args.stride)  # compile and touch the weights
            t_torch, ref = best(lambda: torch_logprobs(hf, ids, args.stride), args.repeats)
            rows = [("torch float32", t_torch, ref)]
            for dtype, m in models.items():
                t, lp = best(lambda: m.logprobs(ids, stride=args.stride), args.repeats)
                rows.append((f"picogpt {dtype}", t, lp))
            for name, t, lp in rows:
                diff = np.nanmax(np.abs(lp - ref))
                print(
                    f"| {size} | {name} | {(len(ids) - 1) / t:.0f} | {t_torch / t:.2f}x | {-np.nanmean(lp):.4f} | {diff:.1e} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
