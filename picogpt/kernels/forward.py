"""The forward pass on the kernels: model.gpt2's twin, for one sequence or many at once.

Decoding one token reads every weight once, so it is bound by memory bandwidth; decoding B sequences
together reads each weight once for all of them (microkernel.py: one kernel for any row count and
every weight format). Long prompts are bound by arithmetic and go to BLAS through `@`; Numba takes
the element-wise work (ops.py).

The sequences are ragged: sequence s lives in row rows[s] of a batch KV cache (model.kv_cache(...,
n_rows=B)), has past[s] tokens there already, and brings inputs[s] new ones (one while decoding, a
whole prompt when prefilling or sliding its window). Positions are per sequence, so nothing is padded
and no pad is ever attended: the same as Hugging Face's left padding with an attention mask, without
the pads. model.py stays one sequence at a time: rows never mix, so the tests compare each sequence
here with model.gpt2 run on it alone. A float16 cache (model.kv_cache(..., dtype="float16")) is
rounded as model.py rounds it: by NumPy where a prompt is written, by the decode kernels (ops.py, on
its uint16 bits) where they write; prompts attend over it widened to float32 for BLAS.

The kernels read the weights laid out once per parameter tree (`prepare`): each block as one `Layer`
named tuple of microkernel panels, built on the first call (by `load`, for a Model) and kept while the
tree lives. After changing a weight in place, call `forget()`.
"""

import functools
import math
import weakref
from typing import NamedTuple

import numba
import numpy as np
from numba import njit

from .. import formats, model, threads
from ..checkpoint import safetensors
from . import microkernel, target
from .microkernel import Linear
from .ops import attend_rows, attention, bias_gelu_, bits, f32, jit, layer_norm_rows, store_kv

# Steps of up to this many tokens (all sequences' together) run as decoding does, each token a row of
# the compiled block (block_rows): the microkernel for the linears and attend_rows for attention, no
# BLAS. Longer steps of a float format go through BLAS, prompt by prompt (transformer_block); int8
# multiplies in integers, which BLAS does not: its steps are rows at every length (`rows_max`). Per
# format and vector width, as measured (a lone prompt, the two paths alternating in one run):
# - float32 on AVX2 (2-core Zen 1): rows at every length GPT-2 has. A 512-token prompt as rows
#   against all through BLAS: 258 against 224 tokens/s (gpt2), 90 against 75 (gpt2-medium); at 1000
#   tokens 224 against 206 and 76 against 71. Below 256 tokens the gap is wider (128: 366 against 730 ms).
# - float16 and bfloat16 on AVX2: 256. The tile widens every weight it reads, once per 4 rows, which
#   bounds it at about 46 GFLOP/s there (float32: 58); BLAS, on panels widened once per step, took a
#   gpt2 prompt of 512 tokens at 188 against 170 tokens/s, of 1000 at 191 against 153.
# - every float format on AVX-512: 256. There sgemm ran a 512-token gpt2-medium prompt in 1.3 s
#   against 2.1 as rows (measured before attend_rows took four keys at a time: worth measuring again).
ROWS_MAX = {"float32": 1024 if target.LANES == 8 else 256, "float16": 256, "bfloat16": 256}


def rows_max(w):
    """The most tokens of one step that run as rows on weights of w's format (int8: any number)."""
    return math.inf if formats.integer(w) else ROWS_MAX[formats.dtype_of(w)]


class Norm(NamedTuple):
    weight: np.ndarray
    bias: np.ndarray


class Layer(NamedTuple):
    """One transformer block as the compiled decode step takes it (Hugging Face's names)."""

    ln_1: Norm
    c_attn: Linear
    attn_c_proj: Linear
    ln_2: Norm
    c_fc: Linear  # with its GELU
    mlp_c_proj: Linear


class Prepared(NamedTuple):
    layers: list  # [Layer] per block
    lm_head: Linear  # the tied lm_head, wte.T [n_embd, n_vocab]


def layer(block, release=False):
    attn, mlp = block["attn"], block["mlp"]
    laid_out = Layer(
        Norm(**block["ln_1"]),
        microkernel.linear_of(**attn["c_attn"]),
        microkernel.linear_of(**attn["c_proj"]),
        Norm(**block["ln_2"]),
        microkernel.linear_of(**mlp["c_fc"], gelu=True),
        microkernel.linear_of(**mlp["c_proj"]),
    )
    for part, name in formats.LINEARS if release else ():  # the panels replace them: a mapped file's pages can go
        safetensors.release(block[part][name]["weight"])
    return laid_out


_prepared = {}  # (id(wte), id(h)) -> Prepared, dropped when the tree's first weight is freed


