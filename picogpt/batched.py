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
from numba.extending import overload

from . import formats, kernels, model
from .formats import BLOCK
from .kernels import EMPTY, _at, _format, _rows_into, _shape, _softmax_, f32, gelu_, jit, layer_norm_rows

# Prefill: up to this many rows linear_rows beats BLAS's `@` (measured on gpt2-medium's 1024 x 4096,
# 2 cores: float32 BLAS wins from 8 rows on; a packed weight must first be widened for BLAS, so it wins
# later). Decoding steps (block_rows) always use linear_rows: BLAS's threads, spinning after each call, would take
# the cores from the Numba kernels between the matmuls (measured 3x slower at 16 rows).
ROWS_MAX = {"float32": 8, "float16": 16, "bfloat16": 16, "int8": 16}


def _quad(w, i, j, x0, x1, x2, x3):
    """x0 * w[i, j] + x1 * w[i + 1, j] + x2 * w[i + 2, j] + x3 * w[i + 3, j], rows of one 32-row block."""


@overload(_quad, inline="always")
def _quad_overload(w, i, j, x0, x1, x2, x3):
    if _format(w) == "int8":  # the block's scale once for the four rows
        return lambda w, i, j, x0, x1, x2, x3: (
            x0 * f32(w.data[i, j]) + x1 * f32(w.data[i + 1, j]) + x2 * f32(w.data[i + 2, j]) + x3 * f32(w.data[i + 3, j])
        ) * w.scales[i // BLOCK, j]
    return lambda w, i, j, x0, x1, x2, x3: x0 * _at(w, i, j) + x1 * _at(w, i + 1, j) + x2 * _at(w, i + 2, j) + x3 * _at(w, i + 3, j)


# Replaces model.linear (+ residual) for a few rows [n_rows, in] at once, every weight format.
# kernels.linear_row's bands, one 32-row block at a time: the block is read from memory once and stays
# in cache while the rows take their products with it, two rows per pass so that each weight loaded
# and widened feeds both (measured: 10 to 35% faster than one row per pass; four rows per pass, column
# tiles, or loops not starting at 0 were slower, the last because LLVM then stops vectorizing).
@njit(parallel=True, **jit)
def linear_rows(x, weight, bias, residual, n_bands):  # [n_rows, in] -> [n_rows, out]
    n_rows = x.shape[0]
    n_in, n_out = _shape(weight)
    n_blocks = (n_in + BLOCK - 1) // BLOCK
    n_bands = min(n_bands, n_blocks)
    partial = np.zeros((n_bands, n_rows, n_out), f32)
    for band in prange(n_bands):
        start, end = band * n_blocks // n_bands * BLOCK, min((band + 1) * n_blocks // n_bands * BLOCK, n_in)
        acc = partial[band]
        for block in range(start, end, BLOCK):
            stop, r = min(block + BLOCK, end), 0
            while r + 2 <= n_rows and stop - block == BLOCK:
                a, b = acc[r], acc[r + 1]
                for i in range(block, stop, 4):
                    a0, a1, a2, a3 = x[r, i], x[r, i + 1], x[r, i + 2], x[r, i + 3]
                    b0, b1, b2, b3 = x[r + 1, i], x[r + 1, i + 1], x[r + 1, i + 2], x[r + 1, i + 3]
                    for j in range(n_out):
                        a[j] += _quad(weight, i, j, a0, a1, a2, a3)
                        b[j] += _quad(weight, i, j, b0, b1, b2, b3)
                r += 2
            while r < n_rows:  # an odd row, or the last, partial block
                _rows_into(acc[r], x[r], weight, block, stop)
                r += 1
    out = partial[0]  # loops, not `out[r] += bias`: 2D broadcasting costs Numba seconds of compiling
    for r in range(n_rows):
        for j in range(n_out):
            for band in range(1, n_bands):
                out[r, j] += partial[band, r, j]
            if bias.size:
                out[r, j] += bias[j]
            if residual.size:
                out[r, j] += residual[r, j]
    return out


def linear(x, weight, bias, residual=None, gelu=False):
    """model.linear on [n_tokens, in]: linear_rows for a few rows, else BLAS (kernels.linear)."""
    if len(x) <= ROWS_MAX[formats.dtype_of(weight)]:
        out = linear_rows(x, weight, bias, EMPTY.reshape(0, 0) if residual is None else residual, numba.get_num_threads())
        return gelu_(out.reshape(-1)).reshape(out.shape) if gelu else out
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


# The same for a packed wte, which holds wte.T [n_embd, n_vocab] (a linear whose 50257 columns make
# linear_rows's per-row accumulators too big for the cache: measured 4x slower). Threads take chunks of
# CHUNK columns, whose sums stay in L1 while every row passes over all the chunk's input rows, two rows
# sharing each widened weight. Column indices are unsigned: a signed offset (j0 + j) makes Numba check
# for negative indices, and LLVM then leaves the loop unvectorized.
CHUNK = 512


@njit(parallel=True, **jit)
def lm_head_packed_rows(x, w):  # [n_rows, n_embd] -> [n_rows, n_vocab]
    n_rows, (n_in, n_out) = x.shape[0], _shape(w)
    logits = np.empty((n_rows, n_out), f32)
    for chunk in prange((n_out + CHUNK - 1) // CHUNK):
        j0, width = np.uint64(chunk * CHUNK), np.uint64(min(CHUNK, n_out - chunk * CHUNK))
        acc = np.zeros((n_rows + 1, CHUNK), f32)  # one spare row: an odd last row pairs with a copy of itself
        for r in range(0, n_rows, 2):
            a, b, s = acc[r], acc[r + 1], min(r + 1, n_rows - 1)
            i = 0
            while i + 4 <= n_in:
                a0, a1, a2, a3 = x[r, i], x[r, i + 1], x[r, i + 2], x[r, i + 3]
                b0, b1, b2, b3 = x[s, i], x[s, i + 1], x[s, i + 2], x[s, i + 3]
                for j in range(width):
                    a[j] += _quad(w, i, j0 + j, a0, a1, a2, a3)
                    b[j] += _quad(w, i, j0 + j, b0, b1, b2, b3)
                i += 4
            while i < n_in:
                for j in range(width):
                    a[j] += x[r, i] * _at(w, i, j0 + j)
                    b[j] += x[s, i] * _at(w, i, j0 + j)
                i += 1
        for r in range(n_rows):
            for j in range(width):
                logits[r, j0 + j] = acc[r, j]
    return logits


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
    if ones:  # sequences bringing one token each (decoding beside a prompt): one kernel call for all of them
        at = (np.cumsum(lengths) - 1)[ones]  # where their tokens are among the n_tokens
        n_kv = np.asarray(past)[ones] + 1
        out[at] = attend_rows(np.ascontiguousarray(qkv[at, 0]), k_cache, v_cache, np.asarray(rows)[ones], n_kv)
    return linear(out.reshape(n_tokens, n_embd), **c_proj, residual=residual)


def transformer_block(x, ln_1, attn, ln_2, mlp, n_head, eps, kv, rows, past, lengths):
    x = mha(layer_norm_rows(x, **ln_1, eps=eps), **attn, n_head=n_head, kv=kv, rows=rows, past=past, lengths=lengths, residual=x)
    a = linear(layer_norm_rows(x, **ln_2, eps=eps), **mlp["c_fc"], gelu=True)  # [n_tokens, n_inner]
    return linear(a, **mlp["c_proj"], residual=x)  # [n_tokens, n_embd]


# Replaces transformer_block for a decoding step, one new token per sequence: the whole block in one
# compiled call, as kernels.block_row does for one sequence (measured 4 to 18% faster than the
# Python-level block at 8 sequences: fewer crossings into Numba, no per-sequence NumPy slicing).
@njit(**jit)
def block_rows(x, ln_1_w, ln_1_b, c_attn_w, c_attn_b, attn_proj_w, attn_proj_b, ln_2_w, ln_2_b,
               c_fc_w, c_fc_b, mlp_proj_w, mlp_proj_b, k_cache, v_cache, rows, past, eps, n_threads):  # fmt: skip
    n_seq, n_head, head_dim = x.shape[0], k_cache.shape[1], k_cache.shape[3]
    none = np.empty((0, 0), f32)  # no residual
    qkv = linear_rows(layer_norm_rows(x, ln_1_w, ln_1_b, eps), c_attn_w, c_attn_b, none, n_threads)
    qkv = qkv.reshape((n_seq, 3, n_head, head_dim))  # q, k, v of each sequence: [n_head, head_dim] each
    for s in range(n_seq):
        kernels._store(k_cache[rows[s]], v_cache[rows[s]], past[s], qkv[s])
    a = attend_rows(np.ascontiguousarray(qkv[:, 0]), k_cache, v_cache, rows, past + 1).reshape((n_seq, n_head * head_dim))
    x = linear_rows(a, attn_proj_w, attn_proj_b, x, n_threads)  # x + attn(...)
    a = linear_rows(layer_norm_rows(x, ln_2_w, ln_2_b, eps), c_fc_w, c_fc_b, none, n_threads)  # [n_seq, n_inner]
    gelu_(a.reshape(-1))
    return linear_rows(a, mlp_proj_w, mlp_proj_b, x, n_threads)  # x + mlp(...)


@kernels.interruptible
def gpt2_rows(inputs, wte, wpe, h, ln_f, n_head, cache, rows, past, eps=1e-5):
    """kernels.gpt2 for many sequences: sequence s continues row rows[s] of the batch cache, which holds
    past[s] tokens, with the token ids inputs[s]. Returns the logits after each sequence's last new
    token: [len(inputs), n_vocab]. One sequence decoding alone takes kernels.gpt2's batch-1 path; a
    short prompt goes through linear_rows here, a long one through BLAS either way."""
    if len(inputs) == 1 and len(inputs[0]) == 1:
        row_cache = [(k[rows[0]], v[rows[0]]) for k, v in cache]
        return kernels.gpt2(inputs[0], wte, wpe, h, ln_f, n_head, eps, cache=row_cache, past=past[0], last=True)
    inputs = [model.token_ids(ids, wte["weight"], wpe["weight"], p) for ids, p in zip(inputs, past)]
    lengths = [len(ids) for ids in inputs]
    ids = np.concatenate(inputs)
    positions = np.concatenate([p + np.arange(n) for p, n in zip(past, lengths)])
    x = formats.embedding(wte["weight"], ids) + wpe["weight"][positions]  # [n_tokens, n_embd]
    if len(ids) == len(inputs):  # decoding: one token per sequence, one compiled call per layer
        rows_, past_, n_threads = np.asarray(rows, np.int64), np.asarray(past, np.int64), numba.get_num_threads()
        for (k_cache, v_cache), b in zip(cache, h):
            x = block_rows(
                x, b["ln_1"]["weight"], b["ln_1"]["bias"], b["attn"]["c_attn"]["weight"], b["attn"]["c_attn"]["bias"],
                b["attn"]["c_proj"]["weight"], b["attn"]["c_proj"]["bias"], b["ln_2"]["weight"], b["ln_2"]["bias"],
                b["mlp"]["c_fc"]["weight"], b["mlp"]["c_fc"]["bias"], b["mlp"]["c_proj"]["weight"], b["mlp"]["c_proj"]["bias"],
                k_cache, v_cache, rows_, past_, eps, n_threads,
            )  # fmt: skip
    else:  # prompts among the sequences: per-sequence attention, BLAS for long ones
        for kv, block in zip(cache, h):
            x = transformer_block(x, **block, n_head=n_head, eps=eps, kv=kv, rows=rows, past=past, lengths=lengths)
    last = np.cumsum(lengths) - 1
    x = layer_norm_rows(np.ascontiguousarray(x[last]), **ln_f, eps=eps)  # [n_seq, n_embd]
    wte = wte["weight"]
    if isinstance(wte, np.ndarray):
        return kernels.lm_head_rows(x, wte)  # [n_seq, n_vocab]
    return lm_head_packed_rows(x, wte)  # a packed wte holds wte.T
