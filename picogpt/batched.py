"""Many sequences at once on the kernels: each weight is read once per step for every sequence.

At batch 1 a decode step streams every weight to do one multiply-add with it, so the cores wait on
memory. Here the new tokens of all running sequences go through each linear together, B rows for one
pass over the weight, and attention runs per sequence over that sequence's own cache. The sequences
are ragged: sequence s lives in row rows[s] of a batch KV cache (model.kv_cache(..., n_rows=B)), has
past[s] tokens there already, and brings inputs[s] new ones (one while decoding, a whole prompt when
prefilling or sliding its window). Positions are per sequence, so nothing is padded and no pad is
ever attended: the same as Hugging Face's left padding with an attention mask, without the pads.

model.py stays one sequence at a time: rows never mix, so the tests compare each sequence here with
model.gpt2 run on it alone.
"""

import numba
import numpy as np
from numba import njit, prange

from . import formats, kernels
from .formats import BLOCK
from .kernels import EMPTY, _rows_into, _shape, _softmax_, attend_row, f32, jit, layer_norm_rows

# Up to this many rows, linear_rows beats BLAS's `@` (measured on gpt2's shapes, 2 cores: OpenBLAS's
# sgemm takes as long for 2 rows as for 8); a packed weight would first have to be widened for BLAS.
ROWS_MAX = {"float32": 8, "float16": 32, "bfloat16": 32, "int8": 32}


# Replaces model.linear (+ GELU, + residual) for a few rows [n_rows, in] at once, every weight format.
# kernels.linear_row's bands, one 32-row block at a time: the block is read from memory once and stays
# in L2 while every row's accumulator takes its product with it. (Column tiles, and two rows sharing
# each loaded weight, measured slower: LLVM no longer vectorized the loop.)
@njit(parallel=True, **jit)
def linear_rows(x, weight, bias, residual, gelu, n_bands):  # [n_rows, in] -> [n_rows, out]
    n_rows = x.shape[0]
    n_in, n_out = _shape(weight)
    n_blocks = (n_in + BLOCK - 1) // BLOCK
    n_bands = min(n_bands, n_blocks)
    partial = np.zeros((n_bands, n_rows, n_out), f32)
    for band in prange(n_bands):
        start, end = band * n_blocks // n_bands * BLOCK, min((band + 1) * n_blocks // n_bands * BLOCK, n_in)
        for i in range(start, end, BLOCK):
            for r in range(n_rows):
                _rows_into(partial[band, r], x[r], weight, i, min(i + BLOCK, end))
    out = partial[0]
    for band in range(1, n_bands):
        out += partial[band]
    for r in range(n_rows):
        if bias.size:
            out[r] += bias
        if gelu:
            for j in range(n_out):
                out[r, j] = kernels._gelu(out[r, j])
        if residual.size:
            out[r] += residual[r]
    return out


def linear(x, weight, bias, residual=None, gelu=False):
    """model.linear on [n_tokens, in]: linear_rows for a few rows, BLAS (kernels.linear) for many."""
    if len(x) <= ROWS_MAX[formats.dtype_of(weight)]:
        return linear_rows(x, weight, bias, EMPTY.reshape(0, 0) if residual is None else residual, gelu, numba.get_num_threads())
    return kernels.linear(x, weight, bias, residual, gelu)


# Replaces model.attention for sequences bringing one new token each: kernels.attend_row's pass per
# (sequence, head), threads over all of them, each reading only its own row's first n_kv positions.
@njit(parallel=True, **jit)
def attend_rows(q, k_cache, v_cache, rows, n_kv):  # q [n_seq, n_head, head_dim]; caches [n_rows, n_head, n_ctx, head_dim]
    n_seq, n_head, head_dim = q.shape
    out = np.zeros_like(q)
    scale = f32(1.0 / np.sqrt(head_dim))
    for task in prange(n_seq * n_head):
        s, h = task // n_head, task % n_head
        k, v, n = k_cache[rows[s], h], v_cache[rows[s], h], n_kv[s]
        scores, ints = np.empty(n, f32), np.empty(n, np.int32)
        for t in range(n):
            acc = f32(0.0)
            for d in range(head_dim):
                acc += q[s, h, d] * k[t, d]
            scores[t] = acc
        _softmax_(scores, n, scale, ints)
        for t in range(n):
            for d in range(head_dim):
                out[s, h, d] += scores[t] * v[t, d]
    return out


