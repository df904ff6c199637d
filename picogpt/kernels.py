"""Numba kernels for the hot paths. Each sits under a note naming the NumPy function in model.py it
replaces and why it is faster; model.py stays the reference and the tests compare the two.

Decoding one token reads every weight once, so it is bound by memory bandwidth: the kernels stream
each weight matrix once, in file order, with both cores, and fuse the small steps (bias, GELU,
residual) into the pass that is already there. Prefill is bound by arithmetic: its matmuls go to BLAS
through `@`, and Numba takes the element-wise work NumPy does in several single-threaded passes.
"""

import functools
import math

import numba
import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

from . import formats, model
from .formats import BLOCK

f32 = np.float32
# error_model="numpy": a float division may give inf instead of raising, which lets LLVM vectorize it.
jit = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")
EMPTY = np.zeros(0, f32)  # "no residual" (from Python; a compiled caller makes its own: a global is read-only)

# Numba's np.tanh and np.exp are scalar libm calls, one per element. These two are pure float32
# arithmetic, so LLVM vectorizes them: 8 lanes at a time instead of 1, within float32 rounding.
GELU_A, GELU_B = f32(math.sqrt(2.0 / math.pi)), f32(0.044715)
TANH_CLAMP = f32(7.90531110763549805)  # tanh is +-1 in float32 past this
P1, P3, P5, P7, P9, P11, P13 = (f32(c) for c in (4.89352455891786e-03, 6.37261928875436e-04, 1.48572235717979e-05,
    5.12229709037114e-08, -8.60467152213735e-11, 2.00018790482477e-13, -2.76076847742355e-16))  # fmt: skip
Q0, Q2, Q4, Q6 = (f32(c) for c in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06))
LOG2E, LN2_HI, LN2_LO = f32(1.44269504088896341), f32(0.693359375), f32(-2.12194440e-4)
E0, E1, E2, E3, E4, E5 = (f32(c) for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1))


@njit(inline="always", **jit)
def _tanh(x):  # a [13/6] rational approximation (Eigen's float tanh): max error 3e-7
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = x * (P1 + x2 * (P3 + x2 * (P5 + x2 * (P7 + x2 * (P9 + x2 * (P11 + x2 * P13))))))
    return p / (Q0 + x2 * (Q2 + x2 * (Q4 + x2 * Q6)))


@njit(inline="always", **jit)
def _gelu(x):  # model.gelu
    return f32(0.5) * x * (f32(1.0) + _tanh(GELU_A * (x + GELU_B * x * x * x)))


@njit(inline="always", **jit)
def _softmax_(row, n, scale, ints):
    """row[:n] <- softmax(row[:n] * scale) in place (model.softmax); ints is int32 scratch of length >= n.
    exp(v) = 2**k * exp(r), |r| <= ln(2)/2, with Cephes' degree-6 polynomial for exp(r); the 2**k is
    added straight into the float's exponent bits in a second pass."""
    top = f32(-np.inf)
    for t in range(n):
        top = max(top, row[t])
    for t in range(n):
        v = max((row[t] - top) * scale, f32(-87.0))  # exp(-87) ~ 1e-38: still a normal float32
        k = np.floor(v * LOG2E + f32(0.5))
        r = v - k * LN2_HI - k * LN2_LO
        row[t] = (((((E0 * r + E1) * r + E2) * r + E3) * r + E4) * r + E5) * r * r + r + f32(1.0)
        ints[t] = np.int32(k) << 23
    bits = row.view(np.int32)
    for t in range(n):
        bits[t] += ints[t]
    total = f32(0.0)
    for t in range(n):
        total += row[t]
    inv = f32(1.0) / total
    for t in range(n):
        row[t] *= inv


# ---- weight formats: one element loader per packed type (formats.py) ------------------------------
# The kernels below are written once over `_at(weight, i, j)`, the float32 value of element (i, j),
# and Numba compiles one copy per weight type: float32 arrays and the F16, BF16, Q8 named tuples.


@intrinsic
def _f16_to_f32(typingctx, bits):
    """float16 bits -> float32: LLVM's `fpext half -> float`, one vcvtph2ps for 8 lanes with F16C. Exact."""

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


@intrinsic
def _bf16_to_f32(typingctx, bits):
    """bfloat16 bits -> float32: the bits become the top half of a float32's. Exact."""

    def codegen(context, builder, signature, args):
        wide = builder.shl(builder.zext(args[0], ir.IntType(32)), ir.Constant(ir.IntType(32), 16))
        return builder.bitcast(wide, ir.FloatType())

    return types.float32(types.uint16), codegen


