"""What each weight format costs in quality, against the same model in float32.

    python benchmarks/quality.py --model tiny             # the trained model that ships with picogpt
    python benchmarks/quality.py --random gpt2            # random weights of gpt2's real shapes

For each dtype, on the held-out tenth of the tiny model's corpus (tools/tiny/tiny_corpus.py: Python's
help topics and standard-library docstrings), tokenized with the model's own tokenizer:

- perplexity: exp of the mean negative log-likelihood of every token after the first, in
  non-overlapping windows of the model's context (at most --max-tokens tokens);
- relative RMS logit error: RMS(logits - float32 logits) / RMS(float32 logits) over the same
  positions, each row centred first (softmax ignores a shift of a whole row, so a shift is no error);
- greedy agreement: float32 continues the first 32 held-out tokens greedily for 128 tokens; the
  share of those 128 positions where the dtype's own argmax (fed the same tokens) is the same token,
  and how many tokens its free-running greedy continuation matches before the first difference.
"""

import argparse
import os
import sys
import tempfile

import numpy as np

import picogpt
from picogpt import formats, tokenizer
from picogpt.checkpoint import hub
from picogpt.engine import decode_tokens

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools", "tiny"))
from tiny_corpus import heldout_text  # noqa: E402


def windows(ids, n_ctx, max_tokens):
    """Non-overlapping windows of the context over the first max_tokens ids."""
    ids = ids[:max_tokens]
    return [ids[i : i + n_ctx] for i in range(0, len(ids) - 1, n_ctx)]


def nll(logits, targets):
    """Negative log-likelihood of each target under each row of logits, in float64."""
    logits = logits.astype(np.float64)
    top = logits.max(axis=-1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=-1))
    return log_z - logits[np.arange(len(targets)), targets]


def centred(x):
    return x - x.mean(axis=-1, keepdims=True)


def greedy(m, prompt, n):
    return list(decode_tokens(m.forward, m.params, m.config, prompt, n, lambda logits: int(np.argmax(logits))))


def greedy_agreement(m, prompt, expected):
    """(share of positions whose argmax equals float32's greedy token, length of the identical free-running prefix)."""
    logits = m.forward(prompt + expected[:-1], **m.params, n_head=m.config["n_head"])[len(prompt) - 1 :]
    same = float(np.mean(np.argmax(logits[:, : m.tokenizer.n_vocab], axis=-1) == np.asarray(expected)))
    free = greedy(m, prompt, len(expected))
    prefix = next((i for i, (a, b) in enumerate(zip(free, expected)) if a != b), len(expected))
    return same, prefix


def measure(folder, dtypes=formats.DTYPES, max_tokens=65536, new_tokens=128, backend="numba"):
    """{dtype: {perplexity, tokens, relative_rms_logit_error, greedy_agreement, greedy_identical_prefix}}."""
    models = {dtype: picogpt.load(folder, backend=backend, dtype=dtype) for dtype in ("float32", *dtypes)}
    base = models["float32"]
    ids = tokenizer.encode(base.tokenizer, heldout_text())
    losses, sq_err, sq_ref = {d: [] for d in dtypes}, dict.fromkeys(dtypes, 0.0), 0.0
    for window in windows(ids, base.config["n_positions"], max_tokens):
        if len(window) < 2:
            continue
        logits = {d: m.forward(window, **m.params, n_head=m.config["n_head"]) for d, m in models.items()}
        sq_ref += float((centred(logits["float32"]) ** 2).sum())
        for dtype in dtypes:
            losses[dtype].append(nll(logits[dtype][:-1], np.asarray(window[1:])))
            sq_err[dtype] += float((centred(logits[dtype] - logits["float32"]) ** 2).sum())
    prompt = ids[:32]
    expected = greedy(base, prompt, new_tokens)
    results = {}
    for dtype in dtypes:
        loss = np.concatenate(losses[dtype])
        same, prefix = greedy_agreement(models[dtype], prompt, expected)
        results[dtype] = {
            "perplexity": float(np.exp(loss.mean())),
            "tokens": len(loss),
            "relative_rms_logit_error": (sq_err[dtype] / sq_ref) ** 0.5,
            "greedy_agreement": same,
            "greedy_identical_prefix": prefix,
        }
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a picogpt model name, hub repo id or local folder (tiny: the shipped one)")
    which.add_argument("--random", help="random weights of this model's shapes (gpt2, gpt2-medium, ...)")
    p.add_argument("--dtypes", nargs="+", default=list(formats.DTYPES), choices=formats.DTYPES)
    p.add_argument("--max-tokens", type=int, default=65536, help="score at most this many held-out tokens")
    p.add_argument("--new-tokens", type=int, default=128)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.random:
            from compare_torch import random_checkpoint

            folder = random_checkpoint(args.random, tmp)
        else:
            folder = hub.resolve(args.model)
        results = measure(folder, args.dtypes, args.max_tokens, args.new_tokens)

    base = results["float32"]["perplexity"] if "float32" in results else None
    name = f"random {args.random}" if args.random else args.model
    print(
        f"{name}: held-out text of tools/tiny/tiny_corpus.py, {results[args.dtypes[0]]['tokens']} tokens scored; greedy: {args.new_tokens} tokens after a 32-token prompt"
    )
    print("| dtype | perplexity | vs float32 | relative RMS logit error | greedy agreement | identical greedy prefix |")
    print("|---|---|---|---|---|---|")
    for dtype, r in results.items():
        vs = f"{100 * (r['perplexity'] / base - 1):+.2f}%" if base else ""
        print(
            f"| {dtype} | {r['perplexity']:.3f} | {vs} | {100 * r['relative_rms_logit_error']:.2f}% | "
            f"{100 * r['greedy_agreement']:.1f}% | {r['greedy_identical_prefix']}/{args.new_tokens} |"
        )


if __name__ == "__main__":
    main()
