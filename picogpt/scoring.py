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


def logprobs(forward, params, config, ids, stride=None, progress=None, kv_dtype="float32"):
    """The log-probability of each token of `ids` given the ones before it: float64 [len(ids)], the
    first entry NaN (nothing comes before it). forward is model.gpt2 or kernels.gpt2; progress(n) is
    called with the number of tokens each window scores; kv_dtype: the cache's (model.kv_cache)."""
    n_ctx, n_head = config["n_positions"], config["n_head"]
    stride = stride_for(stride, n_ctx)
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
    cache = model.kv_cache(config["n_layer"], n_head, n_ctx, config["n_embd"], dtype=kv_dtype)
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


def blank(at, n):
    """What `at` gives for n tokens, none known yet: NaN logprobs (a reading.Reader's own blank records)."""
    return at.blank(n) if hasattr(at, "blank") else np.full(n, np.nan)


def stride_for(stride, n_ctx):
    """The stride between window starts (default half the context): ValueError unless 1 <= stride < n_ctx."""
    stride = n_ctx // 2 if stride is None else stride
    if not (isinstance(stride, int) and 1 <= stride < n_ctx):  # a window needs context before its first scored token
        raise ValueError(
            f"stride must be a whole number from 1 to {n_ctx - 1} (the context length - 1), got {stride!r}"
        )
    return stride


def groups(docs, tokens, most=4096):
    """Whole documents (token id arrays) in lists of at least `tokens` tokens (or `most` documents), in order."""
    batch, n = [], 0
    for ids in docs:
        batch.append(np.asarray(ids, np.int64))
        n += len(batch[-1])
        if n >= tokens or len(batch) == most:
            yield batch
            batch, n = [], 0
    if batch:
        yield batch


