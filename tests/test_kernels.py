"""Every Numba kernel against its NumPy twin in model.py, and the kernel forward pass against the reference."""

import os

import numpy as np
import pytest
from conftest import assert_close, normal, random_gpt2, torch_logits
from hypothesis import given, settings
from hypothesis import strategies as st

import picogpt
from picogpt import kernels, model, scoring
from picogpt.checkpoint.params import to_params
from picogpt.engine import decode_tokens
from picogpt.kernels import ops

rng = np.random.default_rng(0)
randn = normal(rng)


@pytest.mark.parametrize("n", [1, 2, 7, 768, 1601])
def test_layer_norm(n):
    x, w, b = randn(5, n, scale=3.0) + 2, randn(n), randn(n)
    assert_close(ops.layer_norm_rows(x, w, b, 1e-5), model.layer_norm(x, w, b, 1e-5))


def test_gelu_over_its_whole_range():
    x = np.concatenate([np.linspace(-30, 30, 6000), randn(1000)]).astype(np.float32).reshape(7, -1)
    bias = randn(x.shape[1], scale=0.1)
    expected = model.gelu(x + bias)
    got = ops.bias_gelu_(x.copy(), bias)
    assert np.abs(got - expected).max() <= 1e-5 * np.maximum(1, np.abs(expected)).max()


@pytest.mark.parametrize("n_head,head_dim", [(1, 1), (1, 64), (3, 7), (25, 64), (12, 64)])
@pytest.mark.parametrize("n_kv", [1, 2, 31, 64])
def test_attend_one_row_reads_only_the_valid_cache(n_head, head_dim, n_kv):
    n_ctx = 64
    k_cache = np.full((n_head, n_ctx, head_dim), np.nan, np.float32)  # NaN beyond the valid length
    v_cache = np.full((n_head, n_ctx, head_dim), np.nan, np.float32)
    k_cache[:, :n_kv], v_cache[:, :n_kv] = randn(n_head, n_kv, head_dim, scale=2.0), randn(n_head, n_kv, head_dim)
    q = randn(n_head, head_dim, scale=2.0)
    expected = model.attention(q[:, None], k_cache[:, :n_kv], v_cache[:, :n_kv], past=n_kv - 1)[:, 0]
    got = ops.attend_rows(q[None], k_cache[None], v_cache[None], np.array([0]), np.array([n_kv]))[0]
    assert_close(got, expected)


def test_attend_many_rows_of_different_lengths():
    """Sequences at other rows and lengths (threads take runs of heads across all of them): each as
    model.attention on its own row."""
    n_head, head_dim, n_ctx, rows, n_kv = 3, 16, 40, np.array([4, 0, 2, 1, 3]), np.array([40, 1, 17, 3, 29])
    k_cache, v_cache = randn(5, n_head, n_ctx, head_dim, scale=2.0), randn(5, n_head, n_ctx, head_dim)
    q = randn(len(rows), n_head, head_dim, scale=2.0)
    got = ops.attend_rows(q, k_cache, v_cache, rows, n_kv)
    for s, (r, n) in enumerate(zip(rows, n_kv)):
        assert_close(got[s], model.attention(q[s][:, None], k_cache[r, :, :n], v_cache[r, :, :n], past=n - 1)[:, 0])


def test_an_edited_kernel_source_gets_a_new_cache_folder_and_the_package_is_not_written(tmp_path):
    """Numba invalidates a cached kernel only when its own file changes: the kernels' cache folder is
    named by a hash of every kernel source (and formats.py), so an edit to any of them starts an empty
    cache, where every kernel compiles again; the old folders go, and the sources are not touched."""
    import picogpt.kernels as k

    sources = []
    for name in ("ops.py", "forward.py", "formats.py"):
        (tmp_path / name).write_text(f"# {name}\n")
        sources.append(str(tmp_path / name))
    before = [(os.stat(f).st_mtime_ns, open(f).read()) for f in sources]
    base = str(tmp_path / "cache")
    first = k.cache_dir(sources, base)
    assert first == k.cache_dir(sources, base) and os.path.dirname(first) == base
    (tmp_path / "ops.py").write_text("# ops.py, edited\n")  # an edit to one file only
    second = k.cache_dir(sources, base)
    assert second != first
    os.makedirs(first)
    k.use_cache(second)
    assert not os.path.exists(first)  # kernels of sources that are gone
    assert [(os.stat(f).st_mtime_ns, open(f).read()) for f in sources][1:] == before[1:]  # nothing rewritten
    assert k.SOURCES[-1].endswith("formats.py") and any(f.endswith("microkernel.py") for f in k.SOURCES)
    k.use_cache(k.cache_dir())  # back to this package's folder


