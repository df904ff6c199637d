"""The Numba kernels the forward passes share, beside the NumPy functions of model.py they replace.

Each kernel sits under a note naming the model.py function it replaces and why it is faster (one
vectorized pass instead of NumPy's temporaries, threads over heads); model.py stays the reference and
the tests compare the two. The matmuls are elsewhere: microkernel.py for every weight format and a few
rows, BLAS for long prompts (forward.linear picks).
"""

import math

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic, overload

f32 = np.float32
# error_model="numpy": a float division may give inf instead of raising, which lets LLVM vectorize it.
jit = dict(cache=True, fastmath=True, nogil=True, error_model="numpy")

# Numba's np.tanh and np.exp are scalar libm calls, one per element. These two are pure float32
# arithmetic, so LLVM vectorizes them: 8 lanes at a time instead of 1, within float32 rounding.
GELU_A, GELU_B = f32(math.sqrt(2.0 / math.pi)), f32(0.044715)
TANH_CLAMP = f32(7.90531110763549805)  # tanh is +-1 in float32 past this
P1, P3, P5, P7, P9, P11, P13 = (
    f32(c)
    for c in (
        4.89352455891786e-03,
        6.37261928875436e-04,
        1.48572235717979e-05,
        5.12229709037114e-08,
        -8.60467152213735e-11,
        2.00018790482477e-13,
        -2.76076847742355e-16,
    )
)
Q0, Q2, Q4, Q6 = (
    f32(c) for c in (4.89352518554385e-03, 2.26843463243900e-03, 1.18534705686654e-04, 1.19825839466702e-06)
)
LOG2E, LN2_HI, LN2_LO = f32(1.44269504088896341), f32(0.693359375), f32(-2.12194440e-4)
E0, E1, E2, E3, E4, E5 = (
    f32(c)
    for c in (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
)


@njit(inline="always", **jit)
def _tanh(x):  # a [13/6] rational approximation (Eigen's float tanh): max error 3e-7
    x = min(max(x, -TANH_CLAMP), TANH_CLAMP)
    x2 = x * x
    p = x * (P1 + x2 * (P3 + x2 * (P5 + x2 * (P7 + x2 * (P9 + x2 * (P11 + x2 * P13))))))
    return p / (Q0 + x2 * (Q2 + x2 * (Q4 + x2 * Q6)))


@njit(inline="always", **jit)
def gelu_one(x):  # model.gelu, one value (inlined into the loops that call it)
    return f32(0.5) * x * (f32(1.0) + _tanh(GELU_A * (x + GELU_B * x * x * x)))


@njit(inline="always", **jit)
def _exp_(row, n, ints):
    """row[:n] <- exp(row[:n]) in place, for row[:n] <= 0; ints is int32 scratch of length >= n.
    exp(v) = 2**k * exp(r), |r| <= ln(2)/2, with Cephes' degree-6 polynomial for exp(r); the 2**k is
    added straight into the float's exponent bits in a second pass."""
    for t in range(n):
        v = max(row[t], f32(-87.0))  # exp(-87) ~ 1e-38: still a normal float32
        k = np.floor(v * LOG2E + f32(0.5))
        r = v - k * LN2_HI - k * LN2_LO
        row[t] = (((((E0 * r + E1) * r + E2) * r + E3) * r + E4) * r + E5) * r * r + r + f32(1.0)
        ints[t] = np.int32(k) << 23
    bits = row.view(np.int32)
    for t in range(n):
        bits[t] += ints[t]


@njit(inline="always", **jit)
def _softmax_(row, n, scale, ints):
    """row[:n] <- softmax(row[:n] * scale) in place (model.softmax); ints is int32 scratch of length >= n."""
    top = f32(-np.inf)
    for t in range(n):
        top = max(top, row[t])
    for t in range(n):
        row[t] = (row[t] - top) * scale
    _exp_(row, n, ints)
    total = f32(0.0)
    for t in range(n):
        total += row[t]
    inv = f32(1.0) / total
    for t in range(n):
        row[t] *= inv


# Replaces scoring.log_softmax_at, the scorer's last step over every scored token's [n_vocab] logits:
# NumPy's max, subtract, exp and sum are four passes and one thread (a tenth of the corpus scorer's
# time); here one pass for the max and one for the sum of exps, in blocks that stay in L1, rows over threads.
@njit(parallel=True, **jit)
def log_softmax_at(logits, targets):  # [n, n_vocab], [n] -> [n] float64
    n, n_vocab = logits.shape
    out = np.empty(n, np.float64)
    block = 1024
    for i in prange(n):
        row = logits[i]
        buf, ints = np.empty(block, f32), np.empty(block, np.int32)
        top = f32(-np.inf)
        for t in range(n_vocab):
            top = max(top, row[t])
        total = 0.0
        for start in range(0, n_vocab, block):
            m = min(block, n_vocab - start)
            for t in range(m):
                buf[t] = row[start + t] - top
            _exp_(buf, m, ints)
            part = f32(0.0)
            for t in range(m):
                part += buf[t]
            total += part
        out[i] = float(row[targets[i]] - top) - math.log(total)
    return out


# Replaces reading.read_at (the figures of `picogpt score --tokens`, --features and the server's
# logprobs): NumPy's takes a dozen passes and temporaries of the whole row; here, per row, one pass
# for the max, the rank and the top tokens, one for the exps (kept, in a row-long buffer that stays
# in L2) and their sums, one for the variance about the mean, rows over threads.
@njit(parallel=True, **jit)
def read_rows(logits, targets, top):  # [n, n_vocab], [n] -> figures [n, 4], top ids [n, top], top logprobs [n, top]
    n, n_vocab = logits.shape
    figures = np.empty((n, 4), np.float64)  # logprob, rank, entropy, variance
    best_ids, best_lp = np.empty((n, top), np.int64), np.empty((n, top), np.float64)
    block = 1024
    for i in prange(n):
        row, target = logits[i], targets[i]
        chosen = row[target]
        e, ints = np.empty(n_vocab, f32), np.empty(block, np.int32)
        ids, vals = best_ids[i], np.full(top, f32(-np.inf))
        ids[:] = -1
        peak, above = f32(-np.inf), 0
        for t in range(n_vocab):
            z = row[t]
            peak = max(peak, z)
            above += z > chosen
            if top and z > vals[top - 1]:  # into the sorted top: after any equal one (the lower id first)
                j = top - 1
                while j > 0 and vals[j - 1] < z:
                    vals[j], ids[j] = vals[j - 1], ids[j - 1]
                    j -= 1
                vals[j], ids[j] = z, t
        total, weighted = 0.0, 0.0
        for start in range(0, n_vocab, block):
            m = min(block, n_vocab - start)
            part, part_d = f32(0.0), f32(0.0)
            for t in range(m):
                e[start + t] = row[start + t] - peak
            _exp_(e[start : start + m], m, ints)
            for t in range(m):
                part += e[start + t]
                part_d += e[start + t] * (row[start + t] - peak)
            total += part
            weighted += part_d
        mean = weighted / total  # E_p[logit - peak]
        spread = 0.0
        for start in range(0, n_vocab, block):
            m = min(block, n_vocab - start)
            part = f32(0.0)
            for t in range(m):
                d = row[start + t] - peak - f32(mean)
                part += e[start + t] * d * d
            spread += part
        log_total = math.log(total)
        figures[i, 0] = float(chosen - peak) - log_total
        figures[i, 1] = 1 + above
        figures[i, 2] = log_total - mean
        figures[i, 3] = spread / total
        for j in range(top):
            best_lp[i, j] = float(vals[j] - peak) - log_total
    return figures, best_ids, best_lp


def read_at(logits, targets, top=0):
    """reading.read_at on the kernel: the records of each row's target."""
    from ..reading import blank

    figures, best_ids, best_lp = read_rows(np.ascontiguousarray(logits, f32), np.asarray(targets, np.int64), top)
    out = blank(len(targets), top)
    out["logprob"], out["rank"], out["entropy"], out["variance"] = figures.T
    out["top"], out["top_logprob"] = best_ids, best_lp
    return out


# Replaces reading.cross_at (Binoculars' cross term): two rows' maxes, then their exps and one weighted
# sum in a single pass, rows over threads.
@njit(parallel=True, **jit)
def cross_at(observer, performer):  # [n, n_vocab] x 2 -> [n] float64: -sum softmax(observer) * log_softmax(performer)
    n, n_vocab = observer.shape
    out = np.empty(n, np.float64)
    block = 1024
    for i in prange(n):
        q, p = observer[i], performer[i]
        eq, ep, ints = np.empty(block, f32), np.empty(block, f32), np.empty(block, np.int32)
        peak_q, peak_p = f32(-np.inf), f32(-np.inf)
        for t in range(n_vocab):
            peak_q, peak_p = max(peak_q, q[t]), max(peak_p, p[t])
        total_q, total_p, weighted = 0.0, 0.0, 0.0
        for start in range(0, n_vocab, block):
            m = min(block, n_vocab - start)
            for t in range(m):
                eq[t], ep[t] = q[start + t] - peak_q, p[start + t] - peak_p
            part_w = f32(0.0)
            _exp_(eq, m, ints)
            for t in range(m):
                part_w += eq[t] * (p[start + t] - peak_p)
            _exp_(ep, m, ints)
            part_q, part_p = f32(0.0), f32(0.0)
            for t in range(m):
                part_q += eq[t]
                part_p += ep[t]
            total_q += part_q
            total_p += part_p
            weighted += part_w
        out[i] = math.log(total_p) - weighted / total_q
    return out


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


# ---- the KV cache: float32, or float16 held as its bits ----------------------------------------------
# A float16 cache (model.kv_cache(..., dtype="float16")) halves the bytes that decoding's attention
# reads per step. It stays a float16 NumPy array, so model.py, the engine's row copies and forward.py's
# prefill read and write it as plain NumPy (which rounds to nearest even). Numba has no float16 type, so
# the kernels take a uint16 view of its bits (`bits`, no copy) and convert in LLVM IR: fptrunc rounds
# to nearest even as NumPy does, fpext widens exactly (vcvtps2ph and vcvtph2ps on x86, vectorized in
# attend_rows' loops). The kernels compile once per cache type; for float32 both are the identity.


def bits(cache):
    """A cache array as the kernels take it: float32 as it is, float16 as a uint16 view of its bits."""
    return cache.view(np.uint16) if cache.dtype == np.float16 else cache


@intrinsic
def _f16_bits(typingctx, x):  # float32 -> the bits of the nearest float16 (ties to even)
    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.uint16(types.float32), codegen


@intrinsic
def _f16_value(typingctx, b):  # float16 bits -> float32, exact (microkernel's _widen_f16, one value)
    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.uint16), codegen