def logprobs_many(
    forward_rows,
    params,
    config,
    docs,
    stride=None,
    budget=None,
    group=None,
    at=log_softmax_at,
    skip=0,
    kv_dtype="float32",
    observer=None,
    progress=None,
):
    """`logprobs` of every document of `docs` (an iterable of token id lists), yielded in order, with
    many documents' windows in each forward pass: the same windows, each run whole as one sequence of
    a batch (its context and its scored tokens in one pass, the lm_head only on the scored ones), so
    ten thousand short documents cost the arithmetic of their tokens, not ten thousand passes.

    forward_rows: kernels.gpt2_rows or engine.rows_one_by_one(model.gpt2). budget: the most tokens
    (rows x the longest window among them) a pass holds, at least the context (default the larger of
    1024 and the context). The documents are read in groups of at least `group` tokens (default 8
    passes' worth), whole documents from the first on, their windows sorted by length so that each
    pass wastes no cache on padding: memory stays bounded for any number of documents. A document
    under 2 tokens gets NaN for each token (nothing to score). at: log_softmax_at, or its kernel
    (kernels.log_softmax_at), or a reading.Reader for each token's records. kv_dtype: the cache's
    (model.kv_cache). observer: (forward_rows, params, config) of a second model with the same
    tokenizer, run on the same windows (of the shorter context of the two) in its own pass beside
    each: `at` then gets its logits of the same tokens too (Binoculars' cross term). progress(n):
    called with the tokens each pass scores.

    skip: yield None for the first `skip` documents, computing only the group that holds the first
    wanted one, whole: a document's figures depend on the pass it shares (the kernels' paths and
    BLAS's blocking differ in the last bits), and the groups only on the documents from the first
    on, so a resumed run gets exactly the figures an uninterrupted one did."""
    n_ctx = min(c["n_positions"] for c in [config] + ([observer[2]] if observer else []))
    stride = stride_for(stride, n_ctx)
    budget = max(budget or 1024, n_ctx)
    group = group or 8 * budget
    run = hyper(config)
    # One scratch cache for every pass (and the observer's), (k, v) of budget * n_embd values per layer
    scratch = scratch_for(config, budget, kv_dtype)
    seen = observer and (observer[0], observer[1], hyper(observer[2]), scratch_for(observer[2], budget, kv_dtype))
    for batch in groups(docs, group):
        if len(batch) <= skip:  # a group before the first wanted document
            skip -= len(batch)
            yield from [None] * len(batch)
            continue
        skip = 0
        out = [blank(at, len(ids)) for ids in batch]
        shared, pre = (0, None) if observer else preamble(forward_rows, params, run, config, batch, at, kv_dtype, out)
        # A piece is a window (d, begin, first, end) and how many of its first positions the preamble holds
        pieces = [
            (d, begin, first, end, shared if begin == 0 else 0)
            for d, ids in enumerate(batch)
            if len(ids) >= 2
            for begin, first, end in windows(len(ids), n_ctx, stride)
        ]
        # A window runs tokens begin .. end-2: the logits after them score tokens first .. end-1
        pieces.sort(key=lambda p: p[3] - p[1], reverse=True)  # longest first: a pass's first window is its longest
        while pieces:
            width = pieces[0][3] - pieces[0][1] - 1
            step, pieces = pieces[: max(1, budget // width)], pieces[max(1, budget // width) :]
            cache = views(scratch, config, len(step), width)
            for row, (*_, held) in enumerate(step):  # the preamble's keys and values, computed once
                for (k, v), (pk, pv) in zip(cache, pre if held else ()):
                    k[row, :, :held], v[row, :, :held] = pk[0, :, :held], pv[0, :, :held]
            inputs = [batch[d][begin + held : end - 1] for d, begin, _, end, held in step]
            starts = np.cumsum([0] + [len(i) for i in inputs])
            keep = np.concatenate(
                [
                    np.arange(s + max(first, begin + held + 1) - 1 - begin - held, s + end - 1 - begin - held)
                    for s, (_, begin, first, end, held) in zip(starts, step)
                ]
            )
            rows, past = list(range(len(step))), [p[4] for p in step]
            logits = forward_rows(inputs, **params, **run, cache=cache, rows=rows, past=past, keep=keep)
            check_finite(logits, "a batch of documents")
            targets = np.concatenate([batch[d][max(first, held + 1) : end] for d, _, first, end, held in step])
            if observer:
                o_rows, o_params, o_run, o_scratch = seen
                o_cache = views(o_scratch, observer[2], len(step), width)
                o_logits = o_rows(inputs, **o_params, **o_run, cache=o_cache, rows=rows, past=past, keep=keep)
                check_finite(o_logits, "a batch of documents, on the observer")
                scores = at(logits, targets, o_logits)
            else:
                scores = at(logits, targets)
            done = 0
            for d, _, first, end, held in step:
                first = max(first, held + 1)
                out[d][first:end], done = scores[done : done + end - first], done + end - first
            if progress:
                progress(done)
        yield from out


def hyper(config):
    return dict(n_head=config["n_head"], eps=config.get("layer_norm_epsilon", 1e-5))


def scratch_for(config, budget, kv_dtype):
    """A cache of budget * n_embd keys and values per layer, flat: see `views`."""
    cache = model.kv_cache(config["n_layer"], 1, budget, config["n_embd"], dtype=kv_dtype)
    return [(k.reshape(-1), v.reshape(-1)) for k, v in cache]


def views(scratch, config, rows, width):
    """The scratch cache as a pass of `rows` windows of up to `width` tokens: [rows, n_head, width, head_dim]."""
    n_head, n_embd = config["n_head"], config["n_embd"]
    return [
        tuple(kv[: rows * width * n_embd].reshape(rows, n_head, width, n_embd // n_head) for kv in layer)
        for layer in scratch
    ]


SHARED = 16  # the fewest tokens every document of a group must begin with for them to be computed once


def preamble(forward_rows, params, run, config, batch, at, kv_dtype, out):
    """Documents that all begin the same way (a shared preamble, a template) compute that beginning
    once: (its length P, its keys and values) with P >= SHARED, else (0, None). Each document's scores
    of tokens 1 .. P, which the preamble's logits give, are written to `out` here; its own tokens then
    run after the preamble's keys and values. P leaves each document at least two tokens of its own
    in its first window (one fed, one scored)."""
    docs = [ids for ids in batch if len(ids) >= 2]
    if len(docs) < 2:
        return 0, None
    n = min(min(len(ids), config["n_positions"]) for ids in docs) - 2
    first = docs[0][:n]
    for ids in docs[1:]:
        differ = np.flatnonzero(ids[: len(first)] != first)
        first = first[: differ[0]] if len(differ) else first
    if len(first) < SHARED:
        return 0, None
    P = len(first)
    cache = model.kv_cache(config["n_layer"], config["n_head"], P, config["n_embd"], n_rows=1, dtype=kv_dtype)
    logits = forward_rows([first], **params, **run, cache=cache, rows=[0], past=[0], last=False)  # [P, n_vocab]
    check_finite(logits, "the documents' shared beginning")
    for d, ids in enumerate(batch):
        if len(ids) >= 2:
            out[d][1 : P + 1] = at(logits, ids[1 : P + 1])  # the last row scores each document's own token P
    return P, cache


def summary(tokenizer, ids, token_logprobs):
    """Totals of a scored text: token count, mean negative log-likelihood (nats), perplexity, and bits
    per byte over the UTF-8 bytes of the scored tokens (all but the first). A text under 2 tokens has
    nothing scored: None for the figures, and a `reason`."""
    if len(ids) < 2:
        return {
            "tokens": len(ids),
            "scored_tokens": 0,
            "nll": None,
            "perplexity": None,
            "bits_per_byte": None,
            "bytes": 0,
            "reason": f"{len(ids)} token{'' if len(ids) == 1 else 's'}: scoring needs at least 2",
        }
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
