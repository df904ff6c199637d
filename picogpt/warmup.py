"""Compiling the kernels before the first token, and saying so.

Numba compiles each kernel for this CPU the first time it runs with a new weight format, and keeps
the machine code in its cache (`__pycache__` beside the module, or NUMBA_CACHE_DIR), so later runs
only load it. Compiling lazily would stall a first run once at the prompt and again at the first
decoding step; instead `warm_up` runs the same steps on a small model of the same weight formats
before the real ones, so everything a command needs is compiled up front, once, and a line on
stderr says what is happening. On a warm cache the whole warm-up takes a few milliseconds.
"""

import math
import sys
import time

import numpy as np

from . import formats

N_VOCAB = 64  # the small model's vocabulary
ROOM = 31  # the small model's context beyond its longest prompt: decoding steps, and a window to slide
ONE_PATH = 256  # the longest prompt but one where the kernels have one path at every length (int8, NumPy)


def longest(params):
    """The longest prompt the small model is given: one token past the longest step the kernels run
    as rows on these weights (kernels.forward.rows_max), so that a longer real prompt takes BLAS
    there too; ONE_PATH + 1 for int8, whose steps are rows at any length, and for the NumPy backend
    (this module must not import Numba: the kernels' module is read only once a model has loaded it)."""
    forward = sys.modules.get("picogpt.kernels.forward")
    rows = forward.rows_max(weights_of(params)[1]) if forward else math.inf
    return (ONE_PATH if rows == math.inf else rows) + 1


def small_params(params, n_ctx, n_embd=64, n_vocab=N_VOCAB):
    """A one-layer GPT-2 of context n_ctx whose every weight has the format of the one in `params`."""

    def weight(shape, like):  # [in, out]; the values do not matter, only the types
        return formats.pack(np.full(shape, 0.01, np.float32), formats.dtype_of(like))

    def vector(n):
        return np.full(n, 0.01, np.float32)

    block, n_inner = params["h"][0], 4 * n_embd  # (every block has the formats of the first)
    shapes = {
        ("attn", "c_attn"): (n_embd, 3 * n_embd),
        ("attn", "c_proj"): (n_embd, n_embd),
        ("mlp", "c_fc"): (n_embd, n_inner),
        ("mlp", "c_proj"): (n_inner, n_embd),
    }
    small = {
        "ln_1": {"weight": vector(n_embd), "bias": vector(n_embd)},
        "ln_2": {"weight": vector(n_embd), "bias": vector(n_embd)},
        "attn": {},
        "mlp": {},
    }
    for (part, name), shape in shapes.items():
        small[part][name] = {"weight": weight(shape, block[part][name]["weight"]), "bias": vector(shape[1])}
    wte = np.full((n_vocab, n_embd), 0.01, np.float32)
    return {
        "wte": {"weight": formats.pack_wte(wte, formats.dtype_of(params["wte"]["weight"]))},
        "wpe": {"weight": np.full((n_ctx, n_embd), 0.01, np.float32)},
        "h": [small],
        "ln_f": {"weight": vector(n_embd), "bias": vector(n_embd)},
    }, {"n_positions": n_ctx, "n_head": 2, "n_layer": 1, "n_embd": n_embd, "vocab_size": n_vocab}


class Compiling:
    """Within this context, the first kernel Numba compiles (not loads from its cache) prints one
    line, once per process; `seconds` is then the time spent compiling."""

    said = False

    def __init__(self, say):
        self.say, self.depth, self.seconds, self.started = say, 0, 0.0, None

    def __enter__(self):
        if "numba" not in sys.modules:  # the NumPy backend: nothing to compile, and numba not to import
            return self
        from numba.core import event

        class Listener(event.Listener):
            def on_start(_, e):
                if self.depth == 0:
                    if not Compiling.said and self.say:
                        Compiling.said = True
                        self.say("compiling the kernels for this CPU, once (later runs load them from Numba's cache)")
                    self.started = time.perf_counter()
                self.depth += 1

            def on_end(_, e):
                self.depth -= 1
                if self.depth == 0:
                    self.seconds += time.perf_counter() - self.started

        self.listener = Listener()
        event.register("numba:compile", self.listener)
        return self

    def __exit__(self, *exc):
        if hasattr(self, "listener"):
            from numba.core import event

            event.unregister("numba:compile", self.listener)


def warm_up(model, prompts=(), max_new_tokens=1, score=False, say=None):
    """Run, on a small model of the same formats, the steps that decoding these prompts (token id
    lists, decoded together) or scoring would run, so that their kernels are compiled now. Returns
    the seconds spent compiling (0 on a warm cache). say(message): where the one line goes."""
    from .engine import decode_rows, rows_one_by_one  # the real decode loop, on the small model
    from .scoring import logprobs, logprobs_many

    # Prompts that take the same paths as the real ones: one token, a few (the batched kernels) or
    # more (BLAS); identical where the real ones are (they share one prefill).
    distinct, small, most = {}, [], longest(model.params)
    for ids in prompts:
        k = distinct.setdefault(tuple(ids), len(distinct))
        small.append([k % N_VOCAB] + [0] * (min(len(ids), most) - 1))
    fills = bool(prompts) and max(map(len, prompts)) + max_new_tokens > model.config["n_positions"]  # the window slides
    done = (
        model.forward,
        tuple(formats.dtype_of(w) for w in weights_of(model.params)),
        model.kv_dtype,  # the decode kernels compile once per cache type too
        tuple(map(tuple, small)),
        fills,
        score,
    )
    if done in _warm:
        return 0.0
    n_ctx = most + ROOM
    params, config = small_params(model.params, n_ctx)
    forward_rows = model.forward_rows or rows_one_by_one(model.forward)
    with Compiling(say) as compiling:
        if prompts:
            steps = n_ctx - max(map(len, small)) + 3 if fills else 3
            stopped, picks = set(), [lambda logits: 0] * len(small)
            rows = decode_rows(
                forward_rows, params, config, small, steps, picks, None, stopped, say=None, kv_dtype=model.kv_dtype
            )
            for i, _ in enumerate(rows):
                if i == steps - 2:  # the others stop (at the end of their text): one row left, the batch-1 path
                    stopped.update(range(1, len(small)))
        if score:
            logprobs(model.forward, params, config, np.zeros(n_ctx + 8, np.int64), n_ctx // 2, kv_dtype=model.kv_dtype)
            # many documents in one pass: short ones (each token a row of the batched kernels), and
            # with a long one more than `most` tokens (BLAS for a float format)
            docs = [np.zeros(n, np.int64) for n in (5, 3, n_ctx + 8)]
            at, kv_dtype = model.log_softmax_at, model.kv_dtype
            for some in (docs[:2], docs):
                list(logprobs_many(forward_rows, params, config, some, n_ctx // 2, at=at, kv_dtype=kv_dtype))
    _warm.add(done)
    return compiling.seconds


_warm = set()  # what warm_up has run in this process already


def weights_of(params):
    """The weights whose formats choose the kernels: wte and each block linear's."""
    return [params["wte"]["weight"], *(params["h"][0][part][name]["weight"] for part, name in formats.LINEARS)]
