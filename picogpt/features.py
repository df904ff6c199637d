"""A document's figures from its tokens' records (reading.py): the statistics that detection,
contamination and data-quality tools compute from a reference model's distribution at each position.
docs/reading.md defines each with its paper.

Each row of FEATURES is one feature: its name as `--features` takes it, whether it takes a k (a
percentage), its default k, and its function of (records of the scored tokens, the text's UTF-8
bytes, k). `parse` reads `--features`; `of` computes the chosen ones of one document.
"""

import math
import zlib
from typing import NamedTuple

import numpy as np

GLTR = (10, 100, 1000)  # GLTR's buckets: rank <= 10, <= 100, <= 1000, and beyond


def lowest(values, k):
    """The mean of the lowest k% of values (at least one), as Min-K% Prob takes them."""
    n = max(1, int(len(values) * k / 100))
    return float(np.mean(np.sort(values)[:n]))


def min_k(r, text, k):  # Shi et al. 2024
    return lowest(r["logprob"], k)


def min_k_plus_plus(r, text, k):  # Zhang et al. 2024: log p standardised by the position's mu and sigma
    return lowest((r["logprob"] + r["entropy"]) / np.sqrt(r["variance"]), k)


def zlib_ratio(r, text, k):  # Carlini et al. 2021: log-perplexity over the zlib-compressed size in bytes
    return float(-np.mean(r["logprob"])) / len(zlib.compress(text))


def mean_entropy(r, text, k):
    return float(np.mean(r["entropy"]))


def gltr(r, text, k):  # Gehrmann et al. 2019: how many tokens fall in each rank bucket
    edges = np.searchsorted(GLTR, r["rank"])  # 0 for rank <= 10, ..., 3 beyond 1000
    return [int(c) for c in np.bincount(edges, minlength=len(GLTR) + 1)]


def fast_detect(r, text, k):  # Bao et al. 2024, the analytic criterion with one model sampling and scoring
    return float((np.sum(r["logprob"]) + np.sum(r["entropy"])) / math.sqrt(np.sum(r["variance"])))


def binoculars(r, text, k):  # Hans et al. 2024: log-perplexity over the cross-perplexity with the observer
    return float(-np.mean(r["logprob"]) / np.mean(r["cross"]))


class Feature(NamedTuple):
    name: str
    takes_k: bool
    k: float  # the default k
    compute: object
    observer: bool = False  # needs a second model


FEATURES = {
    f.name: f
    for f in [
        Feature("min-k", True, 20, min_k),
        Feature("min-k++", True, 20, min_k_plus_plus),
        Feature("zlib", False, None, zlib_ratio),
        Feature("entropy", False, None, mean_entropy),
        Feature("gltr", False, None, gltr),
        Feature("fast-detect", False, None, fast_detect),
        Feature("binoculars", False, None, binoculars, observer=True),
    ]
}


class Wanted(NamedTuple):
    """One feature asked for: its key in the output (`min-k=20`, `gltr`), its row, its k."""

    key: str
    feature: Feature
    k: float


def parse(spec):
    """`--features` (a comma-separated list, each a name or name=k) -> [Wanted]; ValueError naming the fix."""
    wanted = []
    for item in [i.strip() for i in spec.split(",") if i.strip()] if isinstance(spec, str) else spec:
        name, _, k = item.partition("=")
        feature = FEATURES.get(name)
        if feature is None:
            raise ValueError(
                f"no feature {name!r}: choose from {', '.join(FEATURES)} (min-k and min-k++ take =K, a percentage)"
            )
        if k and not feature.takes_k:
            raise ValueError(f"the feature {name!r} takes no k: write {name}")
        try:
            k = float(k) if k else feature.k
        except ValueError:
            raise ValueError(f"{item!r}: K must be a percentage from 0 to 100, as in {name}=20") from None
        if feature.takes_k and not 0 < k <= 100:
            raise ValueError(f"{item!r}: K must be a percentage above 0 and at most 100, as in {name}=20")
        key = f"{name}={k:g}" if feature.takes_k else name
        wanted.append(Wanted(key, feature, k))
    if not wanted:
        raise ValueError(f"name at least one feature: {', '.join(FEATURES)}")
    return wanted


def needs_observer(wanted):
    return any(w.feature.observer for w in wanted)


def of(records, text, wanted):
    """The wanted features of one document: records of all its tokens (the first, unscored, is left
    out here), its UTF-8 bytes. None for each where nothing was scored (under 2 tokens)."""
    scored = records[1:]
    return {w.key: w.feature.compute(scored, text, w.k) if len(scored) else None for w in wanted}
