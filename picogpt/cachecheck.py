"""A user's KV cache checked where it enters a forward pass (model.gpt2, kernels.gpt2, kernels.gpt2_rows):
one line that names kv_cache's arguments, instead of a failure deep in Numba or NumPy. Kept out of
model.py, which stays a page of math."""

import numpy as np

KV_DTYPES = ("float32", "float16")  # what a KV cache may hold (model.kv_cache's dtype)


def check_cache(cache, n_layer, n_head, n_embd, needed, rows=None):
    """Raise a one-line ValueError unless `cache` is this model's KV cache as kv_cache(n_layer, n_head,
    n_positions, n_embd) makes it, holding at least `needed` positions; with `rows` (the batch rows a
    call writes), kv_cache(..., n_rows=B)'s, rows within it. Checked where a cache enters a forward
    pass: the kernels would otherwise fail deep inside, or write past its end."""
    head_dim = n_embd // n_head
    batch = rows is not None
    make = f"make it with kv_cache(n_layer={n_layer}, n_head={n_head}, n_positions, n_embd={n_embd}{', n_rows' if batch else ''})"
    if not isinstance(cache, (list, tuple)) or len(cache) != n_layer:
        got = (
            f"has {len(cache)} layer{'' if len(cache) == 1 else 's'}"
            if isinstance(cache, (list, tuple))
            else f"is a {type(cache).__name__}"
        )
        raise ValueError(f"the KV cache {got}, not a list of (k, v) for each of the model's {n_layer} layers: {make}")
    if not n_layer:
        return
    _check_layer(cache, 0, None, n_head, head_dim, batch, make)
    first = cache[0][0]
    for i, kv in enumerate(cache):  # every layer as the first (the common case: one comparison each)
        if not (isinstance(kv, (list, tuple)) and len(kv) == 2 and _same(kv[0], first) and _same(kv[1], first)):
            _check_layer(cache, i, first, n_head, head_dim, batch, make)
    if first.shape[-2] < needed:
        raise ValueError(
            f"the KV cache holds {first.shape[-2]} positions and the inputs run to position {needed}: {make} and n_positions at least {needed}"
        )
    if batch and len(rows) and not 0 <= min(rows) <= max(rows) < first.shape[0]:
        raise ValueError(f"rows {[int(r) for r in rows]} run outside the KV cache's {first.shape[0]} rows: {make}")


def _same(a, first):
    return isinstance(a, np.ndarray) and a.shape == first.shape and a.dtype == first.dtype


def _check_layer(cache, i, first, n_head, head_dim, batch, make):
    """Raise the ValueError that says what is wrong with layer i of a KV cache (`first`: layer 0's keys)."""
    kv = cache[i]
    if not (isinstance(kv, (list, tuple)) and len(kv) == 2 and all(isinstance(a, np.ndarray) for a in kv)):
        raise ValueError(f"the KV cache's layer {i} is not a (k, v) pair of arrays: {make}")
    k, v = kv
    lead = "n_rows, " if batch else ""
    if k.shape != v.shape or len(k.shape) != 3 + batch or k.shape[-3] != n_head or k.shape[-1] != head_dim:
        shapes = f"{k.shape}" if k.shape == v.shape else f"{k.shape} and {v.shape}"
        raise ValueError(
            f"the KV cache's layer {i} has shape {shapes}, not ({lead}{n_head}, n_positions, {head_dim}) ({lead}n_head, "
            f"n_positions, n_embd // n_head): {make} (its last argument is n_embd, not head_dim)"
        )
    if k.dtype != v.dtype or k.dtype.name not in KV_DTYPES:
        raise ValueError(
            f"the KV cache's layer {i} holds {k.dtype} and {v.dtype}, not float32 or float16: {make} (dtype float32 or float16)"
        )
    if first is not None:  # a layer unlike the first
        raise ValueError(
            f"the KV cache's layer {i} is {k.dtype} {k.shape} but layer 0 {first.dtype} {first.shape}: every layer the same, {make}"
        )
