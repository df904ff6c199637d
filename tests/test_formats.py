"""Packed weights (float16, bfloat16, int8): packing against independent conversions, the kernels
against formats.dequantize + model.py, converted checkpoints saved and loaded again."""

import os

import numpy as np
import pytest
import torch
from conftest import assert_close, normal, random_gpt2, save_checkpoint

import picogpt
from picogpt import formats, kernels, model
from picogpt.checkpoint.params import CheckpointError, save_params, to_params

rng = np.random.default_rng(0)
randn = normal(rng)
PACKED = ["float16", "bfloat16", "int8"]


# ---- packing ---------------------------------------------------------------------------------------


def test_float16_rounds_like_numpy_and_widens_exactly():
    w = randn(67, 45, scale=3.0)
    packed = formats.pack(w, "float16")
    assert packed.data.dtype == np.uint16 and packed.data.shape == w.shape
    assert np.array_equal(formats.dequantize(packed), w.astype(np.float16).astype(np.float32))
    exact = formats.dequantize(packed)  # float16 values survive a second round trip bit for bit
    assert np.array_equal(formats.dequantize(formats.pack(exact, "float16")), exact)


def test_bfloat16_rounds_like_torch_and_widens_exactly():
    w = np.concatenate([randn(40, 33, scale=5.0), randn(40, 33, scale=1e-30), randn(40, 33, scale=1e30)])
    packed = formats.pack(w, "bfloat16")
    expected = torch.from_numpy(w).to(torch.bfloat16).float().numpy()  # round to nearest even
    assert np.array_equal(formats.dequantize(packed), expected)
    assert np.array_equal(formats.dequantize(formats.pack(expected, "bfloat16")), expected)


