"""Weight formats: float16, bfloat16 and int8 weights, packed once at load and read by the kernels.

Batch-1 decoding reads every weight once per token, so its speed is bytes per weight: 4 in float32,
2 in the 16-bit formats, 1.125 in int8. A packed weight is a small named tuple of NumPy arrays:

- `F16(data)`:  float16, stored as its uint16 bits (Numba has no float16 type on the CPU);
- `BF16(data)`: bfloat16, the top half of a float32, as uint16 bits (NumPy has no bfloat16);
- `Q8(data, scales)`: int8 with one float32 scale per block of 32 along the input dimension
  (llama.cpp's q8_0 idea): weight[i, j] = data[i, j] * scales[i // 32, j].

A packed weight always holds the [in, out] matrix the matmul reads, Conv1D's layout, blocks running
down the input rows. The tied `wte` is read two ways, as embedding rows and as the lm_head
`x @ wte.T`, and only the lm_head costs bandwidth at every step, so a packed wte holds `wte.T`,
[n_embd, n_vocab]: the lm_head is then an ordinary [in, out] linear and an embedding is a column.

`matmul` is the NumPy reference that model.py's math calls and the kernels are tested against: for
the float formats, widen the weight back to float32 and multiply (`dequantize`); for int8, integer
arithmetic as llama.cpp's q8_0 does it (`matmul_q8`): each row of activations is quantized per block
of 32 too, and each block's dot product is a sum of int8 products, scaled once by both scales.
Layer norms, biases, wpe and the KV cache stay float32.
"""

from typing import NamedTuple

import numpy as np

BLOCK = 32  # int8 rows per scale
F16_MAX = 65504.0  # the largest finite float16


class F16(NamedTuple):
    data: np.ndarray  # uint16 [in, out]: float16 bits


class BF16(NamedTuple):
    data: np.ndarray  # uint16 [in, out]: the top 16 bits of a float32


class Q8(NamedTuple):
    data: np.ndarray  # int8 [in, out]
    scales: np.ndarray  # float32 [n_blocks(in), out]


class FormatError(ValueError):
    """A weight that cannot be stored in the asked-for format (for example beyond float16's range)."""


# ---- each format's behaviour: float32 [in, out] <-> packed ------------------------------------------


def _check_finite(w, dtype):
    if not np.isfinite(w).all():
        raise FormatError(f"it has NaN or infinite values, which {dtype} cannot scale or round meaningfully")


def _pack_f16(w):
    _check_finite(w, "float16")
    if np.abs(w).max(initial=0) > F16_MAX:
        raise FormatError(
            f"it has values beyond float16's range (+-{F16_MAX:g}); use bfloat16, which has float32's range"
        )
    return F16(np.ascontiguousarray(w.astype(np.float16)).view(np.uint16))  # rounds to nearest even


def _pack_bf16(w):
    _check_finite(w, "bfloat16")
    bits = np.ascontiguousarray(w).view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> 16) & 1)  # round to nearest even on the 16 dropped bits
    return BF16((rounded >> 16).astype(np.uint16))


def _pack_q8(w):
    _check_finite(w, "int8")
    blocks = _blocks(w)  # [n_blocks, 32, out], zero-padded rows
    scales = np.abs(blocks).max(axis=1) / np.float32(127)  # [n_blocks, out]
    safe = np.where(scales == 0, np.float32(1), scales)
    q = np.rint(blocks / safe[:, None]).astype(np.int8)  # |q| <= 127: symmetric, no -128
    return Q8(np.ascontiguousarray(q.reshape(-1, w.shape[1])[: w.shape[0]]), np.ascontiguousarray(scales, np.float32))


def _blocks(w):
    n_in, n_out = w.shape
    pad = -n_in % BLOCK
    if pad:
        w = np.concatenate([w, np.zeros((pad, n_out), w.dtype)])
    return w.reshape(-1, BLOCK, n_out)


def _dequantize_f16(w):
    return w.data.view(np.float16).astype(np.float32)  # exact: every float16 is a float32


def _dequantize_bf16(w):
    return (w.data.astype(np.uint32) << 16).view(np.float32)  # exact


def _dequantize_q8(w):
    return w.data * np.repeat(w.scales, BLOCK, axis=0)[: w.data.shape[0]]  # [in, out] float32


