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

from picogpt import formats
from picogpt.checkpoint import hub

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from quality import measure  # noqa: E402  (tools/quality.py: the measurement the tests hold to their bounds)


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