def to_kv(x, cache):
    """float32 x as an element of `cache` (float32, or the uint16 bits of float16)."""


def from_kv(v):
    """An element of a cache as float32."""


@overload(to_kv, inline="always")
def _to_kv(x, cache):
    return (lambda x, cache: _f16_bits(f32(x))) if cache.dtype == types.uint16 else (lambda x, cache: x)


@overload(from_kv, inline="always")
def _from_kv(v):
    return (lambda v: _f16_value(v)) if v == types.uint16 else (lambda v: v)


# ---- decode: one new token per sequence -------------------------------------------------------------


# The new token's keys and values into the cache at position `past`. Loops rather than a slice
# assignment, whose broadcasting error messages alone cost Numba 3 s of compiling.
@njit(inline="always", **jit)
def store_kv(k_cache, v_cache, past, qkv):  # caches [n_head, n_ctx, head_dim]; qkv [3, n_head, head_dim]
    for h in range(qkv.shape[1]):
        for d in range(qkv.shape[2]):
            k_cache[h, past, d] = to_kv(qkv[1, h, d], k_cache)
            v_cache[h, past, d] = to_kv(qkv[2, h, d], v_cache)


# Replaces model.attention for sequences bringing new tokens as rows (one each while decoding, every
# token of a prompt of up to ROWS_MAX as its own row): scores, softmax and the weighted sum of values
# in one pass per (row, head), threads over all of them, each reading only its own cache row's first
# n_kv positions (a float16 cache's widened as they are read: half the bytes). Keys go four at a
# time: each query element loaded once for four dot products, four independent sums, and a value row
# of the output loaded and stored once per four keys (1.36x the one-key loop at 128 to 1000 keys, 2
# cores, AVX2). Head-major: the threads take equal runs of tasks, and a run of whole heads holds
# every sequence, long and short alike (sequence-major, a thread that drew the long contexts made the
# other wait: 7.5 against 4.8 ms a step for 4 rows at 600 positions and 4 at 20).
@njit(parallel=True, **jit)
def attend_rows(
    q, k_cache, v_cache, rows, n_kv
):  # q [n_seq, n_head, head_dim]; caches [n_rows, n_head, n_ctx, head_dim] (float32, or bits(float16))
    n_seq, n_head, head_dim = q.shape
    out = np.zeros_like(q)
    scale = f32(1.0 / np.sqrt(head_dim))
    for task in prange(n_seq * n_head):
        h, s = task // n_seq, task % n_seq
        k, v, n, x, o = k_cache[rows[s], h], v_cache[rows[s], h], n_kv[s], q[s, h], out[s, h]
        scores, ints = np.empty(n, f32), np.empty(n, np.int32)
        fours = n - n % 4
        for t in range(0, fours, 4):
            s0 = s1 = s2 = s3 = f32(0.0)
            for d in range(head_dim):
                s0 += x[d] * from_kv(k[t, d])
                s1 += x[d] * from_kv(k[t + 1, d])
                s2 += x[d] * from_kv(k[t + 2, d])
                s3 += x[d] * from_kv(k[t + 3, d])
            scores[t], scores[t + 1], scores[t + 2], scores[t + 3] = s0, s1, s2, s3
        for t in range(fours, n):
            acc = f32(0.0)
            for d in range(head_dim):
                acc += x[d] * from_kv(k[t, d])
            scores[t] = acc
        _softmax_(scores, n, scale, ints)
        for t in range(0, fours, 4):
            p0, p1, p2, p3 = scores[t], scores[t + 1], scores[t + 2], scores[t + 3]
            for d in range(head_dim):
                o[d] += (
                    p0 * from_kv(v[t, d])
                    + p1 * from_kv(v[t + 1, d])
                    + p2 * from_kv(v[t + 2, d])
                    + p3 * from_kv(v[t + 3, d])
                )
        for t in range(fours, n):
            for d in range(head_dim):
                o[d] += scores[t] * from_kv(v[t, d])
    return out


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
            x[r, j] = gelu_one(x[r, j] + bias[j])
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
