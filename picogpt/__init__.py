"""picogpt: GPT-2 inference in NumPy, with the same logits as PyTorch.

Names are imported on first use, so `picogpt generate --threads N` can set thread counts before
NumPy and Numba load.
"""

import importlib

_WHERE = {
    "load": "generate", "Model": "generate", "load_tokenizer": "tokenizer",
    **{name: "model" for name in ["gpt2", "kv_cache", "gelu", "softmax", "layer_norm", "linear", "ffn", "attention", "mha", "transformer_block"]},
}  # fmt: skip
__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module 'picogpt' has no attribute {name!r}")
    return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
