"""Text through the model's eyes (reading.py, features.py): every per-token figure and every document
feature against a plain float64 NumPy implementation of its paper's formula over the full softmax of
the reference forward pass (model.gpt2), on the shipped tiny model and on a random GPT-2 with the
real vocabulary, documents longer than the context included; the kernels against reading.py's NumPy;
the CLI's --tokens, --features and --jsonl agreeing with each other; the server's ranks and entropies."""

import json
import math
import zlib

import httpx
import numpy as np
import pytest
from conftest import save_checkpoint
from helpers import assert_one_line_error, run, start, stop
from hypothesis import given, settings
from hypothesis import strategies as st

import picogpt
from picogpt import kernels, reading, scoring
from picogpt import model as reference

ALL = "min-k=20,min-k=5,min-k++=20,zlib,entropy,gltr,fast-detect,binoculars"


@pytest.fixture(scope="module")
def models(tiny, tmp_path_factory):
    """(model, observer) pairs: the shipped tiny model read by itself, and two random GPT-2s with the
    real vocabulary and a context of 64."""
    from conftest import random_gpt2

    other = save_checkpoint(random_gpt2(seed=1), str(tmp_path_factory.mktemp("observer")))
    shipped = picogpt.load("tiny")
    return {"tiny": (shipped, shipped), "random": (picogpt.load(tiny[0]), picogpt.load(other))}


def full_logits(m, ids, stride=None):
    """float64 logits before each token 1..n-1 of ids, from the reference forward pass over the
    windows scoring.py defines (Hugging Face's sliding window)."""
    n_ctx, out = m.config["n_positions"], {}
    for begin, first, end in scoring.windows(len(ids), n_ctx, scoring.stride_for(stride, n_ctx)):
        logits = reference.gpt2(ids[begin:end], **m.params, n_head=m.config["n_head"])
        out.update(zip(range(first, end), logits[first - 1 - begin : end - 1 - begin]))
    return np.array([out[i] for i in range(1, len(ids))], np.float64)