@pytest.mark.parametrize(
    "n_head,n_seq,past", [(1, 2, 0), (3, 7, 0), (25, 9, 4), (2, 64, 0), (4, 5, 59), (2, 300, 0), (3, 200, 150)]
)
def test_prefill_attention(n_head, n_seq, past):
    head_dim = 16
    q = randn(n_head, n_seq, head_dim, scale=3.0)
    k, v = randn(n_head, past + n_seq, head_dim, scale=3.0), randn(n_head, past + n_seq, head_dim)
    assert_close(ops.attention(q, k, v, past), model.attention(q, k, v, past))


SHAPES = [
    dict(n_layer=2, n_head=2, n_embd=32),
    dict(n_layer=1, n_head=1, n_embd=8),
    dict(n_layer=2, n_head=25, n_embd=50, n_inner=37),
]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "L{n_layer}H{n_head}E{n_embd}".format(**s))
def checkpoint(request):
    hf = random_gpt2(seed=2, vocab_size=1000, n_positions=64, **request.param)
    params = to_params({k: v.detach().numpy() for k, v in hf.state_dict().items()}, hf.config.to_dict())
    return params, hf.config.to_dict(), hf


@pytest.mark.parametrize("n_seq", [1, 7, 64])
def test_forward_matches_reference_and_torch(checkpoint, n_seq):
    params, config, hf = checkpoint
    ids = rng.integers(0, 1000, n_seq)
    got = kernels.gpt2(ids, **params, n_head=config["n_head"])
    assert_close(got, model.gpt2(ids, **params, n_head=config["n_head"]))
    assert np.abs(got - torch_logits(hf, ids)).max() <= 1e-4
    last = kernels.gpt2(ids, **params, n_head=config["n_head"], last=True)
    assert_close(last, got[-1:])


def test_cached_decoding_with_nan_beyond_the_valid_length(checkpoint):
    params, config, _ = checkpoint
    n_head = config["n_head"]
    ids = list(rng.integers(0, 1000, 40))
    cache = model.kv_cache(config["n_layer"], n_head, 64, config["n_embd"])
    for k, v in cache:
        k[:], v[:] = np.nan, np.nan
    steps = [kernels.gpt2(ids[:9], **params, n_head=n_head, cache=cache)]
    steps += [kernels.gpt2([t], **params, n_head=n_head, cache=cache, past=i) for i, t in enumerate(ids[9:], 9)]
    assert_close(np.concatenate(steps), model.gpt2(ids, **params, n_head=n_head))


def test_numba_generation_equals_numpy_generation(tiny):
    """Greedy, 64 tokens, through the sliding window of the 64-token context."""
    m = picogpt.load(tiny[0], backend="numba")
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
    prompt = list(rng.integers(0, 50000, 20))
    fast = list(decode_tokens(kernels.gpt2, m.params, m.config, prompt, 64, greedy))
    slow = list(decode_tokens(model.gpt2, m.params, m.config, prompt, 64, greedy))
    assert fast == slow
    assert m.generate("Hello", max_new_tokens=64, temperature=0) == picogpt.load(tiny[0], backend="numpy").generate(
        "Hello", max_new_tokens=64, temperature=0
    )


def test_weights_changed_in_place_reach_the_kernels_after_forget(tiny):
    """load lays the mapped weights out in panels and gives their pages back; a notebook that then
    changes a weight in place and calls forget() gets logits of the changed weights, on every call."""
    m = picogpt.load(tiny[0])
    ids = [5, 17, 300, 2]
    c_fc = m.params["h"][0]["mlp"]["c_fc"]["weight"]
    before = kernels.gpt2(ids, **m.params, n_head=2)
    c_fc *= 3.0  # a copy-on-write page of the mapped file now
    kernels.forget()
    for _ in range(2):  # the second call reuses the layout made by the first
        got = kernels.gpt2(ids, **m.params, n_head=2)
        assert_close(got, model.gpt2(ids, **m.params, n_head=2), rtol=1e-4)
    assert not np.allclose(got, before, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 9),
    st.integers(1, 3000),
    st.floats(0.01, 200),
    st.integers(0, 2**32 - 1),
)
def test_log_softmax_at_equals_the_numpy_reference(n, n_vocab, scale, seed):
    """The corpus scorer's last step (kernels.log_softmax_at) against scoring.log_softmax_at: rows of
    any width (blocks of 1024 and a remainder), logits spread from flat to a single spike."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, n_vocab))).astype(np.float32)
    targets = rng.integers(0, n_vocab, n)
    got, expected = kernels.log_softmax_at(logits, targets), scoring.log_softmax_at(logits, targets)
    assert got.dtype == np.float64 and got.shape == (n,)
    np.testing.assert_allclose(got, expected, rtol=2e-6, atol=2e-6)
