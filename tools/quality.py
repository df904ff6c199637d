"""Each weight format's quality against float32 on the same weights: perplexity on a held-out text,
relative RMS logit error, greedy agreement. benchmarks/quality.py prints it; tests/test_quality.py
holds the formats to their bounds."""

import os
import sys

import numpy as np

import picogpt
from picogpt import formats, tokenizer
from picogpt.engine import decode_tokens

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny"))
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
