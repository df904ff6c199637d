"""Choosing the next token from logits: logit bias, penalties, greedy, temperature, top-k, top-p (nucleus)."""

import math

import numpy as np

from .model import softmax
from .options import SamplingParams  # noqa: F401  (picogpt.SamplingParams; picker takes one)


def penalize(logits, seen, penalty):
    """CTRL's repetition penalty, as transformers applies it before temperature, top-k and top-p: the
    logit of every token in `seen` (the prompt and the tokens generated so far) is divided by the
    penalty if it is positive and multiplied by it if negative, so a penalty > 1 makes repeats less likely."""
    if penalty == 1:
        return logits
    seen = np.unique(np.asarray(seen, np.int64))
    logits, repeated = logits.copy(), logits[seen].astype(np.float64)  # float64: a penalty past float32's range
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):  # a penalty near 0 or past float64's range
        penalized = np.where(repeated < 0, repeated * penalty, repeated / penalty)
    big = float(np.finfo(np.float32).max)  # as their limits: +-inf the largest float32, 0 / 0 still 0
    logits[seen] = np.clip(np.nan_to_num(penalized, nan=0.0, posinf=big, neginf=-big), -big, big)
    return logits


def presence_frequency(logits, counts, presence, frequency):
    """OpenAI's penalties: logits[j] - counts[j] * frequency - (counts[j] > 0) * presence, counts[j]
    the times token j was generated so far (the prompt does not count)."""
    if not counts or (presence == 0 and frequency == 0):
        return logits
    ids = np.fromiter(counts.keys(), np.int64, len(counts))
    logits = logits.copy()
    logits[ids] -= np.fromiter(counts.values(), np.float32, len(counts)) * frequency + presence
    return logits


def picker(prompt, params, seed=None, n_vocab=None, chosen=None):
    """pick(logits) -> the next token of a sequence that starts with `prompt` (token ids), chosen as
    `params` (SamplingParams) say: logit_bias added first (as OpenAI does), the repetition, presence
    and frequency penalties, then `sample` with its own random stream from `seed` (default
    params.seed; the n samples of one prompt use seed + i). n_vocab: tokens past it (padding rows of
    wte) are never picked. chosen(logits, token): told of each pick with the raw logits (for
    log-probabilities)."""
    p = params
    rng, seen, counts = np.random.default_rng(p.seed if seed is None else seed), list(prompt), {}
    bias = (
        (np.fromiter((t for t, _ in p.logit_bias), np.int64), np.fromiter((b for _, b in p.logit_bias), np.float32))
        if p.logit_bias
        else None
    )

    def pick(logits):
        raw = logits = logits[:n_vocab]
        if bias is not None:
            logits = logits.copy()
            logits[bias[0]] += bias[1]
        logits = presence_frequency(
            penalize(logits, seen, p.repetition_penalty), counts, p.presence_penalty, p.frequency_penalty
        )
        token = sample(logits, rng, p.temperature, p.top_k, p.top_p)
        seen.append(token)
        counts[token] = counts.get(token, 0) + 1
        if chosen is not None:
            chosen(raw, token)
        return token

    return pick


def sample(logits, rng, temperature=1.0, top_k=None, top_p=1.0):
    """One token id from logits [n_vocab], in the order transformers applies them: temperature, top-k, top-p."""
    if temperature == 0:
        return int(np.argmax(logits))
    candidates = np.arange(len(logits))
    if top_k is not None and top_k < len(logits):
        # the k largest, in token order: argpartition's own order differs between NumPy's SIMD paths
        # (AVX-512 sorts with x86-simd-sort), and the draw walks the candidates in order
        candidates = np.sort(np.argpartition(logits, -top_k)[-top_k:])
    x = logits[candidates]  # [n_candidates]
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        probs = softmax(x / temperature)
        if np.isnan(probs[0]):  # all NaN: x / temperature overflowed (or it is 0 in float32)
            probs = softmax(np.where(x == x.max(), 0.0, -np.inf))  # the limit: the largest alike
    if top_p < 1:
        order = np.argsort(-probs, kind="stable")
        mass_before = np.cumsum(probs[order]) - probs[order]
        keep = mass_before < top_p  # smallest set whose mass reaches top_p
        keep[0] = True  # never empty: a top_p below float32's smallest number is 0 here
        order = order[keep]
        candidates, probs = candidates[order], probs[order]
    cdf = np.cumsum(probs, dtype=np.float64)
    i = np.searchsorted(cdf, rng.random() * cdf[-1], side="right")
    return int(candidates[min(i, len(cdf) - 1)])


class NonFiniteError(ValueError):
    """The model produced NaN or infinite logits: a weight is almost certainly NaN or infinite."""


def check_finite(logits, where):
    """Raise NonFiniteError, naming `where`, unless every logit is finite (two reductions, no temporaries:
    max - min is NaN or infinite exactly when some logit is)."""
    if not math.isfinite(float(logits.max()) - float(logits.min())):
        raise NonFiniteError(
            f"the model's logits are NaN or infinite at {where}: the weights hold a NaN or infinity; "
            "find the bad tensors with `picogpt info --check --model MODEL`"
        )
