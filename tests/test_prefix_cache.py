"""The prefix cache (engine.py): a request whose prompt begins as a retired one's did feeds only the
rest, and gets exactly what it gets with the cache off: the same greedy and seeded tokens, the same
prompt logprobs; an evicted or cancelled prefix included; the rows never more than the budget."""

import httpx
import numpy as np
import pytest
from helpers import metric, start, stop

import picogpt
from picogpt import sampling, scoring
from picogpt.engine import Engine, rows_one_by_one
from picogpt.options import SamplingParams


@pytest.fixture(scope="module")
def m(tiny):
    return picogpt.load(tiny[0])


def run(engine, m, requests, together=False):
    """requests: [(ids, max_new_tokens, seed or None (greedy), score?)] -> [(tokens, prompt logprobs)],
    one after another (each retired before the next is added), or all added at once."""
    out = [None] * len(requests)

    def add(i):
        ids, n, seed, scored = requests[i]
        params = SamplingParams(max_new_tokens=n, temperature=0.0 if seed is None else 1.0, top_k=None)
        lp = [] if scored else None
        score = (lambda logits, targets: lp.extend(scoring.log_softmax_at(logits, targets))) if scored else None
        seq = engine.add(ids, n, sampling.picker(ids, params, seed, m.config["vocab_size"]), score)
        out[i] = (seq, [], lp)

    def drain():
        while engine.busy:
            for seq, token in engine.step():
                next(o for o in out if o is not None and o[0] is seq)[1].append(token)

    for i in range(len(requests)):
        add(i)
        if not together:
            drain()
    drain()
    return [(tokens, lp) for _, tokens, lp in out]


def engines(m, **kw):
    on = Engine(m.forward_rows, m.params, m.config, n_rows=2, prefix_cache=True, **kw)
    off = Engine(m.forward_rows, m.params, m.config, n_rows=2, prefix_cache=False, **kw)
    return on, off


def prompt(rng, n):
    return rng.integers(0, 50257, n).tolist()


def test_prompts_sharing_all_part_or_none_of_a_prefix_get_what_they_get_uncached(m):
    rng = np.random.default_rng(0)
    shared = prompt(rng, 30)
    requests = [
        (shared + prompt(rng, 5), 6, None, False),
        (shared + prompt(rng, 3), 6, 7, False),  # part: the shared 30
        (shared, 6, None, False),  # all: the whole prompt is a cached prefix (its last token is fed again)
        (prompt(rng, 12), 6, 3, False),  # none
        (shared[:17] + prompt(rng, 4), 6, None, True),  # part, with prompt logprobs: computed whole
        (shared + prompt(rng, 5), 6, 11, False),
    ]
    on, off = engines(m)
    got, expected = run(on, m, requests), run(off, m, requests)
    for (t1, lp1), (t2, lp2) in zip(got, expected):
        assert t1 == t2
        assert lp1 is None or np.allclose(lp1, lp2, rtol=0, atol=1e-5)
    # found: 30 (the second), 29 (the third: its last token is fed), 0 (the fourth, into the empty row),
    # the fifth computes whole into the least recently freed row, evicting the shared prefix, and the
    # sixth finds the fifth's 17
    assert on.found == 30 + 29 + 17 and off.found == 0
    # together, in one batch, with the rows reused as they free
    assert run(engines(m)[0], m, requests, together=True) == run(engines(m)[1], m, requests, together=True)


def test_an_evicted_prefix_is_computed_again_and_the_rows_stay_within_the_budget(m):
    rng = np.random.default_rng(1)
    prefixes = [prompt(rng, 20) for _ in range(4)]
    requests = [(p + prompt(rng, 2), 4, None, False) for p in prefixes] + [(prefixes[0] + [5], 4, None, False)]
    on = Engine(m.forward_rows, m.params, m.config, n_rows=1, cache_rows=1)
    off = Engine(m.forward_rows, m.params, m.config, n_rows=1, prefix_cache=False)
    assert run(on, m, requests) == run(off, m, requests)
    assert len(on.cache[0][0]) == 2 and len(on.held) <= 2
    assert on.found == 0  # prefixes[0] was evicted by the three after it (least recently used first)
    again = [(prefixes[3] + [9], 4, None, False)]  # the most recent is still there
    assert run(on, m, again) == run(off, m, again) and on.found == 20  # all but the fed last token


