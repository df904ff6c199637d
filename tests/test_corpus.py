"""Corpora: Model.score_many and generate_many against one document at a time, and `score --jsonl` /
`generate --jsonl` end to end (bad lines, short documents, resuming, buckets, mistakes)."""

import gzip
import json
import os
import random
import signal
import subprocess
import time

import numpy as np
import pytest
from conftest import random_gpt2, save_checkpoint
from helpers import PICOGPT, assert_one_line_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import picogpt
from picogpt import corpus, scoring
from picogpt.engine import rows_one_by_one

WORDS = [
    "the",
    "list",
    "of",
    "things",
    "we",
    "have",
    "is",
    "long",
    "and",
    "a",
    "cat",
    "sat",
    "on",
    "the",
    "mat",
    ",",
    "with",
    "café",
    "🙂",
    "code",
]


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """A random GPT-2 with a context of 20 tokens, so that documents need several windows."""
    return save_checkpoint(random_gpt2(seed=3, n_positions=20), str(tmp_path_factory.mktemp("short")))


@pytest.fixture(scope="module")
def model(short):
    return picogpt.load(short)


def texts(rng, n, longest=70):
    """Documents of mixed lengths: empty, one word, up to several contexts."""
    return [" ".join(rng.choice(WORDS) for _ in range(rng.choice([0, 1, 2, rng.randrange(longest)]))) for _ in range(n)]


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("stride", [None, 7, 19])
@pytest.mark.parametrize("budget", [20, 45, None])
def test_logprobs_many_equal_one_document_at_a_time(short, backend, stride, budget):
    model = picogpt.load(short, backend=backend)
    rng = np.random.default_rng(stride or 0)
    docs = [rng.integers(0, 50257, n).tolist() for n in (0, 1, 2, 3, 19, 20, 21, 40, 61, 5, 2, 133)]
    forward_rows = model.forward_rows or rows_one_by_one(model.forward)
    many = list(
        scoring.logprobs_many(
            forward_rows, model.params, model.config, docs, stride, budget, group=50, at=model.log_softmax_at
        )
    )
    assert len(many) == len(docs)
    for ids, got in zip(docs, many):
        assert len(got) == len(ids)
        if len(ids) < 2:
            assert np.isnan(got).all()
            continue
        expected = model.logprobs(ids, stride)
        assert np.isnan(got[0]) and not np.isnan(got[1:]).any()
        np.testing.assert_allclose(got[1:], expected[1:], atol=2e-5)


def test_score_many_equals_score(model):
    batch = texts(random.Random(1), 60)
    got = list(model.score_many(batch, stride=9))
    assert len(got) == len(batch)
    for text, g in zip(batch, got):
        if g["scored_tokens"] == 0:
            assert g["tokens"] < 2 and g["nll"] is None and g["perplexity"] is None and "at least 2" in g["reason"]
            continue
        e = model.score(text, stride=9)
        assert {k: g[k] for k in ("tokens", "scored_tokens", "bytes")} == {
            k: e[k] for k in ("tokens", "scored_tokens", "bytes")
        }
        for k in ("nll", "perplexity", "bits_per_byte"):
            assert g[k] == pytest.approx(e[k], rel=1e-5)


def test_score_many_skip_gives_exactly_the_figures_of_a_whole_run(model):
    """Resuming: groups form from the first document on, so the figures after `skip` are bit for bit
    those of a run over everything, whichever pass each document shared."""
    batch = texts(random.Random(2), 80)
    whole = list(model.score_many(batch, budget=20))  # passes of 20 tokens, groups of 160: many of each
    for skip in (1, 7, 33, 79, 80):
        assert list(model.score_many(batch, budget=20, skip=skip)) == whole[skip:]