def prepare(wte, h, release=False):
    """The microkernel's layout of a parameter tree's blocks and lm_head, made once per tree. release:
    give the pages of the weights mapped from a file back to the OS as each is laid out (load does;
    a weight changed in place since it was mapped would lose the change)."""
    key = (id(wte), id(h))
    if key not in _prepared:
        w = wte["weight"]
        _prepared[key] = Prepared([layer(block, release) for block in h], microkernel.linear_of(formats.lm_head(w)))
        if release:  # its embedding rows are read from the file again as tokens need them
            safetensors.release(w)
        for w in (wte["weight"], h[0]["attn"]["c_attn"]["weight"]):  # ids are reused once freed
            weakref.finalize(w if isinstance(w, np.ndarray) else w.data, _prepared.pop, key, None)
    return _prepared[key]


def forget():
    """Drop every prepared layout (after changing weights in place)."""
    _prepared.clear()


# ---- linears: the microkernel for a few rows, BLAS for many ------------------------------------------

_scratch = {}  # shape -> the float32 [in, out] buffer that panels are widened into for BLAS


def linear(x, lin, residual=None):
    """model.linear (+ GELU if lin.gelu, + residual) on [n_tokens, in]: the microkernel, or for more
    rows than `rows_max` BLAS on the panels widened back into a reused float32 [in, out] buffer (that
    copy took 0.9 of the 7.5 s of a 512-token gpt2-medium prompt on a 2-core AVX2 host, at about the
    speed of a plain copy; it spares keeping the weights twice in memory)."""
    if len(x) <= rows_max(lin.weight):
        none = np.empty((0, 0), f32)
        x = np.ascontiguousarray(x, f32)  # the microkernel addresses C-order rows
        return microkernel.linear(x, *lin, none if residual is None else residual, numba.get_num_threads())
    shape = (x.shape[1], lin.bias.size)
    if shape not in _scratch:
        _scratch[shape] = np.empty(shape, f32)
    w = microkernel.widen_(_scratch[shape], lin.weight)
    out = x @ w  # [n_tokens, in] -> [n_tokens, out]
    if lin.gelu:
        return bias_gelu_(out, lin.bias)
    out += lin.bias
    if residual is not None:
        out += residual
    return out


# ---- decode: one new token for each of B sequences -------------------------------------------------


@njit(inline="always", **jit)
def _linear(x, lin, residual, n_threads):
    return microkernel.linear(x, lin.weight, lin.bias, lin.gelu, residual, n_threads)


# Replaces model.transformer_block for a decoding step, one new token per sequence (B = 1 included):
# the whole block in one compiled call, so a step crosses from Python into Numba once per layer.
@njit(**jit)
def block_rows(x, layer, k_cache, v_cache, rows, past, eps, n_threads):  # x [n_seq, n_embd]
    n_seq, n_head, head_dim = x.shape[0], k_cache.shape[1], k_cache.shape[3]
    none = np.empty((0, 0), f32)  # no residual
    qkv = _linear(layer_norm_rows(x, layer.ln_1.weight, layer.ln_1.bias, eps), layer.c_attn, none, n_threads)
    qkv = qkv.reshape((n_seq, 3, n_head, head_dim))  # q, k, v of each sequence: [n_head, head_dim] each
    for s in range(n_seq):
        store_kv(k_cache[rows[s]], v_cache[rows[s]], past[s], qkv[s])
    a = attend_rows(np.ascontiguousarray(qkv[:, 0]), k_cache, v_cache, rows, past + 1).reshape(
        (n_seq, n_head * head_dim)
    )
    x = _linear(a, layer.attn_c_proj, x, n_threads)  # x + attn(...)
    a = _linear(
        layer_norm_rows(x, layer.ln_2.weight, layer.ln_2.bias, eps), layer.c_fc, none, n_threads
    )  # gelu(...): [n_seq, n_inner]
    return _linear(a, layer.mlp_c_proj, x, n_threads)  # x + mlp(...)


# ---- prefill: prompts, ragged ----------------------------------------------------------------------


