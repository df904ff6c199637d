"""picogpt: GPT-2 inference in NumPy, with the same logits as PyTorch.

    import picogpt
    model = picogpt.load("tiny")              # or "gpt2", a hub repo id, a local folder; dtype="int8"
    model.generate("The list", max_new_tokens=20, seed=1)
    logits = picogpt.gpt2(ids, **model.params, n_head=model.config["n_head"])  # the NumPy reference

Names and submodules are imported on first use, so `picogpt generate --threads N` can set thread
counts before NumPy and Numba load.
"""

import importlib
import os
import pkgutil

# OpenBLAS's idle threads spin for 2^28 cycles (a tenth of a second) after each call before they
# sleep, on the cores that Numba's kernels want next: a 16-token prompt's first token took 116 ms right
# after a 512-token prompt through BLAS, 57 ms with 2^4 (2 cores; no slower BLAS). Read once, when
# NumPy loads OpenBLAS: import picogpt before NumPy, or set it in the environment, for it to apply.
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

from . import threads  # noqa: E402  (standard library only)

# OpenBLAS starts a thread per core it sees, not per CPU a container's limit allows (threads.py): held
# to those, when NumPy loads it, as above. The kernels' own threads follow threads.available() anyway.
if threads.available().n < (os.cpu_count() or 1):
    os.environ.setdefault("OPENBLAS_NUM_THREADS", str(threads.available().n))

__version__ = "0.2.0"

_WHERE = {
    "load": "api",
    "Model": "api",
    "SamplingParams": "sampling",
    "load_tokenizer": "tokenizer",
    **{
        name: "model"
        for name in [
            "gpt2",
            "kv_cache",
            "gelu",
            "softmax",
            "layer_norm",
            "linear",
            "ffn",
            "attention",
            "mha",
            "transformer_block",
        ]
    },
}
SUBMODULES = tuple(
    m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")
)  # modules and subpackages
__all__ = list(_WHERE)


def __getattr__(name):
    if name in SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    if name not in _WHERE:
        raise AttributeError(f"module 'picogpt' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)


def __dir__():
    return sorted([*__all__, *SUBMODULES, "__version__"])
