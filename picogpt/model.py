"""GPT-2 as a page of NumPy math: the readable reference and the test oracle.

Every function is stateless and takes its parameters by the Hugging Face checkpoint names, so the
forward pass unpacks the parameter tree (`**block`, `**attn`, `**c_attn`) and the checkpoint layout
is the call graph. Everything stays float32: one float64 constant would promote every later array.
"""

import math

import numpy as np

from .cachecheck import KV_DTYPES, check_cache
from .formats import embedding, lm_head, matmul, vocab_size


def gelu(x):
    # GPT-2 was trained with the tanh approximation ("gelu_new"), not the exact erf GELU.
    # Python floats, not np.float64 scalars, so float32 stays float32.
    return 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def softmax(x):
    exp_x = np.exp(x - np.max(x, axis=-1, keepdims=True))
    return exp_x / np.sum(exp_x, axis=-1, keepdims=True)


def layer_norm(x, weight, bias, eps=1e-5):
    mean = np.mean(x, axis=-1, keepdims=True)
    variance = np.var(x, axis=-1, keepdims=True)
    return weight * (x - mean) / np.sqrt(variance + eps) + bias  # [n_seq, n_embd]


def linear(x, weight, bias):
    # HF's Conv1D stores weights as [in, out], so this is x @ w, with no transpose. A packed weight
    # multiplies in its format's arithmetic (formats.py): float16 and bfloat16 widened back to float32,
    # int8 in integers, the activations quantized per block as llama.cpp's q8_0 does.
    return matmul(x, weight) + bias  # [n_seq, in] -> [n_seq, out]


def ffn(x, c_fc, c_proj):
    a = gelu(linear(x, **c_fc))  # [n_seq, n_embd] -> [n_seq, n_inner]
    return linear(a, **c_proj)  # [n_seq, n_inner] -> [n_seq, n_embd]


def attention(q, k, v, past):
    # q: [n_head, n_seq, head_dim]; k, v: [n_head, past + n_seq, head_dim].
    # Query i sits at absolute position past + i and sees keys 0 .. past + i.
    n_seq, n_kv = q.shape[1], k.shape[1]
    causal = np.arange(n_kv)[None, :] <= past + np.arange(n_seq)[:, None]  # [n_seq, n_kv] bool
    scores = q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1])  # [n_head, n_seq, n_kv]
    scores = np.where(causal, scores, np.float32(-np.inf))
    return softmax(scores) @ v  # [n_head, n_seq, head_dim]


def mha(x, c_attn, c_proj, n_head, kv=None, past=0):
    n_seq, n_embd = x.shape
    qkv = linear(x, **c_attn)  # [n_seq, n_embd] -> [n_seq, 3*n_embd]
    qkv = qkv.reshape(n_seq, 3, n_head, n_embd // n_head).transpose(1, 2, 0, 3)  # [3, n_head, n_seq, head_dim]
    q, k, v = qkv
    if kv is not None:
        # Write this step's keys and values into the preallocated cache, then attend over all of it.
        # A float16 cache rounds them as they are stored (to nearest even), and attention reads them
        # widened back, this step's own keys and values included: what the kernels compute.
        k_cache, v_cache = kv  # [n_head, n_ctx, head_dim] each
        k_cache[:, past : past + n_seq] = k
        v_cache[:, past : past + n_seq] = v
        k = k_cache[:, : past + n_seq].astype(np.float32, copy=False)  # [n_head, past + n_seq, head_dim]
        v = v_cache[:, : past + n_seq].astype(np.float32, copy=False)  # (a float32 cache: no copy)
    out = attention(q, k, v, past)  # [n_head, n_seq, head_dim]
    out = out.transpose(1, 0, 2).reshape(n_seq, n_embd)  # merge heads -> [n_seq, n_embd]
    return linear(out, **c_proj)  # [n_seq, n_embd] -> [n_seq, n_embd]


def transformer_block(x, ln_1, attn, ln_2, mlp, n_head, eps=1e-5, kv=None, past=0):
    x = x + mha(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head, kv=kv, past=past)
    x = x + ffn(layer_norm(x, **ln_2, eps=eps), **mlp)
    return x  # [n_seq, n_embd]


def gpt2(inputs, wte, wpe, h, ln_f, n_head, eps=1e-5, cache=None, past=0, last=False):
    """Logits [len(inputs), n_vocab] for token ids `inputs` (with `last`, only the last row's: [1, n_vocab]).

    With a `cache` (from `kv_cache`), the inputs are the tokens at positions past .. past+len-1,
    their keys and values are written into the cache, and attention also covers the `past` tokens
    already there.
    """
    inputs = token_ids(inputs, wte["weight"], wpe["weight"], past)
    if cache is not None:
        check_cache(cache, len(h), n_head, wpe["weight"].shape[1], past + len(inputs))
    x = embedding(wte["weight"], inputs) + wpe["weight"][past + np.arange(len(inputs))]  # [n_seq, n_embd]
    for i, block in enumerate(h):
        x = transformer_block(x, **block, n_head=n_head, eps=eps, kv=None if cache is None else cache[i], past=past)
    x = layer_norm(x[-1:] if last else x, **ln_f, eps=eps)
    return matmul(x, lm_head(wte["weight"]))  # tied to wte, wte.T: [n_seq, n_embd] -> [n_seq, n_vocab]


def token_ids(inputs, wte, wpe, past=0):
    """`inputs` as an int64 array, checked: a non-empty list of ids within the vocabulary and the context."""
    ids = np.asarray(inputs)
    n_vocab = vocab_size(wte)
    if ids.ndim != 1 or len(ids) == 0 or ids.dtype.kind not in "iu":
        raise ValueError(f"inputs must be a non-empty list of token ids (whole numbers), got {inputs!r}")
    if ids.min() < 0 or ids.max() >= n_vocab:
        raise ValueError(
            f"inputs hold token id {ids.min() if ids.min() < 0 else ids.max()}, outside the vocabulary of {n_vocab}"
        )
    if past + len(ids) > len(wpe):
        raise ValueError(
            f"inputs run to position {past + len(ids)}, past the model's context of {len(wpe)} (n_positions)"
        )
    return ids.astype(np.int64)


def kv_cache(n_layer, n_head, n_positions, n_embd, n_rows=None, dtype="float32"):
    """Preallocated keys and values for every layer, the arguments named as config.json's keys: a list
    of (k, v), each [n_head, n_positions, n_embd // n_head] (n_positions: how many positions it holds,
    at most the model's); with n_rows, one such cache per row of a batch: [n_rows, n_head, n_positions, head_dim].
    dtype: "float32", or "float16" (half the bytes; keys and values rounded as they are stored)."""
    if dtype not in KV_DTYPES:
        raise ValueError(f"kv_dtype must be 'float32' or 'float16', got {dtype!r}")
    head_dim = n_embd // n_head
    shape = (n_head, n_positions, head_dim) if n_rows is None else (n_rows, n_head, n_positions, head_dim)
    return [(np.zeros(shape, dtype), np.zeros(shape, dtype)) for _ in range(n_layer)]