def oracle(logits, ids, observer_logits=None):
    """Each figure by its definition, float64 over the full softmax: logits [n, V] before tokens ids[1:]."""
    logp = logits - logits.max(axis=1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(axis=1, keepdims=True))
    p = np.exp(logp)
    targets = np.asarray(ids[1:])
    rows = np.arange(len(targets))
    out = {
        "logprob": logp[rows, targets],
        "rank": 1 + (logits > logits[rows, targets][:, None]).sum(axis=1),
        "entropy": -(p * logp).sum(axis=1),
    }
    mu = (p * logp).sum(axis=1)  # E_p[log p]
    out["variance"] = (p * (logp - mu[:, None]) ** 2).sum(axis=1)
    out["mu"] = mu
    if observer_logits is not None:
        q = np.exp(observer_logits - observer_logits.max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        out["cross"] = -(q * logp).sum(axis=1)
    return out


def paper_features(o, text):
    """The features as their papers define them, from oracle figures."""
    n = len(o["logprob"])
    low = lambda values, k: np.sort(values)[: max(1, int(n * k / 100))].mean()  # noqa: E731
    z = (o["logprob"] - o["mu"]) / np.sqrt(o["variance"])
    ranks = o["rank"]
    return {
        "min-k=20": low(o["logprob"], 20),
        "min-k=5": low(o["logprob"], 5),
        "min-k++=20": low(z, 20),
        "zlib": -o["logprob"].mean() / len(zlib.compress(text.encode("utf-8"))),
        "entropy": o["entropy"].mean(),
        "gltr": [
            int((ranks <= 10).sum()),
            int(((ranks > 10) & (ranks <= 100)).sum()),
            int(((ranks > 100) & (ranks <= 1000)).sum()),
            int((ranks > 1000).sum()),
        ],
        "fast-detect": (o["logprob"].sum() - o["mu"].sum()) / math.sqrt(o["variance"].sum()),
        "binoculars": -o["logprob"].mean() / o["cross"].mean(),
    }


def texts(m, rng, n_ctx):
    """A short text, one of about the context, and one of 2.5 contexts (windows overlap)."""
    words = [
        "the",
        "of",
        "a",
        "cat",
        "sat",
        "on",
        "mat",
        "and",
        "then",
        "it",
        "ran",
        "to",
        "see",
        "what",
        "was",
        "there",
        ",",
        ".",
        "quickly",
    ]
    out = []
    for tokens in (12, n_ctx - 3, int(2.5 * n_ctx)):
        text = ""
        while len(m.tokenizer.encode(text)) < tokens:
            text += " " + words[rng.integers(len(words))]
        out.append(text)
    return out


def close_ranks(got, want, logits, ids):
    """Ranks equal, but where float32 and float64 order logits within 1e-4 of the token's differently."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            chosen = logits[i, ids[i + 1]]
            near = np.abs(logits[i] - chosen) < 1e-4
            assert abs(g - w) <= near.sum(), (i, g, w)


@pytest.mark.parametrize("name", ["tiny", "random"])
def test_every_figure_and_feature_against_its_formula_over_the_full_softmax(models, name):
    m, observer = models[name]
    rng = np.random.default_rng(0)
    for text in texts(m, rng, m.config["n_positions"]):
        ids = m.tokenizer.encode(text)
        logits, seen = full_logits(m, ids), full_logits(observer, ids)
        o = oracle(logits, ids, seen)
        r = m.read(text, top=4)
        assert list(r.ids) == ids and r.tokens[1] == m.tokenizer.decode([ids[1]])
        assert np.isnan(r.logprob[0]) and r.rank[0] == 0
        np.testing.assert_allclose(r.logprob[1:], o["logprob"], atol=2e-4)
        np.testing.assert_allclose(r.entropy[1:], o["entropy"], atol=2e-4)
        close_ranks(r.rank[1:], o["rank"], logits, ids)
        for i in range(1, len(ids)):  # the top 4: the 4 largest log-probabilities, best first
            row = logits[i - 1] - logits[i - 1].max()
            row -= np.log(np.exp(row).sum())
            best = np.sort(row)[::-1][:4]
            np.testing.assert_allclose(r.top_logprob[i], best, atol=2e-4)
            np.testing.assert_allclose(row[r.top[i]], best, atol=2e-4)
        got = m.score(text, features=ALL, observer=observer)["features"]
        want = paper_features({**o, "rank": r.rank[1:]}, text)  # GLTR's buckets of the ranks checked above
        assert list(got) == list(want) and sum(got["gltr"]) == len(ids) - 1
        for key in want:
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-4), key


def test_score_many_features_equal_one_document_at_a_time(models):
    m, observer = models["random"]
    rng = np.random.default_rng(1)
    docs = texts(m, rng, m.config["n_positions"]) + ["x", "", "A short one."]
    many = list(m.score_many(docs, features=ALL, observer=observer, budget=128))
    for text, got in zip(docs, many):
        if len(m.tokenizer.encode(text)) < 2:
            assert got["reason"] and all(v is None for v in got["features"].values())
            continue
        alone = m.score(text, features=ALL, observer=observer)
        assert got["nll"] == pytest.approx(alone["nll"], rel=1e-5)
        for key, value in alone["features"].items():
            assert got["features"][key] == pytest.approx(value, rel=1e-4, abs=1e-5), key


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 6),
    n_vocab=st.integers(2, 3000),
    scale=st.sampled_from([0.01, 1.0, 30.0]),
    top=st.integers(0, 7),
    ties=st.booleans(),
    seed=st.integers(0, 2**31),
)
def test_the_kernels_equal_the_numpy_reference(n, n_vocab, scale, top, ties, seed):
    """kernels.read_at and kernels.cross_at against reading.read_at and reading.cross_at: rows of any
    width and spread, tied logits (the lower id first among the top), the target anywhere."""
    rng = np.random.default_rng(seed)
    logits = (scale * rng.standard_normal((n, n_vocab))).astype(np.float32)
    if ties:
        logits[:, rng.integers(n_vocab, size=3)] = logits.max() + 1
        logits = np.round(logits, 1)
    targets = rng.integers(n_vocab, size=n)
    got, want = kernels.read_at(logits, targets, min(top, n_vocab)), reading.read_at(logits, targets, min(top, n_vocab))
    for f in ("logprob", "entropy", "variance", "top_logprob"):
        np.testing.assert_allclose(got[f], want[f], rtol=1e-5, atol=1e-5 * max(1.0, scale), err_msg=f)
    assert (got["rank"] == want["rank"]).all() and (got["top"] == want["top"]).all()
    other = (scale * rng.standard_normal((n, n_vocab))).astype(np.float32)
    np.testing.assert_allclose(
        kernels.cross_at(other, logits), reading.cross_at(other, logits), rtol=1e-5, atol=1e-5 * max(1.0, scale)
    )


def test_cli_tokens_features_and_jsonl_agree(tmp_path):
    """score --tokens --json gives each token's figures; --features on score --jsonl gives, per
    document, what those figures give by the papers' formulas."""
    docs = ["The cat sat on the mat, and then it ran.", "Once upon a time there was a dog. " * 3, ""]
    corpus = tmp_path / "docs.jsonl"
    corpus.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(docs)))
    out = run("score", "--model", "tiny", "--jsonl", str(corpus), "--features", ALL, "--observer", "tiny")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [line["id"] for line in lines] == [0, 1, 2]
    for text, line in zip(docs, lines):
        path = tmp_path / "one.txt"
        path.write_text(text)
        one = run(
            "score",
            str(path),
            "--model",
            "tiny",
            "--tokens",
            "--json",
            "--top",
            "3",
            "--features",
            ALL,
            "--observer",
            "tiny",
        )
        if text == "":
            assert one.returncode != 0 and line["reason"]
            continue
        assert one.returncode == 0, one.stderr
        whole = json.loads(one.stdout)
        tokens = whole["tokens"][1:]
        o = {
            "logprob": np.array([t["logprob"] for t in tokens]),
            "rank": np.array([t["rank"] for t in tokens]),
            "entropy": np.array([t["entropy"] for t in tokens]),
            "variance": np.array([t["variance"] for t in tokens]),
            "cross": np.array([t["cross"] for t in tokens]),
        }
        o["mu"] = -o["entropy"]
        assert all(len(t["top"]) == 3 and t["top"][0]["logprob"] >= t["logprob"] for t in tokens)
        for key, value in paper_features(o, text).items():
            assert line["features"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key
            assert whole["features"][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_cli_tokens_table_and_bad_options(tmp_path, tiny):
    path = tmp_path / "t.txt"
    path.write_text("The cat sat on the mat.")
    out = run("score", str(path), "--model", "tiny", "--tokens", "--top", "2", "--features", "gltr,min-k=10")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    m = picogpt.load("tiny")
    n = len(m.tokenizer.encode("The cat sat on the mat."))
    assert lines[0].split()[:5] == ["token", "id", "logprob", "rank", "entropy"] and len(lines) >= n + 1
    assert any(line.startswith("gltr") for line in lines) and any(line.startswith("min-k=10") for line in lines)
    for args, words in [
        (["--features", "bogus"], ["no feature 'bogus'", "min-k"]),
        (["--features", "binoculars"], ["--observer"]),
        (["--features", "min-k=0"], ["percentage"]),
        (["--features", "zlib=3"], ["takes no k"]),
        (["--top", "101", "--tokens"], ["--top"]),
        (["--observer", "tiny"], ["--features binoculars"]),
    ]:
        bad = run("score", str(path), "--model", "tiny", *args)
        assert bad.returncode == 2, (args, bad.stderr)
        assert_one_line_error(bad, *words)
    bad = run("score", "--jsonl", str(path), "--model", "tiny", "--tokens")
    assert bad.returncode == 2
    assert_one_line_error(bad, "--tokens")
    corpus = tmp_path / "c.jsonl"
    corpus.write_text(json.dumps({"text": "The cat sat."}) + "\n")
    for source in ([str(path)], ["--jsonl", str(corpus)]):  # an observer with GPT-2's tokenizer beside tiny's
        bad = run("score", *source, "--model", "tiny", "--features", "binoculars", "--observer", tiny[0])
        assert bad.returncode == 2, bad.stderr
        assert_one_line_error(bad, "--observer", "tokenizer")


def test_the_server_gives_each_tokens_rank_and_entropy():
    """Where logprobs are asked, each token's rank and entropy (token_ranks, token_entropies) as
    Model.read gives them, for an echoed prompt and the new tokens; OpenAI's client ignores them."""
    m = picogpt.load("tiny")
    process, url = start()
    try:
        text = "The cat sat on the mat, and the dog"
        r = httpx.post(
            f"{url}/v1/completions",
            json={"prompt": text, "max_tokens": 5, "echo": True, "logprobs": 2, "temperature": 0},
            timeout=60,
        ).json()
        lp = r["choices"][0]["logprobs"]
        whole = r["choices"][0]["text"]
        prompt = m.tokenizer.encode(text)
        ids = prompt + m.complete(text, max_new_tokens=5, temperature=0)[0]["token_ids"]
        assert whole == m.tokenizer.decode(ids)
        seen = m.records(ids)
        assert len(lp["token_ranks"]) == len(ids) == len(lp["token_entropies"])
        assert lp["token_ranks"][0] is None and lp["token_entropies"][0] is None
        assert lp["token_ranks"][1:] == [int(x) for x in seen["rank"][1:]]
        np.testing.assert_allclose(lp["token_entropies"][1:], seen["entropy"][1:], atol=1e-3)
        assert all(rank == 1 for rank in lp["token_ranks"][len(prompt) :])  # greedy
    finally:
        stop(process)


@settings(max_examples=200, deadline=None)
@given(spec=st.text(alphabet=st.sampled_from(list("min-k+=,. 0123456789zlibgtrfastdeoc\n\x00é")), max_size=40))
def test_any_features_option_is_a_feature_list_or_one_line_naming_the_fix(spec):
    """--features of any text: a list of known features with k in (0, 100], or a ValueError of one
    line that names what to write."""
    from picogpt import features

    try:
        wanted = features.parse(spec)
    except ValueError as e:
        message = str(e)
        assert message and "\n" not in message
        assert any(word in message for word in ("choose from", "takes no k", "percentage", "name at least one"))
        return
    assert wanted and all(w.feature.name in features.FEATURES for w in wanted)
    assert all(0 < w.k <= 100 for w in wanted if w.feature.takes_k)


@pytest.mark.slow
def test_gpt2_shaped_long_document_against_the_formulas(tmp_path):
    """GPT-2's real shapes (12 layers, width 768, context 1024, random weights): a document of 1.4
    contexts, in windows, every figure and feature against the float64 formulas (the observer: itself)."""
    from conftest import random_gpt2

    m = picogpt.load(
        save_checkpoint(random_gpt2(seed=2, n_embd=768, n_layer=12, n_head=12, n_positions=1024), str(tmp_path))
    )
    ids = np.random.default_rng(4).integers(0, 50257, 1434).tolist()
    text = m.tokenizer.decode(ids)
    ids = m.tokenizer.encode(text)
    logits = full_logits(m, ids)
    parts = [oracle(logits[i : i + 200], ids[i : i + 201], logits[i : i + 200]) for i in range(0, len(logits), 200)]
    o = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    r = m.read(text, top=3)
    np.testing.assert_allclose(r.logprob[1:], o["logprob"], atol=1e-3)
    np.testing.assert_allclose(r.entropy[1:], o["entropy"], atol=1e-3)
    np.testing.assert_allclose(r.variance[1:], o["variance"], rtol=1e-3, atol=1e-3)
    close_ranks(r.rank[1:], o["rank"], logits, ids)
    got = m.score(text, features=ALL, observer=m)["features"]
    want = paper_features({**o, "rank": r.rank[1:]}, text)
    for key in want:
        assert got[key] == pytest.approx(want[key], rel=1e-3, abs=1e-4), key