def mha(x, c_attn, c_proj, n_head, kv, rows, past, lengths, residual):
    n_tokens, n_embd = x.shape
    qkv = linear(x, **c_attn).reshape(n_tokens, 3, n_head, n_embd // n_head)  # [n_tokens, 3, n_head, head_dim]
    k_cache, v_cache = kv
    out = np.empty_like(qkv[:, 0])  # [n_tokens, n_head, head_dim]
    ones, start = [], 0
    for s, (row, p, n) in enumerate(zip(rows, past, lengths)):
        k_cache[row, :, p : p + n] = qkv[start : start + n, 1].transpose(1, 0, 2)
        v_cache[row, :, p : p + n] = qkv[start : start + n, 2].transpose(1, 0, 2)
        if n == 1:
            ones.append(s)
        else:  # a prompt: causal attention over its own row, through BLAS
            q = np.ascontiguousarray(qkv[start : start + n, 0].transpose(1, 0, 2))  # [n_head, n, head_dim]
            a = kernels.attention(q, k_cache[row, :, : p + n], v_cache[row, :, : p + n], p)
            out[start : start + n] = a.transpose(1, 0, 2)
        start += n
    if ones:  # sequences bringing one token each (decoding): one kernel call for all of them
        at = (np.cumsum(lengths) - 1)[ones]  # where their tokens are among the n_tokens
        n_kv = np.asarray(past)[ones] + 1
        out[at] = attend_rows(np.ascontiguousarray(qkv[at, 0]), k_cache, v_cache, np.asarray(rows)[ones], n_kv)
    return linear(out.reshape(n_tokens, n_embd), **c_proj, residual=residual)


def transformer_block(x, ln_1, attn, ln_2, mlp, n_head, eps, kv, rows, past, lengths):
    x = mha(layer_norm_rows(x, **ln_1, eps=eps), **attn, n_head=n_head, kv=kv, rows=rows, past=past, lengths=lengths, residual=x)
    a = linear(layer_norm_rows(x, **ln_2, eps=eps), **mlp["c_fc"], gelu=True)  # [n_tokens, n_inner]
    return linear(a, **mlp["c_proj"], residual=x)  # [n_tokens, n_embd]


def gpt2_rows(inputs, wte, wpe, h, ln_f, n_head, cache, rows, past, eps=1e-5):
    """kernels.gpt2 for many sequences: sequence s continues row rows[s] of the batch cache, which holds
    past[s] tokens, with the token ids inputs[s]. Returns the logits after each sequence's last new
    token: [len(inputs), n_vocab]. One sequence alone takes kernels.gpt2's batch-1 path."""
    if len(inputs) == 1:
        row_cache = [(k[rows[0]], v[rows[0]]) for k, v in cache]
        return kernels.gpt2(inputs[0], wte, wpe, h, ln_f, n_head, eps, cache=row_cache, past=past[0], last=True)
    lengths = [len(ids) for ids in inputs]
    ids = np.concatenate([np.asarray(i, np.int64) for i in inputs])
    positions = np.concatenate([p + np.arange(n) for p, n in zip(past, lengths)])
    x = formats.embedding(wte["weight"], ids) + wpe["weight"][positions]  # [n_tokens, n_embd]
    for kv, block in zip(cache, h):
        x = transformer_block(x, **block, n_head=n_head, eps=eps, kv=kv, rows=rows, past=past, lengths=lengths)
    last = np.cumsum(lengths) - 1
    x = layer_norm_rows(np.ascontiguousarray(x[last]), **ln_f, eps=eps)  # [n_seq, n_embd]
    wte = wte["weight"]
    if isinstance(wte, np.ndarray):
        return x @ wte.T  # [n_seq, n_vocab]
    return linear_rows(x, wte, EMPTY, EMPTY.reshape(0, 0), False, numba.get_num_threads())  # a packed wte holds wte.T