def _format(w):
    return "float32" if isinstance(w, types.Array) else formats.DTYPE_OF.get(getattr(w, "instance_class", None))


def _at(w, i, j):
    """Element (i, j) of an [in, out] weight of any format, as float32 (formats.dequantize, one element)."""


@overload(_at, inline="always")
def _at_overload(w, i, j):
    return {
        "float32": lambda w, i, j: w[i, j],
        "float16": lambda w, i, j: _f16_to_f32(w.data[i, j]),
        "bfloat16": lambda w, i, j: _bf16_to_f32(w.data[i, j]),
        "int8": lambda w, i, j: f32(w.data[i, j]) * w.scales[i // BLOCK, j],
    }.get(_format(w))


def _shape(w):
    """The [in, out] shape of a weight of any format (formats.shape)."""


@overload(_shape, inline="always")
def _shape_overload(w):
    return (lambda w: w.shape) if isinstance(w, types.Array) else (lambda w: w.data.shape)


def _rows_into(acc, x, w, start, end):
    """acc[:] += x[start:end] @ w[start:end]: one thread's band of rows of a weight of any format."""


# Long rows go four at a time (one load and store of the partial sums per four rows), short rows one
# at a time: the band is then read as one sequential stream, which the hardware prefetcher follows
# where four interleaved short streams lose it. Measured from DRAM, 2 threads, 24 matrices in turn:
# one row at a time ran 1.3 to 1.4x as fast on 768- and 1024-wide int8 and 16-bit weights, level on
# 3 KB rows, and 0.6 to 0.9x on rows of 6 KB and more (the 16-bit c_fc, every lm_head).
SHORT_ROW = 2048  # bytes
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "int8": 1}


