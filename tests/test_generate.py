"""Sampling and text generation: validation, seeds, stop strings, UTF-8 streaming."""

import functools

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

import picogpt
from picogpt.sampling import sample
from picogpt.text import stream_text
from picogpt.tokenizer import encode, load_tokenizer


@pytest.fixture(scope="module")
def model(tiny):
    return picogpt.load(tiny[0])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_values_raise_naming_the_value(model, kwargs, name):
    with pytest.raises(ValueError, match=name):
        model.generate("hi", **kwargs)


def test_same_seed_same_text(model):
    a = model.generate("Once upon a time", max_new_tokens=20, seed=7)
    assert a == model.generate("Once upon a time", max_new_tokens=20, seed=7)
    assert a != model.generate("Once upon a time", max_new_tokens=20, seed=8)
    assert len(a) > 0


def test_temperature_zero_is_greedy(model):
    ids = encode(model.tokenizer, "The meaning of life is")
    for _ in range(5):
        ids.append(int(np.argmax(picogpt.gpt2(ids, **model.params, n_head=2)[-1])))
    expected = model.tokenizer.decode(ids[-5:])
    assert model.generate("The meaning of life is", max_new_tokens=5, temperature=0) == expected


def test_empty_prompt_starts_from_endoftext(model):
    first = int(np.argmax(picogpt.gpt2([50256], **model.params, n_head=2)[-1]))
    text = model.generate("", max_new_tokens=1, temperature=0)
    assert text == model.tokenizer.decode([first])


def test_zero_new_tokens(model):
    assert model.generate("hello", max_new_tokens=0) == ""


def test_top_k_and_top_p_keep_the_tokens_transformers_keeps():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal(200).astype(np.float32) * 3
    for top_k, top_p in [(10, 1.0), (None, 0.5), (20, 0.7), (1, 1.0)]:
        scores = torch.from_numpy(logits)[None] / 0.8
        if top_k:
            scores = TopKLogitsWarper(top_k)(None, scores)
        if top_p < 1:
            scores = TopPLogitsWarper(top_p)(None, scores)
        allowed = set(np.flatnonzero(np.isfinite(scores[0].numpy())))
        drawn = {sample(logits, rng, 0.8, top_k, top_p) for _ in range(3000)}
        assert drawn == allowed, (top_k, top_p)


@settings(max_examples=50, deadline=None)
@given(st.integers(1, 60), st.integers(0, 2**32 - 1))
def test_top_k_draws_the_same_token_whatever_order_argpartition_gives(top_k, seed):
    # NumPy's argpartition returns the k largest in an order that depends on its SIMD path (AVX-512
    # selects with x86-simd-sort): a seeded draw must not, or the same seed gives other text on
    # another CPU. The oracle: the same draw over the top-k tokens taken in token order.
    logits = np.random.default_rng(seed).standard_normal(100).astype(np.float32) * 2
    keep = np.sort(np.argsort(-logits, kind="stable")[:top_k])
    probs = picogpt.softmax(logits[keep] / 0.8)
    u = np.random.default_rng(seed).random()
    cdf = np.cumsum(probs, dtype=np.float64)
    expected = keep[min(np.searchsorted(cdf, u * cdf[-1], side="right"), top_k - 1)]
    assert sample(logits, np.random.default_rng(seed), 0.8, top_k) == expected

    def scrambled(a, kth):  # the k largest last, as argpartition promises, in a random order among them
        order = np.argsort(a, kind="stable")
        return np.concatenate([order[:kth], np.random.default_rng(seed + 1).permutation(order[kth:])])

    with pytest.MonkeyPatch.context() as m:
        m.setattr(np, "argpartition", scrambled)
        assert sample(logits, np.random.default_rng(seed), 0.8, top_k) == expected


def test_sampling_frequencies_follow_softmax_over_temperature():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    rng = np.random.default_rng(1)
    for temperature in (1.0, 2.0):
        expected = picogpt.softmax(logits / temperature)
        counts = np.bincount([sample(logits, rng, temperature) for _ in range(20000)], minlength=4)
        np.testing.assert_allclose(counts / 20000, expected, atol=0.015)


@pytest.fixture(scope="module")
def enc(bpe_folder):
    return load_tokenizer(bpe_folder)


def test_stream_never_splits_a_utf8_character(enc):
    text = "rockets 🚀🚀 and 日本語 and 👩‍👩‍👧‍👦 done"
    ids = encode(enc, text)
    assert any(not enc.decode_single_token_bytes(t).decode("utf-8", "ignore") for t in ids)  # some split bytes
    pieces = list(stream_text(iter(ids), enc))
    assert "".join(pieces) == text and "\ufffd" not in "".join(pieces)
    assert len(pieces) > 5  # streamed, not one lump at the end


@pytest.mark.parametrize(
    "stops,expected",
    [
        (["Goodbye"], "Hello world. "),
        (["o w"], "Hell"),
        (["zzz", ". G"], "Hello world"),
        (["nothing"], "Hello world. Goodbye world."),
    ],
)
def test_stop_strings_cut_the_text_and_are_never_streamed(enc, stops, expected):
    pieces = list(stream_text(iter(encode(enc, "Hello world. Goodbye world.")), enc, stops))
    assert "".join(pieces) == expected