@pytest.mark.parametrize("n_in", [1, 31, 32, 50, 97, 768])
def test_int8_error_is_within_half_a_step_of_its_block(n_in):
    w = randn(n_in, 19) * np.exp(randn(n_in, 1, scale=2.0))  # rows of very different sizes
    w[:, 3] = 0  # an all-zero column: scale 0, no division by it
    q = formats.pack(w, "int8")
    assert q.data.dtype == np.int8 and q.data.shape == w.shape and q.scales.shape == (-(-n_in // 32), 19)
    assert np.abs(q.data).max() <= 127
    step = np.repeat(q.scales, 32, axis=0)[:n_in]  # each element's own block scale
    assert np.all(np.abs(formats.dequantize(q) - w) <= step / 2 * (1 + 1e-6))
    assert np.allclose(
        q.scales, np.abs(np.concatenate([w, np.zeros((-n_in % 32, 19), np.float32)]).reshape(-1, 32, 19)).max(1) / 127
    )


def test_bad_values_are_refused():
    with pytest.raises(formats.FormatError, match="bfloat16"):
        formats.pack(np.full((2, 2), 1e5, np.float32), "float16")
    with pytest.raises(formats.FormatError, match="NaN"):
        formats.pack(np.array([[1.0, np.nan]], np.float32), "int8")
    with pytest.raises(ValueError, match="dtype"):
        formats.pack(randn(2, 2), "int4")


@pytest.mark.parametrize("dtype", formats.DTYPES)
def test_a_wte_is_held_as_transposed_says_and_its_rows_are_columns_of_its_lm_head(dtype):
    wte = randn(101, 40)
    held = formats.pack_wte(wte, dtype)
    assert formats.shape(held) == formats.held_shape("wte.weight", wte.shape, dtype)
    assert formats.shape(held) == ((40, 101) if formats.transposed("wte.weight", dtype) else (101, 40))
    assert formats.vocab_size(held) == 101 and formats.shape(formats.lm_head(held)) == (40, 101)
    ids = np.array([0, 5, 100, 5])
    assert np.array_equal(formats.embedding(held, ids), formats.dequantize(formats.lm_head(held)).T[ids])
    if dtype != "float32":
        assert formats.lm_head(held) is held  # the lm_head's [in, out] weight, in its own format


# ---- kernels against the dequantize-then-matmul reference ---------------------------------------


SHAPES = [dict(n_layer=2, n_head=2, n_embd=64), dict(n_layer=2, n_head=25, n_embd=50, n_inner=37)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "H{n_head}E{n_embd}".format(**s))
def checkpoint(request):
    hf = random_gpt2(seed=3, vocab_size=1000, n_positions=64, **request.param)
    params = to_params({k: v.detach().numpy() for k, v in hf.state_dict().items()}, hf.config.to_dict())
    return params, hf.config.to_dict()


@pytest.fixture(scope="module")
def long_context():
    hf = random_gpt2(seed=4, vocab_size=300, n_positions=512, n_layer=2, n_head=2, n_embd=32)
    params = to_params({k: v.detach().numpy() for k, v in hf.state_dict().items()}, hf.config.to_dict())
    return params, hf.config.to_dict()


@pytest.mark.parametrize("dtype", formats.DTYPES)
@pytest.mark.parametrize("rows_max", [None, 64])  # this host's rows, then BLAS for every float format's longer steps
def test_prefills_past_several_attention_blocks(long_context, dtype, rows_max, monkeypatch):
    """ops.attention takes queries in blocks of 128: prompts of 300 tokens, whole and in two
    pieces through the cache (the second starting mid-block), one sequence and several at once."""
    if rows_max:
        monkeypatch.setattr(kernels.forward, "ROWS_MAX", dict.fromkeys(kernels.forward.ROWS_MAX, rows_max))
    params, config = long_context
    params = formats.convert(params, dtype)
    n_head = config["n_head"]
    ids = rng.integers(0, 300, 300)
    expected = model.gpt2(ids, **params, n_head=n_head)
    assert_close(kernels.gpt2(ids, **params, n_head=n_head), expected)
    cache = model.kv_cache(config["n_layer"], n_head, 512, config["n_embd"])
    first = kernels.gpt2(ids[:150], **params, n_head=n_head, cache=cache)
    second = kernels.gpt2(ids[150:], **params, n_head=n_head, cache=cache, past=150)
    assert_close(np.concatenate([first, second]), expected)
    other = rng.integers(0, 300, 260)
    cache = model.kv_cache(config["n_layer"], n_head, 512, config["n_embd"], n_rows=2)
    rows = picogpt.kernels.gpt2_rows([ids, other], **params, n_head=n_head, cache=cache, rows=[0, 1], past=[0, 0])
    assert_close(rows, np.stack([expected[-1], model.gpt2(other, **params, n_head=n_head)[-1]]))


@pytest.mark.parametrize("dtype", PACKED)
@pytest.mark.parametrize("n_seq", [1, 7, 64])
def test_forward_on_packed_weights_matches_the_reference(checkpoint, dtype, n_seq):
    params, config = checkpoint
    packed = formats.convert(params, dtype)
    ids = rng.integers(0, 1000, n_seq)
    expected = model.gpt2(ids, **packed, n_head=config["n_head"])
    assert_close(kernels.gpt2(ids, **packed, n_head=config["n_head"]), expected)
    assert_close(kernels.gpt2(ids, **packed, n_head=config["n_head"], last=True), expected[-1:])
    # and the packed model is still the same model: logits near float32's
    full = model.gpt2(ids, **params, n_head=config["n_head"])
    assert (
        np.sqrt(np.mean((expected - full) ** 2) / np.mean(full**2))
        < {"float16": 1e-3, "bfloat16": 1e-2, "int8": 2e-2}[dtype]
    )


@pytest.mark.parametrize("dtype", PACKED)
def test_cached_decoding_on_packed_weights_equals_a_full_forward(checkpoint, dtype):
    params, config = checkpoint
    packed, n_head = formats.convert(params, dtype), config["n_head"]
    ids = list(rng.integers(0, 1000, 30))
    for forward in (model.gpt2, kernels.gpt2):
        cache = model.kv_cache(config["n_layer"], n_head, 64, config["n_embd"])
        steps = [forward(ids[:5], **packed, n_head=n_head, cache=cache)]
        steps += [forward([t], **packed, n_head=n_head, cache=cache, past=i) for i, t in enumerate(ids[5:], 5)]
        # int8 quantizes each row's activations: a last-bit difference between the cached and the full
        # pass's float sums can move one value across a rounding half, a q apart (seen: 1.5e-5)
        rtol = 1e-4 if formats.FORMATS[dtype].integer else 1e-5
        assert_close(np.concatenate(steps), model.gpt2(ids, **packed, n_head=n_head), rtol=rtol)


# ---- converted checkpoints ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", *PACKED])
def test_converted_checkpoint_loads_memory_mapped_with_identical_logits(tiny, tmp_path, dtype):
    converted = picogpt.load(tiny[0], dtype=dtype)
    assert converted.dtype == dtype
    out = str(tmp_path / dtype)
    save_params(converted.params, converted.config, out, converted.folder)
    assert sorted(os.listdir(out)) == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    loaded = picogpt.load(out)  # no dtype: as stored, nothing converted
    assert loaded.dtype == dtype
    c_fc = loaded.params["h"][0]["mlp"]["c_fc"]["weight"]
    assert isinstance((c_fc if dtype == "float32" else c_fc.data).base, np.memmap)
    ids = converted.tokenizer.encode("Hello world, this is a test")
    n_head = converted.config["n_head"]
    for forward in (model.gpt2, kernels.gpt2):
        assert np.array_equal(
            forward(ids, **loaded.params, n_head=n_head), forward(ids, **converted.params, n_head=n_head)
        )
    assert loaded.generate("Hi", max_new_tokens=10, seed=1) == converted.generate("Hi", max_new_tokens=10, seed=1)


def test_float16_out_of_range_and_truncated_scales_are_named(tiny, tmp_path):
    hf = random_gpt2(seed=4)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_fc.weight[0, 0] = 1e5
    folder = save_checkpoint(hf, str(tmp_path / "big"))
    with pytest.raises(CheckpointError, match=r"h\.1\.mlp\.c_fc\.weight.*bfloat16"):
        picogpt.load(folder, dtype="float16")
    assert picogpt.load(folder, dtype="bfloat16").dtype == "bfloat16"

    int8 = picogpt.load(tiny[0], dtype="int8")
    out = str(tmp_path / "int8")
    save_params(int8.params, int8.config, out, int8.folder)
    from picogpt.checkpoint.params import read_safetensors, write_safetensors

    tensors = {
        k: ("F32" if v.dtype == np.float32 else "I8", v)
        for k, v in read_safetensors(os.path.join(out, "model.safetensors")).items()
    }
    del tensors["h.0.attn.c_proj.weight.scales"]
    write_safetensors(os.path.join(out, "model.safetensors"), tensors, {"format": "picogpt", "dtype": "int8"})
    with pytest.raises(CheckpointError, match=r"h\.0\.attn\.c_proj\.weight\.scales"):
        picogpt.load(out)


def test_load_refuses_an_unknown_dtype(tiny):
    with pytest.raises(ValueError, match="dtype must be one of"):
        picogpt.load(tiny[0], dtype="int4")


def test_one_table_of_formats():
    """cli.py's copy of the format names (it must not import NumPy early) is the table's; each format's
    stored arrays are the ones pack makes, and its bytes are theirs."""
    from picogpt import cli

    assert cli.DTYPES == formats.DTYPES
    for dtype in formats.DTYPES:
        w = formats.pack(randn(45, 19), dtype)
        held = [w] if dtype == "float32" else list(w)
        layout = formats.arrays(45, 19, dtype)
        assert [a.shape for a in held] == [shape for _, _, shape in layout]
        assert formats.nbytes_of(45, 19, dtype) == formats.nbytes(w)
        assert formats.dtype_of(w) == dtype and isinstance(w, formats.FORMATS[dtype].cls)