@overload(_rows_into, inline="always")
def _rows_into_overload(acc, x, w, start, end):
    row_items = SHORT_ROW // ITEMSIZE[_format(w)]  # rows up to this many items go one at a time

    if _format(w) != "int8":

        def rows_into(acc, x, w, start, end):
            i = start
            while i + 4 <= end and acc.size > row_items:
                x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
                for j in range(acc.size):
                    acc[j] += x0 * _at(w, i, j) + x1 * _at(w, i + 1, j) + x2 * _at(w, i + 2, j) + x3 * _at(w, i + 3, j)
                i += 4
            while i < end:
                for j in range(acc.size):
                    acc[j] += x[i] * _at(w, i, j)
                i += 1

        return rows_into

    def rows_into_q8(acc, x, w, start, end):
        # int8 blocks of 32 rows: sum x * q in float32 over the block, then scale once per column.
        # Measured both ways (4096 x 9216 and 768 x 3072, 2 threads): these [in, out] row bands ran
        # 2.4 to 3.2x as fast as float32 sgemv; llama.cpp's [out, in] layout, one dot product per
        # output, 0.2 to 0.75x: LLVM keeps a horizontal int8 -> float32 reduction per output poorly fed.
        q, tmp = w.data, np.empty(acc.size, f32)
        for block_start in range(start, end, BLOCK):
            tmp[:] = 0
            i, block_end = block_start, min(block_start + BLOCK, end)
            while i + 4 <= block_end and acc.size > row_items:
                x0, x1, x2, x3 = x[i], x[i + 1], x[i + 2], x[i + 3]
                for j in range(acc.size):
                    tmp[j] += x0 * f32(q[i, j]) + x1 * f32(q[i + 1, j]) + x2 * f32(q[i + 2, j]) + x3 * f32(q[i + 3, j])
                i += 4
            while i < block_end:
                for j in range(acc.size):
                    tmp[j] += x[i] * f32(q[i, j])
                i += 1
            scales = w.scales[block_start // BLOCK]
            for j in range(acc.size):
                acc[j] += tmp[j] * scales[j]

    return rows_into_q8


# ---- decode: one row at a time -------------------------------------------------------------------


# Replaces model.linear (+ the residual add) for one row, for every weight format. Each thread
# streams its own contiguous band of rows of the [in, out] weight, so memory is read front to back
# exactly once, 16-bit and int8 values widened to float32 in registers; the per-thread partial sums
# are then added with the bias and residual. Bands start on 32-row blocks (int8's). GELU is a
# separate pass (gelu_) over the few thousand outputs, in cache: a flag for it would compile every
# row kernel twice over (a constant flag in a compiled caller is a distinct Numba type).
@njit(parallel=True, **jit)
def linear_row(x, weight, bias, residual, n_bands):  # [in] -> [out]
    n_in, n_out = _shape(weight)
    n_blocks = (n_in + BLOCK - 1) // BLOCK
    n_bands = min(n_bands, n_blocks)
    partial = np.zeros((n_bands, n_out), f32)
    for band in prange(n_bands):
        start, end = band * n_blocks // n_bands * BLOCK, min((band + 1) * n_blocks // n_bands * BLOCK, n_in)
        _rows_into(partial[band], x, weight, start, end)
    out = partial[0]  # a few thousand adds: not worth waking the threads again
    for band in range(1, n_bands):
        out += partial[band]
    if bias.size:
        out += bias
    if residual.size:
        out += residual
    return out


# Replaces model.gelu on a flat array, in place: one vectorized pass.
@njit(**jit)
def gelu_(x):
    for i in range(x.size):
        x[i] = _gelu(x[i])
    return x


# Replaces the tied lm_head `x @ wte.T` for a few rows (one included) of a float32 wte [n_vocab,
# n_embd]: each logit is a dot product with one contiguous wte row; threads split the vocabulary, and
# each wte row is dotted with four rows of x per pass, so one load of it feeds four sums. (A packed
# wte holds wte.T, and its lm_head is linear_row. BLAS here would leave its threads spinning into the
# next step's Numba kernels.)
@njit(parallel=True, **jit)
def lm_head_rows(x, wte):  # [n_rows, n_embd] -> [n_rows, n_vocab]
    n_vocab, n_embd = wte.shape
    n_rows = x.shape[0]
    logits = np.empty((n_rows, n_vocab), f32)
    for v in prange(n_vocab):
        w, r = wte[v], 0
        while r + 4 <= n_rows:
            xa, xb, xc, xd = x[r], x[r + 1], x[r + 2], x[r + 3]
            sa = sb = sc = sd = f32(0.0)
            for k in range(n_embd):
                sa += w[k] * xa[k]
                sb += w[k] * xb[k]
                sc += w[k] * xc[k]
                sd += w[k] * xd[k]
            logits[r, v], logits[r + 1, v], logits[r + 2, v], logits[r + 3, v] = sa, sb, sc, sd
            r += 4
        while r < n_rows:
            s = f32(0.0)
            for k in range(n_embd):
                s += w[k] * x[r, k]
            logits[r, v] = s
            r += 1
    return logits


# Replaces model.attention for the single new token: scores, softmax and the weighted sum of values
# in one pass per head (threads split the heads), reading only the first n_kv cached positions.
@njit(parallel=True, **jit)
def attend_row(q, k_cache, v_cache, n_kv):  # q [n_head, head_dim], caches [n_head, n_ctx, head_dim]
    n_head, head_dim = q.shape
    out = np.zeros((n_head, head_dim), f32)
    for h in prange(n_head):
        scores, ints = np.empty(n_kv, f32), np.empty(n_kv, np.int32)
        for t in range(n_kv):
            s = f32(0.0)
            for d in range(head_dim):
                s += q[h, d] * k_cache[h, t, d]
            scores[t] = s
        _softmax_(scores, n_kv, f32(1.0 / math.sqrt(head_dim)), ints)
        for t in range(n_kv):
            for d in range(head_dim):
                out[h, d] += scores[t] * v_cache[h, t, d]
    return out  # [n_head, head_dim]


# Replaces model.layer_norm for one row, in two passes instead of NumPy's five temporaries.
@njit(**jit)
def layer_norm_row(x, weight, bias, eps):  # [n_embd] -> [n_embd]
    return _layer_norm_into(np.empty(x.size, f32), x, weight, bias, eps)


@njit(inline="always", **jit)
def _layer_norm_into(out, x, weight, bias, eps):
    n = x.size
    mean = f32(0.0)
    for i in range(n):
        mean += x[i]
    mean /= n
    var = f32(0.0)
    for i in range(n):
        var += (x[i] - mean) ** 2
    inv = f32(1.0) / np.sqrt(var / n + f32(eps))
    for i in range(n):
        out[i] = (x[i] - mean) * inv * weight[i] + bias[i]
    return out


# The new token's keys and values into the cache at position `past`. Loops rather than a slice
# assignment, whose broadcasting error messages alone cost Numba 3 s of compiling.
@njit(inline="always", **jit)
def _store(k_cache, v_cache, past, qkv):  # caches [n_head, n_ctx, head_dim]; qkv [3, n_head, head_dim]
    for h in range(qkv.shape[1]):
        for d in range(qkv.shape[2]):
            k_cache[h, past, d] = qkv[1, h, d]
            v_cache[h, past, d] = qkv[2, h, d]


# Replaces model.transformer_block for one token: the whole block in one compiled call, so a decode
# step crosses from Python into Numba once per layer instead of once per operation.
@njit(**jit)
def block_row(x, ln_1_w, ln_1_b, c_attn_w, c_attn_b, attn_proj_w, attn_proj_b, ln_2_w, ln_2_b,
              c_fc_w, c_fc_b, mlp_proj_w, mlp_proj_b, k_cache, v_cache, past, eps, n_threads):  # fmt: skip
    n_head, _, head_dim = k_cache.shape
    none = np.empty(0, f32)  # no residual
    qkv = linear_row(layer_norm_row(x, ln_1_w, ln_1_b, eps), c_attn_w, c_attn_b, none, n_threads)
    qkv = qkv.reshape((3, n_head, head_dim))  # [3*n_embd] -> q, k, v: [n_head, head_dim] each
    _store(k_cache, v_cache, past, qkv)
    a = attend_row(qkv[0], k_cache, v_cache, past + 1).reshape(x.size)  # heads merged: [n_embd]
    x = linear_row(a, attn_proj_w, attn_proj_b, x, n_threads)  # x + attn(...)
    a = gelu_(linear_row(layer_norm_row(x, ln_2_w, ln_2_b, eps), c_fc_w, c_fc_b, none, n_threads))  # [n_inner]
    return linear_row(a, mlp_proj_w, mlp_proj_b, x, n_threads)  # x + mlp(...)


# ---- prefill: many rows ----------------------------------------------------------------------------
# These run on one thread on purpose: BLAS is using both cores around them, and Numba's worker
# threads spin-waiting after a parallel region would take cores from BLAS (measured: 40% slower).


# Replaces model.layer_norm on [n_seq, n_embd]: row by row, no temporaries.
@njit(**jit)
def layer_norm_rows(x, weight, bias, eps):
    out = np.empty_like(x)
    for r in range(x.shape[0]):
        _layer_norm_into(out[r], x[r], weight, bias, eps)
    return out


# Replaces model.gelu(x + bias) after a BLAS matmul: in place, one vectorized pass over memory.
@njit(**jit)
def bias_gelu_(x, bias):
    for r in range(x.shape[0]):
        for j in range(x.shape[1]):
            x[r, j] = _gelu(x[r, j] + bias[j])
    return x


# Replaces model.attention's mask + softmax: in place over [n_head, n_seq, n_kv] scores, each row
# normalised over its causal part only (keys 0 .. past + row), the rest set to 0.
@njit(**jit)
def causal_softmax_(scores, past, scale):
    n_head, n_seq, n_kv = scores.shape
    ints = np.empty(n_kv, np.int32)
    for h in range(n_head):
        for r in range(n_seq):
            row, n = scores[h, r], past + r + 1
            _softmax_(row, n, scale, ints)
            row[n:] = 0
    return scores


# Prefill: the same structure as model.py, with the kernels above in place of the NumPy steps.


# Replaces formats.dequantize for prefill: a packed weight widened into a float32 buffer that is
# reused from one call to the next (a fresh one would page-fault its way through memory each time),
# so that BLAS does the matmul. Serial, like the other prefill kernels.
@njit(**jit)
def dequantize_(out, w):
    n_in, n_out = out.shape
    for i in range(n_in):
        for j in range(n_out):
            out[i, j] = _at(w, i, j)
    return out


_scratch = {}  # shape -> float32 buffer for dequantize_


def dequantized(w):
    if isinstance(w, np.ndarray):
        return w
    shape = formats.shape(w)
    if shape not in _scratch:
        _scratch[shape] = np.empty(shape, f32)
    return dequantize_(_scratch[shape], w)


def linear(x, weight, bias, residual=None, gelu=False):
    """model.linear on [n_seq, in] rows through BLAS, then bias (and GELU) in one pass, plus a residual.
    A packed weight is widened into a reused float32 buffer first."""
    out = x @ dequantized(weight)  # [n_seq, in] -> [n_seq, out]
    if gelu:
        return bias_gelu_(out, bias)
    out += bias
    if residual is not None:
        out += residual
    return out


def attention(q, k, v, past, block=128):
    # q: [n_head, n_seq, head_dim]; k, v: [n_head, past + n_seq, head_dim]. Queries go in blocks, each
    # against the keys up to its own last position only: the causal mask's zeros are never computed.
    n_seq, scale = q.shape[1], f32(1.0 / math.sqrt(q.shape[-1]))
    out = np.empty_like(q)
    for start in range(0, n_seq, block):
        stop = min(start + block, n_seq)
        kt, vt = k[:, : past + stop].transpose(0, 2, 1), v[:, : past + stop]
        scores = causal_softmax_(q[:, start:stop] @ kt, past + start, scale)  # [n_head, block, past + stop]
        out[:, start:stop] = scores @ vt  # [n_head, block, head_dim]
    return out


def mha(x, c_attn, c_proj, n_head, kv, past, residual):
    n_seq, n_embd = x.shape
    qkv = linear(x, **c_attn).reshape(n_seq, 3, n_head, n_embd // n_head)  # [n_seq, n_embd] -> [n_seq, 3*n_embd]
    q, k, v = qkv.transpose(1, 2, 0, 3)  # [n_head, n_seq, head_dim] each
    k_cache, v_cache = kv
    k_cache[:, past : past + n_seq] = k
    v_cache[:, past : past + n_seq] = v
    out = attention(q, k_cache[:, : past + n_seq], v_cache[:, : past + n_seq], past)  # [n_head, n_seq, head_dim]
    out = out.transpose(1, 0, 2).reshape(n_seq, n_embd)  # merge heads
    return linear(out, **c_proj, residual=residual)  # [n_seq, n_embd]


def transformer_block(x, ln_1, attn, ln_2, mlp, n_head, eps, kv, past):
    x = mha(layer_norm_rows(x, **ln_1, eps=eps), **attn, n_head=n_head, kv=kv, past=past, residual=x)
    a = linear(layer_norm_rows(x, **ln_2, eps=eps), **mlp["c_fc"], gelu=True)  # [n_seq, n_inner]
    return linear(a, **mlp["c_proj"], residual=x)  # [n_seq, n_embd]


# ---- the forward pass: model.gpt2's twin ------------------------------------------------------------


def interruptible(forward):
    """Ctrl-C while a kernel runs: Python raises the KeyboardInterrupt as Numba's dispatcher returns,
    which then reports it as a SystemError; give it back as the KeyboardInterrupt it is."""

    @functools.wraps(forward)
    def run(*args, **kwargs):
        try:
            return forward(*args, **kwargs)
        except SystemError as e:
            if isinstance(e.__cause__, KeyboardInterrupt):
                raise KeyboardInterrupt from None
            raise

    return run


@interruptible
def gpt2(inputs, wte, wpe, h, ln_f, n_head, eps=1e-5, cache=None, past=0, last=False):
    """model.gpt2 on the kernels: same arguments, same logits within float32 rounding."""
    inputs = model.token_ids(inputs, wte["weight"], wpe["weight"], past)
    if cache is None:  # the kernels always attend over a cache: use a scratch one
        cache = model.kv_cache(len(h), n_head, past + len(inputs), wpe["weight"].shape[1] // n_head)
    x = formats.embedding(wte["weight"], inputs) + wpe["weight"][past + np.arange(len(inputs))]  # [n_seq, n_embd]
    if len(inputs) == 1:  # decode: one compiled call per layer on [n_embd] rows
        x, n_threads = x[0], numba.get_num_threads()
        for (k_cache, v_cache), b in zip(cache, h):
            x = block_row(
                x, b["ln_1"]["weight"], b["ln_1"]["bias"], b["attn"]["c_attn"]["weight"], b["attn"]["c_attn"]["bias"],
                b["attn"]["c_proj"]["weight"], b["attn"]["c_proj"]["bias"], b["ln_2"]["weight"], b["ln_2"]["bias"],
                b["mlp"]["c_fc"]["weight"], b["mlp"]["c_fc"]["bias"], b["mlp"]["c_proj"]["weight"], b["mlp"]["c_proj"]["bias"],
                k_cache, v_cache, past, eps, n_threads,
            )  # fmt: skip
    else:
        for i, block in enumerate(h):
            x = transformer_block(x, **block, n_head=n_head, eps=eps, kv=cache[i], past=past)
    wte = wte["weight"]
    if last or x.ndim == 1:
        x = layer_norm_row(x if x.ndim == 1 else x[-1], **ln_f, eps=eps)
        if isinstance(wte, np.ndarray):
            return lm_head_rows(x[None], wte)
        return linear_row(x, wte, EMPTY, EMPTY, numba.get_num_threads())[None]  # a packed wte holds wte.T
    return layer_norm_rows(x, **ln_f, eps=eps) @ (wte.T if isinstance(wte, np.ndarray) else dequantized(wte))  # [n_seq, n_vocab]
