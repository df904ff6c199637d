"""Numba kernels for the hot paths. Each sits under a note naming the NumPy function in model.py it
replaces and why it is faster; model.py stays the reference and the tests compare the two.

Decoding one token reads every weight once, so it is bound by memory bandwidth: the kernels stream
each weight matrix once, in file order, with both cores, and fuse the small steps (bias, GELU,
residual) into the pass that is already there. Prefill is bound by arithmetic: its matmuls go to BLAS
through `@`, and Numba takes the element-wise work NumPy does in several single-threaded passes.
"""

import math

import numba
import numpy as np
from numba import njit, prange

from . import model

f32 = np.float32
GELU_A, GELU_B = f32(math.sqrt(2.0 / math.pi)), f32(0.044715)  # float32 constants keep the math float32
jit = dict(cache=True, fastmath=True, nogil=True)


@njit(inline="always", **jit)
def _gelu(x):
    return f32(0.5) * x * (f32(1.0) + np.tanh(GELU_A * (x + GELU_B * x * x * x)))


# ---- decode: one row at a time -------------------------------------------------------------------


# Replaces model.linear (+ model.gelu, + the residual add) for one row. Each thread streams its own
# contiguous band of rows of the [in, out] weight, so memory is read front to back exactly once;
# the per-thread partial sums are then added with the bias, GELU and residual in one more pass.
@njit(parallel=True, **jit)
def linear_row(x, weight, bias, residual, gelu, n_bands):  # [in] -> [out]
    n_in, n_out = weight.shape
    n_bands = min(n_bands, n_in)
    partial = np.zeros((n_bands, n_out), f32)
    for band in prange(n_bands):
        acc = partial[band]
        i, end = band * n_in // n_bands, (band + 1) * n_in // n_bands
        while i + 4 <= end:  # four rows per pass over acc: fewer loads and stores of the partial sums
            x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
            for j in range(n_out):
                acc[j] += x0 * weight[i, j] + x1 * weight[i + 1, j] + x2 * weight[i + 2, j] + x3 * weight[i + 3, j]
            i += 4
        while i < end:
            for j in range(n_out):
                acc[j] += x[i] * weight[i, j]
            i += 1
    out = np.empty(n_out, f32)
    for j in prange(n_out):
        s = bias[j]
        for band in range(n_bands):
            s += partial[band, j]
        if gelu:
            s = _gelu(s)
        out[j] = s + residual[j] if residual.size else s
    return out


# Replaces the tied lm_head `x @ wte.T` for one row: wte is [n_vocab, n_embd], so each logit is a
# dot product with one contiguous row; threads split the vocabulary.
@njit(parallel=True, **jit)
def lm_head_row(x, wte):  # [n_embd] -> [n_vocab]
    n_vocab, n_embd = wte.shape
    logits = np.empty(n_vocab, f32)
    for v in prange(n_vocab):
        s = f32(0.0)
        for k in range(n_embd):
            s += wte[v, k] * x[k]
        logits[v] = s
    return logits


# Replaces model.attention for the single new token: scores, softmax and the weighted sum of values
# in one pass per head (threads split the heads), reading only the first n_kv cached positions.
@njit(parallel=True, **jit)
def attend_row(q, k_cache, v_cache, n_kv):  # q [n_head, head_dim], caches [n_head, n_ctx, head_dim]
    n_head, head_dim = q.shape
    scale = f32(1.0 / math.sqrt(head_dim))
    out = np.zeros((n_head, head_dim), f32)
    for h in prange(n_head):
        scores = np.empty(n_kv, f32)
        top = f32(-np.inf)
        for t in range(n_kv):
            s = f32(0.0)
            for d in range(head_dim):
                s += q[h, d] * k_cache[h, t, d]
            scores[t] = s * scale
            top = max(top, scores[t])
        total = f32(0.0)
        for t in range(n_kv):
            scores[t] = np.exp(scores[t] - top)
            total += scores[t]
        for t in range(n_kv):
            p = scores[t] / total
            for d in range(head_dim):
                out[h, d] += p * v_cache[h, t, d]
    return out  # [n_head, head_dim]


# Replaces model.layer_norm for one row, in two passes instead of NumPy's five temporaries.
@njit(**jit)
def layer_norm_row(x, weight, bias, eps):  # [n_embd] -> [n_embd]
    n = x.size
    mean = f32(0.0)
    for i in range(n):
        mean += x[i]
    mean /= n
    var = f32(0.0)
    for i in range(n):
        var += (x[i] - mean) ** 2
    inv = f32(1.0) / np.sqrt(var / n + f32(eps))
    out = np.empty(n, f32)
    for i in range(n):
        out[i] = (x[i] - mean) * inv * weight[i] + bias[i]
    return out


# ---- prefill: many rows ----------------------------------------------------------------------------


# Replaces model.layer_norm on [n_seq, n_embd]: rows in parallel, no temporaries.
@njit(parallel=True, **jit)
def layer_norm_rows(x, weight, bias, eps):
    out = np.empty_like(x)
    for r in prange(x.shape[0]):
        out[r] = layer_norm_row(x[r], weight, bias, eps)
    return out