def quantize_rows(x):
    """Activations [n, in] as q8_0 quantizes them: per row and block of 32 (zero-padded), scale
    d = max|x| / 127 and q = x * (1 / d) rounded half to even (0 where d is 0). Returns q int8
    [n, n_blocks * 32] and d float32 [n, n_blocks]. The kernel does exactly these float32 operations."""
    n, n_in = x.shape
    xb = np.zeros((n, n_blocks(n_in) * BLOCK), np.float32)
    xb[:, :n_in] = x
    xb = xb.reshape(n, -1, BLOCK)  # [n, n_blocks, 32]
    d = np.abs(xb).max(axis=2) / np.float32(127)  # [n, n_blocks]
    with np.errstate(divide="ignore"):
        inv = np.where(d == 0, np.float32(0), np.float32(1) / d)
    return np.rint(xb * inv[:, :, None]).astype(np.int8).reshape(n, -1), d


def matmul_q8(x, w):
    """x [n, in] @ an int8 weight in integer arithmetic: sum over blocks b of
    (d_x[:, b] * scales[b]) * (q_x[:, b] @ data[b]), the int8 dot products exact in int32 (done here
    in float32, which holds their sums, |sum| <= 32 * 127 * 127 < 2**24, exactly)."""
    q, d = quantize_rows(np.asarray(x, np.float32))
    n_in, n_out = w.data.shape
    out = np.zeros((len(q), n_out), np.float32)
    for b in range(n_blocks(n_in)):
        rows = slice(b * BLOCK, min((b + 1) * BLOCK, n_in))
        dots = q[:, rows].astype(np.float32) @ w.data[rows].astype(np.float32)  # [n, out]: exact integers
        out += (d[:, b, None] * w.scales[b]) * dots
    return out


def _widened(x, w):
    return x @ dequantize(w)


class Format(NamedTuple):
    """One weight format and its behaviour, as ggml's type traits: every module asks this table."""

    name: str  # as --dtype spells it
    cls: type  # what holds a weight: a float32 ndarray, or one of the named tuples above
    tag: str  # the safetensors dtype its data is stored as
    array: type  # the NumPy dtype its data is held in (float16 and bfloat16 as their uint16 bits)
    scales: bool  # a float32 scale per BLOCK input rows and output (int8)
    bytes_per_weight: float  # what batch-1 decoding reads per weight (int8: 1 + 4 / BLOCK for its scales)
    pack: object  # float32 [in, out] (C order, finite) -> a weight of this format
    dequantize: object  # a weight of this format -> float32 [in, out]
    matmul: object  # (x float32 [n, in], weight) -> x @ weight [n, out]: the NumPy reference the kernels match
    # The microkernel's part of the row (kernels/microkernel.py interprets it; no Numba here):
    integer: bool  # matmul is integer arithmetic: the activations quantized per block, the integer tile
    # (_tile_q8), every row count (BLAS has no such arithmetic)
    widen: str | None  # how a float format's stored value becomes float32 in registers (microkernel.WIDEN):
    # "as is" (it is float32), "ieee half" (IEEE float16 bits), "shl 16" (a float32's top 16 bits, shifted
    # back up); None for an integer format, which is not widened


def _as_is(w):
    return w


# The one table of formats: params.py, converted.py, manage.py, the kernels and the CLI read it (the
# CLI keeps the names in a copy, as it must not import NumPy before --threads is set; a test holds
# them equal). A new format is a row here, and a codegen function in the microkernel only if its row
# asks for arithmetic the microkernel does not have yet.
FORMATS = {
    f.name: f
    for f in (
        Format("float32", np.ndarray, "F32", np.float32, False, 4, _as_is, _as_is, _widened, False, "as is"),
        Format("float16", F16, "F16", np.uint16, False, 2, _pack_f16, _dequantize_f16, _widened, False, "ieee half"),
        Format("bfloat16", BF16, "BF16", np.uint16, False, 2, _pack_bf16, _dequantize_bf16, _widened, False, "shl 16"),
        Format("int8", Q8, "I8", np.int8, True, 1 + 4 / BLOCK, _pack_q8, _dequantize_q8, matmul_q8, True, None),
    )
}
DTYPES = tuple(FORMATS)
PACKED = (F16, BF16, Q8)
DTYPE_OF = {f.cls: name for name, f in FORMATS.items()}
HELD = {f.tag: f.array for f in FORMATS.values()}  # safetensors dtype -> the NumPy dtype it is held in