def test_score_many_is_lazy_and_takes_any_iterable(model):
    fed = []

    def endless():
        for i in range(10**9):
            fed.append(i)
            yield "the cat sat on the mat" * (1 + i % 3)

    first = next(model.score_many(endless()))
    assert first["scored_tokens"] > 0 and len(fed) < 5000  # a bounded group, not the whole stream
    with pytest.raises(ValueError, match="text 1 must be a string"):
        list(model.score_many(["ok text", 3]))


@pytest.mark.parametrize("rows", [1, 3, 8])
def test_generate_many_equals_generate_with_seed_plus_i(model, rows):
    prompts = ["The list", "", "a cat", "café 🙂", "The list"] * 2
    options = dict(max_new_tokens=12, seed=11, stop=[" mat"], temperature=0.8)
    got = list(model.generate_many(prompts, rows=rows, **options))
    assert [g["seed"] for g in got] == [11 + i for i in range(len(prompts))]
    for i, (p, g) in enumerate(zip(prompts, got)):
        e = model.complete([p], **{**options, "seed": 11 + i})[0]
        assert (g["text"], g["finish_reason"], g["generated_tokens"], g["prompt_tokens"]) == (
            e["text"],
            e["finish_reason"],
            e["generated_tokens"],
            e["prompt_tokens"],
        )
    later = list(model.generate_many(prompts[4:], rows=rows, start=4, **options))  # a resumed run
    assert later == got[4:]
    assert list(model.generate_many(["a", None, "b"], max_new_tokens=2, seed=0))[1] is None


# ---- the command line ---------------------------------------------------------------------------------


def write_corpus(path, batch, bad=(), field="text", ids=True):
    """JSONL of `batch`; the line numbers in `bad` (from 1) hold a broken line instead."""
    broken = ["not json", '{"id": "x", "other": 1}', "[1, 2]", '{"text": 5}', "", '{"text": "a"']
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as f:
        for i, text in enumerate(batch, 1):
            if i in bad:
                f.write(broken[i % len(broken)] + "\n")
            else:
                f.write(json.dumps({**({"id": f"doc{i}"} if ids else {}), field: text}) + "\n")
    return str(path)


def read_lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.mark.parametrize("gz", [False, True])
def test_score_jsonl_equals_score_per_document(short, model, tmp_path, gz):
    batch = texts(random.Random(3), 40)
    bad = {4, 17, 18, 40}
    source = write_corpus(tmp_path / ("in.jsonl.gz" if gz else "in.jsonl"), batch, bad)
    r = run("score", "--jsonl", source, "--model", short, "-o", str(tmp_path / "out.jsonl"), "--stride", "9")
    assert r.returncode == 0, r.stderr
    out = read_lines(tmp_path / "out.jsonl")
    assert len(out) == len(batch)
    short_docs = 0
    for i, (text, o) in enumerate(zip(batch, out), 1):
        if i in bad:
            assert o["error"].startswith(f"line {i}: ") and set(o) == {"id", "error"}
            continue
        assert o["id"] == f"doc{i}"
        e = model.score(text, stride=9) if len(model.tokenizer.encode(text)) >= 2 else None
        if e is None:
            assert o["nll"] is None and o["reason"]
            short_docs += 1
            continue
        assert o["tokens"] == e["tokens"] and o["bytes"] == e["bytes"]
        assert o["nll"] == pytest.approx(e["nll"], rel=1e-5)
    line = r.stderr.strip().splitlines()[-1]
    assert f"scored {len(batch) - len(bad) - short_docs} documents" in line
    assert f"{short_docs} too short, {len(bad)} bad lines" in line


def test_score_jsonl_from_stdin_to_stdout_with_line_numbers_as_ids(short, tmp_path):
    batch = texts(random.Random(4), 6)
    source = write_corpus(tmp_path / "in.jsonl", batch, ids=False)
    with open(source) as f:
        r = subprocess.run(
            [PICOGPT, "score", "--jsonl", "-", "--model", short], stdin=f, capture_output=True, text=True, timeout=300
        )
    assert r.returncode == 0, r.stderr
    assert [json.loads(line)["id"] for line in r.stdout.splitlines()] == list(range(1, len(batch) + 1))
    two = run("score", "--jsonl", source, source, "--model", short)  # more than one file: file:line
    assert [json.loads(line)["id"] for line in two.stdout.splitlines()][-1] == f"{source}:{len(batch)}"