def test_stream_stops_at_endoftext(enc):
    ids = encode(enc, "before<|endoftext|>after")
    assert "".join(stream_text(iter(ids), enc)) == "before"


def test_stream_yields_pieces_as_tokens_arrive(model):
    pieces = list(model.stream("Once upon a time", max_new_tokens=10, seed=3))
    assert len(pieces) >= 2 and "".join(pieces) == model.generate("Once upon a time", max_new_tokens=10, seed=3)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(min_value=-(2**70), max_value=2**70) | st.floats(allow_nan=True) | st.booleans() | st.text(max_size=3)
)
def test_seed_is_a_whole_number_from_0_to_2_64_or_an_error_naming_it(seed):
    model = tiny_model()
    if isinstance(seed, int) and not isinstance(seed, bool) and 0 <= seed < 2**64:
        assert model.generate("x", max_new_tokens=2, seed=seed) == model.generate("x", max_new_tokens=2, seed=seed)
    else:
        with pytest.raises(ValueError, match="seed must be a whole number from 0 to 2\\*\\*64 - 1"):
            model.generate("x", max_new_tokens=2, seed=seed)


@functools.cache
def tiny_model():
    return picogpt.load("tiny")


def test_a_top_p_below_float32s_smallest_keeps_the_most_likely_token():
    """1e-170 is 0 in float32, where the kept mass is compared: the set was empty (a 500 from the server)."""
    logits = np.random.default_rng(0).standard_normal(100).astype(np.float32)
    for top_p in [1e-170, 1e-45, 1e-8]:
        assert sample(logits, np.random.default_rng(1), temperature=1.0, top_p=top_p) == int(np.argmax(logits))


# ---- temperatures and penalties at the ends of float64 -----------------------------------------------------


def reference_probs(logits, temperature):
    """softmax(logits / temperature) in float64 after subtracting the largest, so a temperature near 0
    tends to greedy and never overflows: the independent oracle of what `sample` may pick."""
    with np.errstate(over="ignore"):  # to -inf: a probability of 0
        x = (logits.astype(np.float64) - logits.max()) / temperature
    p = np.exp(x)
    return p / p.sum()


@pytest.mark.filterwarnings("error")  # no overflow or divide-by-zero warning leaks to the user either
@settings(max_examples=300, deadline=None)
@given(
    st.floats(min_value=0, max_value=2, exclude_min=True),  # down to subnormals: 5e-324
    st.integers(min_value=0, max_value=2**32 - 1),
)
def test_any_positive_temperature_picks_a_token_the_float64_softmax_allows(temperature, seed):
    """Before: a temperature under about 1e-38 overflowed logits / temperature to infinity and softmax
    to NaN, so the pick was whatever searchsorted made of NaN."""
    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(50) * 10).astype(np.float32)
    token = sample(logits, np.random.default_rng(seed), temperature=temperature, top_k=None)
    assert reference_probs(logits, temperature)[token] > 0
    if temperature < 1e-40:
        assert token == int(np.argmax(logits))


@pytest.mark.filterwarnings("error")
@settings(max_examples=300, deadline=None)
@given(st.floats(min_value=0, max_value=1e308, exclude_min=True), st.integers(min_value=0, max_value=2**32 - 1))
@example(3.4028235677973366e38, 92)  # rounds to inf in float32 (NumPy 2 kept the product in float32)
def test_any_positive_repetition_penalty_gives_finite_logits_as_its_float64_limit(penalty, seed):
    """penalize in float32 equals the same rule in float64 clipped to float32's range (a logit of 0 stays
    0): before, a penalty under float32's smallest divided by 0 and gave infinite or NaN logits."""
    from picogpt.sampling import penalize

    rng = np.random.default_rng(seed)
    logits = (rng.standard_normal(40) * 10).astype(np.float32)
    logits[3] = 0.0
    seen = [0, 3, 5, 7, 5, 20]
    got = penalize(logits, seen, penalty)
    x = logits.astype(np.float64)
    want = x.copy()
    s = np.unique(seen)
    with np.errstate(over="ignore"):
        want[s] = np.where(x[s] < 0, x[s] * penalty, x[s] / penalty)
    big = float(np.finfo(np.float32).max)
    want = np.clip(want, -big, big)
    assert np.isfinite(got).all() and got.dtype == np.float32
    assert got == pytest.approx(want, rel=1e-6, abs=1e-30)  # under 1e-30: float32 subnormals, 0 as a logit
    assert sample(got, np.random.default_rng(seed), temperature=1.0, top_k=None) in range(40)


def test_a_temperature_near_0_generates_the_greedy_text(model):
    greedy = model.generate("Once upon a time", max_new_tokens=12, temperature=0)
    for temperature in [1e-300, 5e-324]:
        assert model.generate("Once upon a time", max_new_tokens=12, temperature=temperature, seed=1) == greedy