def test_a_cancelled_prefill_leaves_what_it_computed_for_the_next(m):
    rng = np.random.default_rng(2)
    ids = prompt(rng, 24)
    on = Engine(m.forward_rows, m.params, m.config, n_rows=1, chunk=8)
    off = Engine(m.forward_rows, m.params, m.config, n_rows=1, chunk=8, prefix_cache=False)
    first = on.add(ids, 5, lambda logits: 0)
    on.step(), on.step()  # 16 of its tokens in the cache
    on.cancel(first)
    assert on.cached_tokens == 16
    assert run(on, m, [(ids, 5, None, False)]) == run(off, m, [(ids, 5, None, False)])
    assert on.found == 16


@pytest.mark.slow
def test_the_server_reuses_a_prefix_and_says_so():
    body = {"prompt": "The quick brown fox jumps over the lazy dog and then", "max_tokens": 8, "temperature": 0}
    texts = {}
    for flags in ((), ("--no-prefix-cache",)):
        process, url = start(*flags)
        try:
            answers = [httpx.post(f"{url}/v1/completions", json=body, timeout=60).json() for _ in range(2)]
            texts[flags] = [a["choices"][0]["text"] for a in answers]
            hits, queries = (
                metric(url, "picogpt_prefix_cache_hits_total"),
                metric(url, "picogpt_prefix_cache_queries_total"),
            )
        finally:
            code, err = stop(process)
        assert code == 0, err
        assert (hits > 0) == (not flags) and queries >= hits
    assert texts[()] == texts[("--no-prefix-cache",)] and len(set(texts[()])) == 1


def test_prompt_logprobs_come_from_the_cache_for_the_tokens_a_row_scored(m):
    """The evaluation case: a context scored once, then each choice after it: the context's logprobs
    are the row's, the choice's are computed, and together they equal a whole computation."""
    rng = np.random.default_rng(3)
    context = prompt(rng, 25)
    choices = [prompt(rng, n) for n in (3, 1, 6, 2)]

    def scored_run(engine):
        out = []
        for choice in choices:
            ids, got = context + choice, []

            def score(logits, targets, cached=None, got=got):
                entries = cached if cached is not None else [float(v) for v in scoring.log_softmax_at(logits, targets)]
                got.extend(entries)
                return entries

            engine.add(ids, 0, lambda logits: 0, score)
            while engine.busy:
                engine.step()
            out.append(got)
        return out

    on, off = engines(m)
    got, expected = scored_run(on), scored_run(off)
    for a, b in zip(got, expected):
        assert len(a) == len(b) and np.allclose(a, b, rtol=0, atol=1e-6)
    # each choice after the first reuses 24 of the context's 25 tokens and their scores: the logits after
    # the 25th are the ones before the choice's first token, computed for it
    assert on.found == 3 * 24
    assert off.found == 0


@pytest.mark.slow
def test_the_servers_echo_logprobs_are_the_same_from_the_cache():
    """lm-evaluation-harness's local-completions: each choice of a question its own request with
    echo, logprobs and max_tokens 0, the same context before each."""
    context = "Question: which module reads JSON files in Python? Answer:"
    answers = {}
    for flags in ((), ("--no-prefix-cache",)):
        process, url = start(*flags)
        try:
            answers[flags] = [
                httpx.post(
                    f"{url}/v1/completions",
                    json={"prompt": context + choice, "max_tokens": 0, "echo": True, "logprobs": k},
                    timeout=60,
                ).json()["choices"][0]["logprobs"]
                for choice, k in [(" json", 1), (" the os module", 5), (" pickle", 0), (" json", 2)]
            ]
            hits = metric(url, "picogpt_prefix_cache_hits_total")
        finally:
            code, err = stop(process)
        assert code == 0, err
        assert (hits > 0) == (not flags)
    for a, b in zip(answers[()], answers[("--no-prefix-cache",)]):
        assert a["tokens"] == b["tokens"] and a["text_offset"] == b["text_offset"]
        assert a["token_logprobs"][0] is None and b["token_logprobs"][0] is None
        assert np.allclose(a["token_logprobs"][1:], b["token_logprobs"][1:], rtol=0, atol=1e-5)
        for x, y in zip(a["top_logprobs"][1:], b["top_logprobs"][1:]):
            assert list(x) == list(y) and np.allclose(list(x.values()), list(y.values()), rtol=0, atol=1e-5)