def test_a_run_cut_anywhere_and_resumed_gives_the_same_file(short, tmp_path):
    batch = texts(random.Random(5), 30)
    source = write_corpus(tmp_path / "in.jsonl", batch, bad={9})
    whole = tmp_path / "whole.jsonl"
    assert run("score", "--jsonl", source, "--model", short, "-o", str(whole)).returncode == 0
    data = whole.read_bytes()
    for cut in (0, 1, data.index(b"\n") + 1, len(data) // 2, len(data) - 3):  # mid-line cuts too
        part = tmp_path / f"part{cut}.jsonl"
        part.write_bytes(data[:cut])
        r = run("score", "--jsonl", source, "--model", short, "-o", str(part))
        assert r.returncode == 0 and part.read_bytes() == data, (cut, r.stderr)
    # really killed at a random moment, then resumed
    killed = tmp_path / "killed.jsonl"
    process = subprocess.Popen([PICOGPT, "score", "--jsonl", source, "--model", short, "-o", str(killed)])
    time.sleep(random.Random(6).uniform(0.5, 3.0))
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=60)
    assert run("score", "--jsonl", source, "--model", short, "-o", str(killed)).returncode == 0
    assert killed.read_bytes() == data
    # a finished file is left as it is
    assert run("score", "--jsonl", source, "--model", short, "-o", str(killed)).returncode == 0
    assert killed.read_bytes() == data


def test_an_output_of_another_input_is_refused(short, tmp_path):
    a = write_corpus(tmp_path / "a.jsonl", ["one two three", "four five six"])
    b = write_corpus(tmp_path / "b.jsonl", ["one two three", "four five six"], ids=False)
    out = str(tmp_path / "out.jsonl")
    assert run("score", "--jsonl", a, "--model", short, "-o", out).returncode == 0
    r = run("score", "--jsonl", b, "--model", short, "-o", out)
    assert_one_line_error(r, "does not continue this input", "-o")
    assert r.returncode == 1
    with open(tmp_path / "junk.jsonl", "w") as f:
        f.write("hello\n")
    assert_one_line_error(run("score", "--jsonl", a, "--model", short, "-o", str(tmp_path / "junk.jsonl")), "-o")


def test_buckets_are_the_terciles_of_the_run(short, tmp_path):
    batch = [t for t in texts(random.Random(7), 40) if len(t.split()) > 3]
    source = write_corpus(tmp_path / "in.jsonl", batch)
    out = tmp_path / "out.jsonl"
    r = run("score", "--jsonl", source, "--model", short, "-o", str(out), "--buckets")
    assert r.returncode == 0, r.stderr
    lines = read_lines(out)
    low, high = (
        float(x) for x in r.stderr.split("head <= ")[1].replace(" < middle <= ", " ").split(" < tail")[0].split()
    )
    for o in lines:
        assert o["bucket"] == (
            "head" if o["perplexity"] <= low + 1e-3 else "middle" if o["perplexity"] <= high + 1e-3 else "tail"
        ) or (abs(o["perplexity"] - low) < 1e-3 or abs(o["perplexity"] - high) < 1e-3)
    counts = {b: sum(o["bucket"] == b for o in lines) for b in ("head", "middle", "tail")}
    assert all(abs(n - len(lines) / 3) <= 1 for n in counts.values()), counts


