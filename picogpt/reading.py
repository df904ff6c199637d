"""How the model reads a text, token by token: what each position's distribution says of the token
that came, all from one pass over that position's logits.

For each scored token (every token but a text's first), with p the softmax of the logits before it:

    logprob   log p(token)
    rank      1 + the tokens with a larger logit (1: the model's first choice; GLTR's rank, 1-based)
    entropy   H(p) = -sum_v p(v) log p(v), nats
    variance  sum_v p(v) (log p(v) + H(p))^2: the variance of log p under p (Fast-DetectGPT's and
              Min-K%++'s sigma^2; their mu is -H(p))
    cross     with a second model (the observer) reading the same text: -sum_v q(v) log p(v), q the
              observer's softmax (Binoculars' cross-perplexity term); NaN without one
    top       the `top` most likely tokens, best first (ties: the lower id first), and their logprobs

`read_at` and `cross_at` here are NumPy, the reference the kernels (kernels.read_at, kernels.cross_at)
are tested against: the same arithmetic, float32 logits and float64 sums. A `Reader` is what the
scorer (scoring.py) calls on each pass's logits, as it calls log_softmax_at for plain scoring.
"""

from typing import NamedTuple

import numpy as np


def dtype(top):
    """The figures of one token, as a NumPy record."""
    return np.dtype(
        [
            ("logprob", np.float64),
            ("rank", np.int64),
            ("entropy", np.float64),
            ("variance", np.float64),
            ("cross", np.float64),
            ("top", np.int64, (top,)),
            ("top_logprob", np.float64, (top,)),
        ]
    )


def blank(n, top):
    """n tokens' figures, none known yet (NaN, rank 0, top ids -1): a text's first token stays so."""
    out = np.zeros(n, dtype(top))
    for name in ("logprob", "entropy", "variance", "cross", "top_logprob"):
        out[name] = np.nan
    out["top"] = -1
    return out


def read_at(logits, targets, top=0):
    """The figures of each row's target: logits [n, n_vocab] (float32), targets [n] -> records [n]."""
    logits = np.asarray(logits, np.float32)
    n = len(targets)
    rows = np.arange(n)
    d = logits - logits.max(axis=1, keepdims=True)  # <= 0: exp cannot overflow
    e = np.exp(d)
    total = e.sum(axis=1, dtype=np.float64)
    mean = (e * d).sum(axis=1, dtype=np.float64) / total  # E_p[d]; log p = d - log total
    out = blank(n, top)
    chosen = logits[rows, targets]
    out["logprob"] = d[rows, targets] - np.log(total)
    out["rank"] = 1 + (logits > chosen[:, None]).sum(axis=1)
    out["entropy"] = np.log(total) - mean
    out["variance"] = (e * (d - mean[:, None]) ** 2).sum(axis=1, dtype=np.float64) / total
    for i in range(n if top else 0):  # the top largest, and any tied with the last of them; then in order
        row = logits[i]
        best = np.flatnonzero(row >= np.partition(row, -top)[-top])
        best = best[np.lexsort((best, -row[best]))][:top]
        out["top"][i], out["top_logprob"][i] = best, d[i, best] - np.log(total[i])
    return out


def cross_at(observer, performer):
    """-sum_v q(v) log p(v) for each row: q = softmax(observer [n, n_vocab]), p = softmax(performer)."""
    dq = observer - observer.max(axis=1, keepdims=True)
    dp = performer - performer.max(axis=1, keepdims=True)
    eq = np.exp(dq)
    log_total_p = np.log(np.exp(dp).sum(axis=1, dtype=np.float64))
    return log_total_p - (eq * dp).sum(axis=1, dtype=np.float64) / eq.sum(axis=1, dtype=np.float64)


class Reader(NamedTuple):
    """The scorer's `at` for reading: called with a pass's logits and targets (and an observer's
    logits of the same tokens, for `cross`), it returns their records. top: how many of the most
    likely tokens each keeps; kernels: read_at and cross_at on the kernels (else NumPy's, above)."""

    top: int = 0
    kernels: bool = True

    def __call__(self, logits, targets, observer=None):
        if self.kernels:
            from . import kernels

            out = kernels.read_at(logits, targets, self.top)
            if observer is not None:
                out["cross"] = kernels.cross_at(observer, logits)
            return out
        out = read_at(logits, targets, self.top)
        if observer is not None:
            out["cross"] = cross_at(observer, logits)
        return out

    def blank(self, n):
        return blank(n, self.top)


def piece(tokenizer, token):
    """A token's text, a part of a character shown as U+FFFD."""
    return tokenizer.decode_single_token_bytes(int(token)).decode("utf-8", errors="replace")


class Reading(NamedTuple):
    """A text as the model read it (Model.read): per token, arrays [n] (the first token's figures NaN
    and rank 0: nothing comes before it), and the top tokens [n, top]."""

    ids: np.ndarray
    tokens: list  # each token's text (a part of a character shown with U+FFFD)
    logprob: np.ndarray
    rank: np.ndarray
    entropy: np.ndarray
    variance: np.ndarray
    cross: np.ndarray  # NaN without an observer
    top: np.ndarray
    top_logprob: np.ndarray

    @classmethod
    def of(cls, tokenizer, ids, records):
        return cls(
            np.asarray(ids, np.int64), [piece(tokenizer, t) for t in ids], *(records[f] for f in cls._fields[2:])
        )

    def rows(self, tokenizer):
        """Each token as a dict (picogpt score --tokens --json): text, id, logprob, rank, entropy,
        variance, cross (with an observer), top."""
        out = []
        for i, (t, text) in enumerate(zip(self.ids, self.tokens)):
            first = i == 0
            out.append(
                {
                    "id": int(t),
                    "text": text,
                    "logprob": None if first else float(self.logprob[i]),
                    "rank": None if first else int(self.rank[i]),
                    "entropy": None if first else float(self.entropy[i]),
                    "variance": None if first else float(self.variance[i]),
                    **({} if np.isnan(self.cross[i]) else {"cross": float(self.cross[i])}),
                    "top": []
                    if first
                    else [
                        {"id": int(a), "text": piece(tokenizer, a), "logprob": float(lp)}
                        for a, lp in zip(self.top[i], self.top_logprob[i])
                    ],
                }
            )
        return out
