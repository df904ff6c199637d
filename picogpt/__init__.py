"""picogpt: GPT-2 inference in NumPy, with the same logits as PyTorch."""

from .generate import Model, load
from .model import attention, ffn, gelu, gpt2, kv_cache, layer_norm, linear, mha, softmax, transformer_block
from .tokenizer import load_tokenizer

__all__ = ["Model", "load", "load_tokenizer", "gpt2", "kv_cache", "gelu", "softmax", "layer_norm", "linear", "ffn",
           "attention", "mha", "transformer_block"]
