"""Choosing the next token from logits: logit bias, penalties, greedy, temperature, top-k, top-p (nucleus)."""

import math

import numpy as np

from .model import softmax


MAX_SEED = 2**64 - 1  # seeds are whole numbers from 0 to this: what NumPy's generators take (any non-negative int) and 64 bits hold


def is_seed(v):
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_SEED


def check_sampling(max_new_tokens=0, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, seed=None, names=None):
    """Raise ValueError naming the first bad value; names: what to call each argument (the CLI's flags)."""
    name = lambda arg: (names or {}).get(arg, arg)  # noqa: E731
    whole = lambda v: isinstance(v, int) and not isinstance(v, bool)  # noqa: E731
    number = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)  # noqa: E731
    if not (whole(max_new_tokens) and max_new_tokens >= 0):
        raise ValueError(f"{name('max_new_tokens')} must be a whole number >= 0, got {max_new_tokens!r}")
    if not (number(temperature) and temperature >= 0):
        raise ValueError(f"{name('temperature')} must be a number >= 0 (0 is greedy), got {temperature!r}")
    if top_k is not None and not (whole(top_k) and top_k >= 1):
        raise ValueError(f"{name('top_k')} must be a whole number >= 1{'' if names else ' (or None for no limit)'}, got {top_k!r}")
    if not (number(top_p) and 0 < top_p <= 1):
        raise ValueError(f"{name('top_p')} must be in (0, 1], got {top_p!r}")
    if not (number(repetition_penalty) and repetition_penalty > 0):
        raise ValueError(f"{name('repetition_penalty')} must be a number > 0 (1 turns it off), got {repetition_penalty!r}")
    if seed is not None and not is_seed(seed):
        raise ValueError(f"{name('seed')} must be a whole number from 0 to 2**64 - 1{'' if names else ' or None'}, got {seed!r}")


def penalize(logits, seen, penalty):
    """CTRL's repetition penalty, as transformers applies it before temperature, top-k and top-p: the
    logit of every token in `seen` (the prompt and the tokens generated so far) is divided by the
    penalty if it is positive and multiplied by it if negative, so a penalty > 1 makes repeats less likely."""
    if penalty == 1:
        return logits
    seen = np.unique(np.asarray(seen, np.int64))
    logits, repeated = logits.copy(), logits[seen]
    logits[seen] = np.where(repeated < 0, repeated * penalty, repeated / penalty)
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


def picker(prompt, seed=None, temperature=1.0, top_k=None, top_p=1.0, repetition_penalty=1.0, presence_penalty=0.0,
           frequency_penalty=0.0, logit_bias=None, n_vocab=None, chosen=None):  # fmt: skip
    """pick(logits) -> the next token of a sequence that starts with `prompt` (token ids): logit_bias
    ({token: bias}, added first, as OpenAI does), the penalties, then `sample` with its own random
    stream from `seed`. n_vocab: tokens past it (padding rows of wte) are never picked. chosen(logits,
    token): told of each pick with the raw logits (for log-probabilities)."""
    rng, seen, counts = np.random.default_rng(seed), list(prompt), {}
    bias = (np.fromiter(logit_bias.keys(), np.int64), np.fromiter(logit_bias.values(), np.float32)) if logit_bias else None

    def pick(logits):
        raw = logits = logits[:n_vocab]
        if bias is not None:
            logits = logits.copy()
            logits[bias[0]] += bias[1]
        logits = presence_frequency(penalize(logits, seen, repetition_penalty), counts, presence_penalty, frequency_penalty)
        token = sample(logits, rng, temperature, top_k, top_p)
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
        candidates = np.argpartition(logits, -top_k)[-top_k:]  # the k largest, unordered
    probs = softmax(logits[candidates] / temperature)  # [n_candidates]
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