def mha(x, layer, n_head, kv, rows, past, lengths, residual):
    n_tokens, n_embd = x.shape
    qkv = linear(x, layer.c_attn).reshape(n_tokens, 3, n_head, n_embd // n_head)  # [n_tokens, 3*n_embd]
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
            k, v = (c[row, :, : p + n].astype(f32, copy=False) for c in kv)  # a float16 cache widened for BLAS
            a = attention(q, k, v, p)
            out[start : start + n] = a.transpose(1, 0, 2)
        start += n
    if ones:  # sequences bringing one token each (decoding beside a prompt): one kernel call for all of them
        at = (np.cumsum(lengths) - 1)[ones]  # where their tokens are among the n_tokens
        n_kv = np.asarray(past)[ones] + 1
        q = np.ascontiguousarray(qkv[at, 0])
        out[at] = attend_rows(q, bits(k_cache), bits(v_cache), np.asarray(rows)[ones], n_kv)
    return linear(out.reshape(n_tokens, n_embd), layer.attn_c_proj, residual)  # [n_tokens, n_embd]


def transformer_block(x, layer, n_head, eps, kv, rows, past, lengths):
    a = layer_norm_rows(x, *layer.ln_1, eps)
    x = mha(a, layer, n_head=n_head, kv=kv, rows=rows, past=past, lengths=lengths, residual=x)
    a = linear(layer_norm_rows(x, *layer.ln_2, eps), layer.c_fc)  # gelu(...): [n_tokens, n_inner]
    return linear(a, layer.mlp_c_proj, x)  # [n_tokens, n_embd]


# ---- the forward passes -----------------------------------------------------------------------------


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


def adapted(forward):
    """Each call on as many threads as pay for calls of its number of tokens, under the load the
    process finds (threads.py: measured call by call)."""

    @functools.wraps(forward)
    def run(inputs, wte, wpe, h, *args, **kwargs):
        with threads.step((id(h), sum(map(len, inputs)).bit_length())):
            return forward(inputs, wte, wpe, h, *args, **kwargs)

    return run


@interruptible
@adapted
def gpt2_rows(inputs, wte, wpe, h, ln_f, n_head, cache, rows, past, eps=1e-5, last=True, keep=None, steer=None):
    """Many sequences: sequence s continues row rows[s] of the batch cache, which holds past[s] tokens,
    with the token ids inputs[s]. Returns the logits after each sequence's last new token,
    [len(inputs), n_vocab], or with last=False after every new token, [n_tokens, n_vocab], or after
    the new tokens whose indices (among all n_tokens, in order) `keep` lists, [len(keep), n_vocab].
    steer: {block: vector [n_embd]} added to the residual stream before those blocks (inside.Steer)."""
    inputs = [model.token_ids(ids, wte["weight"], wpe["weight"], p) for ids, p in zip(inputs, past)]
    needed = max((p + len(ids) for ids, p in zip(inputs, past)), default=0)
    model.check_cache(cache, len(h), n_head, wpe["weight"].shape[1], needed, rows)
    prepared = prepare(wte, h)
    lengths = [len(ids) for ids in inputs]
    ids = np.concatenate(inputs)
    positions = np.concatenate([p + np.arange(n, dtype=np.int64) for p, n in zip(past, lengths)])
    x = formats.embedding(wte["weight"], ids) + wpe["weight"][positions]  # [n_tokens, n_embd]
    if len(ids) <= rows_max(h[0]["attn"]["c_attn"]["weight"]):
        # each token a row of block_rows at its own position: one compiled call per layer
        rows_, n_threads = np.repeat(np.asarray(rows, np.int64), lengths), numba.get_num_threads()
        for i, ((k_cache, v_cache), lay) in enumerate(zip(cache, prepared.layers)):
            x = x if steer is None or i not in steer else x + steer[i]
            x = block_rows(x, lay, bits(k_cache), bits(v_cache), rows_, positions, eps, n_threads)
    else:  # many tokens of a float format: BLAS, attention prompt by prompt
        for i, (kv, lay) in enumerate(zip(cache, prepared.layers)):
            x = x if steer is None or i not in steer else x + steer[i]
            x = transformer_block(x, lay, n_head=n_head, eps=eps, kv=kv, rows=rows, past=past, lengths=lengths)
    if keep is not None or last:  # the lm_head only on the rows whose logits are wanted
        x = np.ascontiguousarray(x[np.cumsum(lengths) - 1 if keep is None else keep])
    x = layer_norm_rows(x, **ln_f, eps=eps)  # [n_seq, n_embd]
    return linear(x, prepared.lm_head)  # [n_seq, n_vocab]


def gpt2(inputs, wte, wpe, h, ln_f, n_head, eps=1e-5, cache=None, past=0, last=False):
    """model.gpt2 on the kernels: same arguments, same logits within float32 rounding (the logits after
    the last token only, [1, n_vocab], with last=True)."""
    inputs = model.token_ids(inputs, wte["weight"], wpe["weight"], past)
    if cache is None:  # the kernels always attend over a cache: use a scratch one
        cache = model.kv_cache(len(h), n_head, past + len(inputs), wpe["weight"].shape[1])
    model.check_cache(cache, len(h), n_head, wpe["weight"].shape[1], past + len(inputs))  # a user's, before [None]
    cache = [(k[None], v[None]) for k, v in cache]  # one sequence: row 0 of a batch cache
    return gpt2_rows([inputs], wte, wpe, h, ln_f, n_head, cache, rows=[0], past=[past], eps=eps, last=last)