def n_blocks(n_in):
    """How many int8 scale blocks cover n_in input rows."""
    return -(-n_in // BLOCK)


def arrays(n_in, n_out, dtype):
    """[(suffix, safetensors dtype, shape)] of the arrays an [in, out] weight is stored as in `dtype`:
    its data, and for int8 its scales (stored as NAME.scales)."""
    fmt = FORMATS[dtype]
    return [("", fmt.tag, (n_in, n_out))] + ([(".scales", "F32", (n_blocks(n_in), n_out))] if fmt.scales else [])


def nbytes_of(n_in, n_out, dtype):
    """Bytes an [in, out] weight takes in `dtype`."""
    return sum(np.dtype(HELD[tag]).itemsize * n * m for _, tag, (n, m) in arrays(n_in, n_out, dtype))


def transposed(name, dtype):
    """Whether checkpoint tensor `name` is held transposed in `dtype`: only a packed wte, which holds
    wte.T, [n_embd, n_vocab], so that the lm_head is an ordinary [in, out] linear. The one place this
    rule lives: held_shape, pack_wte, embedding, lm_head, vocab_size and the converters ask it."""
    return name == "wte.weight" and dtype != "float32"


def held_shape(name, shape, dtype):
    """The shape a checkpoint tensor is held in, in `dtype`: as stored, or reversed if `transposed`."""
    return tuple(shape[::-1]) if transposed(name, dtype) else tuple(shape)


def pack(w, dtype):
    """Pack a float32 [in, out] matrix into `dtype` (float32 is returned as is)."""
    if dtype not in FORMATS:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    return FORMATS[dtype].pack(
        np.ascontiguousarray(w, np.float32)
    )  # C order in, C order out: the kernels are compiled for it


def dequantize(w):
    """The float32 [in, out] matrix a weight stands for (a float32 array is returned as is)."""
    return w if isinstance(w, np.ndarray) else FORMATS[DTYPE_OF[type(w)]].dequantize(w)


def matmul(x, w):
    """x [n, in] @ a weight of any format [in, out], in that format's arithmetic (its `matmul`)."""
    return FORMATS[dtype_of(w)].matmul(x, w)


def integer(w):
    """Whether w's format multiplies in integers (int8): no BLAS for it."""
    return FORMATS[dtype_of(w)].integer


def columns(w, ids):
    """Columns `ids` of an [in, out] weight of any format as float32 rows: [len(ids), in]. (int8's
    scales are per column too, so a packed weight's columns are a weight of its format.)"""
    return dequantize(w[:, ids] if isinstance(w, np.ndarray) else type(w)(*(a[:, ids] for a in w))).T


# ---- the tied wte, as a parameter tree holds it (`transposed`) -----------------------------------


def _held_transposed(wte):
    return transposed("wte.weight", dtype_of(wte))


def pack_wte(wte, dtype):
    """A float32 wte [n_vocab, n_embd] as a parameter tree holds it in `dtype`."""
    return _pack(wte, dtype, "wte.weight")


def embedding(wte, ids):
    """wte rows for token ids: [len(ids), n_embd]. A packed wte holds wte.T, so its rows are columns."""
    return columns(wte, ids) if _held_transposed(wte) else wte[ids]


def lm_head(wte):
    """The tied lm_head as an [n_embd, n_vocab] weight: wte.T, which a packed wte already is."""
    return wte if _held_transposed(wte) else wte.T


def vocab_size(wte):
    """n_vocab, from a wte in any format."""
    return shape(lm_head(wte))[1]


def shape(w):
    """The [in, out] shape of a weight, packed or not."""
    return w.shape if isinstance(w, np.ndarray) else w.data.shape


def nbytes(w):
    return w.nbytes if isinstance(w, np.ndarray) else sum(a.nbytes for a in w)


def dtype_of(w):
    return DTYPE_OF[type(w)] if not isinstance(w, np.ndarray) else "float32"


# ---- whole parameter trees -----------------------------------------------------------------------

LINEARS = (("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj"))


def convert(params, dtype):
    """A parameter tree with every block linear and the tied wte in `dtype`; the rest shared, float32.

    Packed weights are converted from float32 (a packed tree is dequantized first)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    wte = dequantize(lm_head(params["wte"]["weight"])).T  # float32 [n_vocab, n_embd], whatever its format
    out = {**params, "wte": {"weight": pack_wte(wte, dtype)}, "h": []}
    for i, block in enumerate(params["h"]):
        block = {**block, "attn": dict(block["attn"]), "mlp": dict(block["mlp"])}
        for part, name in LINEARS:
            w = dequantize(block[part][name]["weight"])
            block[part][name] = {**block[part][name], "weight": _pack(w, dtype, f"h.{i}.{part}.{name}.weight")}
        out["h"].append(block)
    return out


def _pack(w, dtype, name):
    """pack(w, dtype) as tensor `name` is held (`transposed`), a failure naming the tensor."""
    try:
        return pack(w.T if transposed(name, dtype) else w, dtype)
    except FormatError as e:
        raise FormatError(f"cannot store tensor '{name}' in {dtype}: {e}") from None