# Replaces model.gelu(x + bias) after a BLAS matmul: in place, in parallel, one pass over memory.
@njit(parallel=True, **jit)
def bias_gelu_(x, bias):
    for r in prange(x.shape[0]):
        for j in range(x.shape[1]):
            x[r, j] = _gelu(x[r, j] + bias[j])
    return x


# Replaces model.attention's mask + softmax: in place over [n_head, n_seq, n_kv] scores, each row
# normalised over its causal part only (keys 0 .. past + row), the rest set to 0.
@njit(parallel=True, **jit)
def causal_softmax_(scores, past, scale):
    n_head, n_seq, n_kv = scores.shape
    for hr in prange(n_head * n_seq):
        h, r = hr // n_seq, hr % n_seq
        row, n = scores[h, r], past + r + 1
        top = f32(-np.inf)
        for t in range(n):
            top = max(top, row[t])
        total = f32(0.0)
        for t in range(n):
            row[t] = np.exp((row[t] - top) * scale)
            total += row[t]
        for t in range(n):
            row[t] /= total
        for t in range(n, n_kv):
            row[t] = 0
    return scores


# ---- the forward pass on the kernels: model.gpt2's twin ------------------------------------------

EMPTY = np.zeros(0, f32)


def linear(x, weight, bias, residual=None, gelu=False):
    """model.linear, optionally then gelu, optionally plus a residual: a kernel for one row, BLAS for many.
    This is the dispatch point for weight formats: a packed (bfloat16, int8) weight adds its kernels here."""
    if x.ndim == 1:
        return linear_row(x, weight, bias, EMPTY if residual is None else residual, gelu, numba.get_num_threads())
    out = x @ weight  # [n_seq, in] -> [n_seq, out]
    if gelu:
        return bias_gelu_(out, bias)
    out += bias
    if residual is not None:
        out += residual
    return out


def layer_norm(x, weight, bias, eps):
    return layer_norm_row(x, weight, bias, eps) if x.ndim == 1 else layer_norm_rows(x, weight, bias, eps)


def attention(q, k, v, past):
    # q: [n_head, n_seq, head_dim]; k, v: [n_head, past + n_seq, head_dim]
    scores = causal_softmax_(q @ k.transpose(0, 2, 1), past, f32(1.0 / math.sqrt(q.shape[-1])))
    return scores @ v  # [n_head, n_seq, head_dim]


def mha(x, c_attn, c_proj, n_head, kv, past, residual):
    # x: [n_embd] when decoding one token, [n_seq, n_embd] in prefill
    n_seq, n_embd = (1, x.size) if x.ndim == 1 else x.shape
    qkv = linear(x, **c_attn).reshape(n_seq, 3, n_head, n_embd // n_head)
    q, k, v = qkv.transpose(1, 2, 0, 3)  # [n_head, n_seq, head_dim] each
    k_cache, v_cache = kv
    k_cache[:, past : past + n_seq] = k
    v_cache[:, past : past + n_seq] = v
    if x.ndim == 1:
        out = attend_row(q[:, 0], k_cache, v_cache, past + 1)  # [n_head, head_dim]
    else:
        out = attention(q, k_cache[:, : past + n_seq], v_cache[:, : past + n_seq], past).transpose(1, 0, 2)
    return linear(out.reshape(x.shape), **c_proj, residual=residual)  # [n_seq, n_embd]


def transformer_block(x, ln_1, attn, ln_2, mlp, n_head, eps, kv, past):
    x = mha(layer_norm(x, **ln_1, eps=eps), **attn, n_head=n_head, kv=kv, past=past, residual=x)
    a = linear(layer_norm(x, **ln_2, eps=eps), **mlp["c_fc"], gelu=True)  # [n_seq, n_inner]
    return linear(a, **mlp["c_proj"], residual=x)  # [n_seq, n_embd]


def gpt2(inputs, wte, wpe, h, ln_f, n_head, eps=1e-5, cache=None, past=0, last=False):
    """model.gpt2 on the kernels: same arguments, same logits within float32 rounding."""
    inputs = np.asarray(inputs, dtype=np.int64)
    if cache is None:  # the kernels always attend over a cache: use a scratch one
        cache = model.kv_cache(len(h), n_head, past + len(inputs), wte["weight"].shape[1] // n_head)
    x = wte["weight"][inputs] + wpe["weight"][past + np.arange(len(inputs))]  # [n_seq, n_embd]
    x = x[0] if len(inputs) == 1 else x  # one token: [n_embd] rows all the way
    for i, block in enumerate(h):
        x = transformer_block(x, **block, n_head=n_head, eps=eps, kv=cache[i], past=past)
    if last or x.ndim == 1:
        return lm_head_row(layer_norm_row(x if x.ndim == 1 else x[-1], **ln_f, eps=eps), wte["weight"])[None]
    return layer_norm_rows(x, **ln_f, eps=eps) @ wte["weight"].T  # [n_seq, n_vocab]
