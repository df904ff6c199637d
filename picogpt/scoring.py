"""Scoring text: the log-probability of every token given the ones before it, and perplexity.

A text longer than the context is scored with the sliding window of Hugging Face's perplexity guide:
windows of n_ctx tokens that start `stride` tokens apart, each scoring only the tokens the previous
window did not reach, so every token after the first is scored exactly once, with up to n_ctx - stride
tokens (more near the start) of context before it; stride < n_ctx. Each window runs in two prefill-sized passes over
one KV cache, its context then its new tokens, so the lm_head works only on rows that are scored.
"""

import math

import numpy as np

from . import model
from .sampling import check_finite


def log_softmax_at(logits, targets):
    """log softmax(logits[i])[targets[i]] for each row i: [n, n_vocab], [n] -> [n] (float64)."""
    peak = logits.max(axis=1, keepdims=True)  # subtract the row's max so exp cannot overflow
    total = np.exp(logits - peak).sum(axis=1, dtype=np.float64)
    return (logits[np.arange(len(targets)), targets] - peak[:, 0]).astype(np.float64) - np.log(total)


def windows(n_tokens, n_ctx, stride):
    """(begin, first, end) of each window: it runs tokens begin..end-1 and scores first..end-1."""
    prev_end, begin = 0, 0
    while prev_end < n_tokens:
        end = min(begin + n_ctx, n_tokens)
        yield begin, max(prev_end, 1), end
        prev_end, begin = end, begin + stride


def logprobs(forward, params, config, ids, stride=None, progress=None):
    """The log-probability of each token of `ids` given the ones before it: float64 [len(ids)], the
    first entry NaN (nothing comes before it). forward is model.gpt2 or kernels.gpt2; progress(n) is
    called with the number of tokens each window scores."""
    n_ctx, n_head = config["n_positions"], config["n_head"]
    stride = n_ctx // 2 if stride is None else stride
    if not (isinstance(stride, int) and 1 <= stride < n_ctx):  # a window needs context before its first scored token
        raise ValueError(
            f"stride must be a whole number from 1 to {n_ctx - 1} (the context length - 1), got {stride!r}"
        )
    ids = np.asarray(ids)
    if ids.ndim != 1 or (len(ids) and ids.dtype.kind not in "iu"):
        raise ValueError(f"ids must be a list of token ids (whole numbers), got {ids!r}")
    if len(ids) < 2:
        raise ValueError(f"scoring needs a text of at least 2 tokens, got {len(ids)}")
    if ids.min() < 0 or ids.max() >= config["vocab_size"]:
        raise ValueError(
            f"ids hold token id {ids.min() if ids.min() < 0 else ids.max()}, outside the vocabulary of {config['vocab_size']}"
        )
    ids = ids.astype(np.int64)
    run = dict(n_head=n_head, eps=config.get("layer_norm_epsilon", 1e-5))
    cache = model.kv_cache(config["n_layer"], n_head, n_ctx, config["n_embd"])
    out = np.full(len(ids), np.nan)
    for begin, first, end in windows(len(ids), n_ctx, stride):
        # The context up to `first` gives the logits for token `first`; tokens first .. end-2, run
        # against the cache, give those for first+1 .. end-1. Token end-1 itself predicts nothing here.
        logits = forward(ids[begin:first], **params, **run, cache=cache, past=0, last=True)  # [1, n_vocab]
        check_finite(logits, f"token {first}")
        out[first] = log_softmax_at(logits, ids[first : first + 1])[0]
        if end - first > 1:
            logits = forward(
                ids[first : end - 1], **params, **run, cache=cache, past=first - begin
            )  # [end-1-first, n_vocab]
            check_finite(logits, f"tokens {first + 1} to {end - 1}")
            out[first + 1 : end] = log_softmax_at(logits, ids[first + 1 : end])
        if progress:
            progress(end - first)
    return out


def summary(tokenizer, ids, token_logprobs):
    """Totals of a scored text: token count, mean negative log-likelihood (nats), perplexity, and bits
    per byte over the UTF-8 bytes of the scored tokens (all but the first)."""
    nll = -float(np.sum(token_logprobs[1:]))
    n_scored = len(ids) - 1
    n_bytes = sum(len(tokenizer.decode_single_token_bytes(int(t))) for t in ids[1:])
    mean = nll / n_scored
    return {
        "tokens": len(ids),
        "scored_tokens": n_scored,
        "nll": mean,
        "perplexity": math.exp(mean),
        "bits_per_byte": nll / math.log(2) / max(n_bytes, 1),
        "bytes": n_bytes,
    }