# ---- Model's calls and score_many ---------------------------------------------------------------------


def test_a_models_calls_reuse_a_prefix_and_get_what_a_fresh_model_gets(tiny):
    m, fresh = picogpt.load(tiny[0]), lambda: picogpt.load(tiny[0])  # noqa: E731
    story = "Once upon a time there was a little girl who lived in a village near the forest."
    m.generate(story, max_new_tokens=4, temperature=0)
    found = m._front.engine.found
    for more, options in [(" One day", dict(temperature=0)), (" She", dict(seed=5)), ("", dict(seed=6))]:
        got = m.generate(story + more, max_new_tokens=12, **options)
        assert m._front.engine.found > found  # the story's tokens came from the cache
        found = m._front.engine.found
        assert got == fresh().generate(story + more, max_new_tokens=12, **options)
    batch = [story + " The end.", story + " Then"]  # a batch (on a front of 2 rows), then generate_many on it
    assert m.generate(batch, max_new_tokens=6, seed=2) == fresh().generate(batch, max_new_tokens=6, seed=2)
    found = m._front.engine.found
    assert [o["text"] for o in m.generate_many(batch, rows=2, max_new_tokens=6, seed=2)] == fresh().generate(
        batch, max_new_tokens=6, seed=2
    )
    assert m._front.engine.found > found


def test_a_stream_left_early_frees_its_row_and_steering_keeps_out_of_the_cache(tiny):
    m, fresh = picogpt.load(tiny[0]), picogpt.load(tiny[0])
    story = "Once upon a time there was a little girl"
    pieces = m.stream(story, max_new_tokens=40, temperature=0)
    next(pieces)
    pieces.close()  # the reader stops: the request is cancelled, the front is free
    assert not m._front.busy and not m._front.engine.busy
    vector = np.random.default_rng(0).standard_normal(m.config["n_embd"]).astype(np.float32)
    steered = m.generate(story, max_new_tokens=8, temperature=0, steer=picogpt.inside.Steer(vector, 0, 8.0))
    assert steered != fresh.generate(story, max_new_tokens=8, temperature=0)  # the steering does something
    assert m.generate(story, max_new_tokens=8, temperature=0) == fresh.generate(story, max_new_tokens=8, temperature=0)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_documents_with_a_shared_preamble_compute_it_once_and_score_as_alone(tiny, backend, monkeypatch):
    m = picogpt.load(tiny[0], backend=backend)
    rng = np.random.default_rng(4)
    preamble = prompt(rng, 40)
    n_ctx = m.config["n_positions"]
    docs = [preamble + prompt(rng, n) for n in (2, 3, 30, n_ctx, 2 * n_ctx)] + [preamble[:20] + prompt(rng, 9)]
    shared = []
    real = scoring.preamble
    monkeypatch.setattr(scoring, "preamble", lambda *a: shared.append(real(*a)) or shared[-1])
    forward_rows = m.forward_rows or rows_one_by_one(m.forward)
    for group, expected_p in ((docs[:5], 40), (docs, 20), (docs[1:2], 0)):
        got = list(scoring.logprobs_many(forward_rows, m.params, m.config, group, at=m.log_softmax_at))
        assert shared[-1][0] == expected_p
        for ids, lp in zip(group, got):
            np.testing.assert_allclose(lp[1:], m.logprobs(ids)[1:], atol=2e-5)