def test_generate_jsonl_equals_generate_with_seed_plus_line(short, model, tmp_path):
    prompts = ["The list", "", "a cat", "café", "the mat", "on"]
    source = write_corpus(tmp_path / "p.jsonl", prompts, bad={3}, field="prompt")
    out = tmp_path / "out.jsonl"
    args = ["generate", "--jsonl", source, "--model", short, "-n", "9", "--seed", "40", "-o", str(out), "--rows", "2"]
    r = run(*args)
    assert r.returncode == 0, r.stderr
    lines = read_lines(out)
    for i, (p, o) in enumerate(zip(prompts, lines)):
        if i + 1 == 3:
            assert o["error"].startswith("line 3: ")
            continue
        assert o["seed"] == 40 + i and o["text"] == model.generate(p, max_new_tokens=9, seed=40 + i)
    data = out.read_bytes()
    out.write_bytes(data[: data.index(b"\n", len(data) // 2) + 5])  # cut mid-line, then resumed
    assert run(*args).returncode == 0 and out.read_bytes() == data


@pytest.mark.parametrize(
    "args,words",
    [
        (["score", "--model", "tiny"], ["FILE", "--jsonl"]),
        (["score", "x.txt", "--jsonl", "a.jsonl", "--model", "tiny"], ["both"]),
        (["score", "x.txt", "-o", "o.jsonl"], ["--output", "--jsonl"]),
        (["score", "--jsonl", "a.jsonl", "--buckets"], ["--buckets", "-o"]),
        (["score", "--jsonl", "a.jsonl", "-o", "a.jsonl"], ["-o a.jsonl", "input"]),
        (["score", "--jsonl", "-", "--ray"], ["--ray", "standard input"]),
        (["score", "--jsonl", "a.jsonl", "--json"], ["--json"]),
        (["generate", "--jsonl", "a.jsonl", "--num-samples", "2"], ["--num-samples"]),
        (["generate", "--jsonl", "a.jsonl", "--rows", "0"], ["--rows"]),
        (["generate", "hello", "--rows", "3", "--ray"], ["--ray", "--jsonl"]),
    ],
)
def test_corpus_mistakes_exit_2_with_one_line(args, words):
    r = run(*args)
    assert_one_line_error(r, *words)
    assert r.returncode == 2


def test_a_missing_input_is_one_line(short, tmp_path):
    r = run("score", "--jsonl", str(tmp_path / "nope.jsonl"), "--model", short)
    assert_one_line_error(r, "nope.jsonl")
    assert r.returncode == 1


# ---- hostile input: any bytes on any line ---------------------------------------------------------------

line = st.one_of(
    st.binary(max_size=40).filter(lambda b: b"\n" not in b),
    st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: (
            st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from(["text", "id", "x"]), inner, max_size=3)
        ),
        max_leaves=6,
    ).map(lambda v: json.dumps(v).encode()),
    st.text(max_size=60).map(lambda t: json.dumps({"text": t}).encode()),
)


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(line, min_size=1, max_size=8))
def test_any_lines_get_one_answer_each_in_order(model, tmp_path_factory, lines):
    folder = tmp_path_factory.mktemp("hostile")
    source = folder / "in.jsonl"
    source.write_bytes(b"\n".join(lines) + b"\n")
    job = corpus.Job([str(source)], str(folder / "out.jsonl"))
    counts = corpus.score(model, job)
    out = read_lines(folder / "out.jsonl")
    assert len(out) == len(lines) == sum(counts.get(k, 0) for k in ("done", "short", "bad"))
    for number, (raw, o) in enumerate(zip(lines, out), 1):
        try:
            obj = json.loads(raw)
        except ValueError:
            obj = None
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            e = (
                model.score(obj["text"])
                if len(model.tokenizer.encode(obj["text"], allowed_special="all")) >= 2
                else None
            )
            assert o["id"] == obj.get("id", number) and (
                o["nll"] == pytest.approx(e["nll"], rel=1e-5) if e else o["reason"]
            )
        else:
            assert o["error"].startswith(f"line {number}: ")
    os.remove(folder / "out.jsonl")
