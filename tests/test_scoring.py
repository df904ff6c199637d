"""Scoring (sliding-window log-probabilities, perplexity), the repetition penalty, generate --json,
and the stop on NaN logits: against transformers and the NumPy reference."""

import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import random_gpt2, save_checkpoint
from safetensors.numpy import load_file, save_file

import picogpt
from picogpt import scoring

PICOGPT = os.path.join(os.path.dirname(sys.executable), "picogpt")
TEXT = (
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs! "
    "How vexingly quick daft zebras jump; the five boxing wizards jump quickly. Sphinx of black quartz, judge my vow."
)  # 48 GPT-2 tokens: with a context of 20, longer than two contexts


def run(*args, stdin=None):
    return subprocess.run([PICOGPT, *args], capture_output=True, text=True, input=stdin, timeout=300)


@pytest.fixture(scope="module")
def short(tmp_path_factory):
    """(folder, torch model) with a context of 20 tokens, so TEXT needs several windows."""
    hf = random_gpt2(seed=3, n_positions=20)
    return save_checkpoint(hf, str(tmp_path_factory.mktemp("short"))), hf


def torch_window_logprobs(hf, ids, stride):
    """The Hugging Face perplexity guide's loop, per token: windows of n_positions tokens starting
    `stride` apart, each scoring the tokens past the previous window's end (the first token never)."""
    n_ctx, out, prev_end = hf.config.n_positions, np.full(len(ids), np.nan), 0
    for begin in range(0, len(ids), stride):
        end = min(begin + n_ctx, len(ids))
        with torch.no_grad():
            logp = torch.log_softmax(hf(torch.tensor([ids[begin:end]])).logits[0].double(), dim=-1).numpy()
        for t in range(max(prev_end, begin + 1), end):
            out[t] = logp[t - 1 - begin, ids[t]]
        prev_end = end
        if end == len(ids):
            break
    return out


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("stride", [None, 6, 19])
def test_scores_equal_transformers_with_the_same_windows(short, backend, stride):
    folder, hf = short
    model = picogpt.load(folder, backend=backend)
    ids = model.tokenizer.encode(TEXT)
    assert len(ids) > 2 * 20 and (len(ids) - 20) % (stride or 10)  # the last window is a partial one
    expected = torch_window_logprobs(hf, ids, stride or 10)
    got = model.logprobs(ids, stride=stride)
    assert np.isnan(got[0]) and np.isnan(expected[0]) and not np.isnan(got[1:]).any()
    np.testing.assert_allclose(got[1:], expected[1:], rtol=1e-4, atol=1e-5)
    score = model.score(TEXT, stride=stride)
    nll = -np.sum(expected[1:]) / (len(ids) - 1)
    assert score["tokens"] == len(ids) and score["scored_tokens"] == len(ids) - 1
    assert score["nll"] == pytest.approx(nll, rel=1e-4) and score["perplexity"] == pytest.approx(
        math.exp(nll), rel=1e-4
    )
    n_bytes = len(TEXT.encode()) - len(model.tokenizer.decode_single_token_bytes(ids[0]))
    assert score["bits_per_byte"] == pytest.approx(nll * (len(ids) - 1) / math.log(2) / n_bytes, rel=1e-4)


@pytest.mark.parametrize(
    "n_tokens,n_ctx,stride", [(2, 4, 1), (10, 4, 1), (67, 32, 16), (67, 32, 7), (100, 32, 31), (32, 32, 5)]
)
def test_windows_score_every_token_after_the_first_once(n_tokens, n_ctx, stride):
    scored = []
    for begin, first, end in scoring.windows(n_tokens, n_ctx, stride):
        assert begin < first < end <= begin + n_ctx  # context before the first scored token, within the context
        scored += range(first, end)
    assert scored == list(range(1, n_tokens))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_scoring_packed_weights_matches_the_numpy_reference(short, dtype):
    kernels = picogpt.load(short[0], dtype=dtype)
    reference = picogpt.load(short[0], dtype=dtype, backend="numpy")
    ids = kernels.tokenizer.encode(TEXT)
    np.testing.assert_allclose(
        kernels.logprobs(ids, stride=9)[1:], reference.logprobs(ids, stride=9)[1:], rtol=1e-4, atol=1e-5
    )


def test_bad_strides_and_short_texts_are_refused(short):
    model = picogpt.load(short[0])
    for stride in (0, 20, 1.5):
        with pytest.raises(ValueError, match="stride"):
            model.logprobs(list(range(40)), stride=stride)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        model.score("a")


def test_repetition_penalty_gives_transformers_greedy_tokens(tiny):
    folder, hf = tiny
    model = picogpt.load(folder)
    prompt = "the the the cat sat on the mat and the"
    ids = model.tokenizer.encode(prompt)
    changed = []
    for penalty in (1.3, 0.8, 20.0):
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([ids]), max_new_tokens=32, do_sample=False, repetition_penalty=penalty, pad_token_id=0
            )
        [got] = model.complete([prompt], max_new_tokens=32, temperature=0, repetition_penalty=penalty)
        assert got["token_ids"] == out[0, len(ids) :].tolist() and got["finish_reason"] == "length"  # all 32 tokens
        changed.append(got["token_ids"] != model.complete([prompt], max_new_tokens=32, temperature=0)[0]["token_ids"])
    assert changed[-1]  # a strong penalty changed the text


def test_repetition_penalty_is_checked(tiny):
    model = picogpt.load(tiny[0])
    for bad in (0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="repetition_penalty"):
            model.generate("hi", repetition_penalty=bad)
    assert "repetition" in run("generate", "hi", "--model", tiny[0], "--repetition-penalty", "0").stderr


def test_generate_json_parses_and_its_ids_decode_to_its_text(tiny):
    folder, _ = tiny
    model = picogpt.load(folder)
    r = run(
        "generate",
        "Once upon a time",
        "--model",
        folder,
        "-n",
        "12",
        "--seed",
        "4",
        "--num-samples",
        "3",
        "--json",
        "--logprobs",
    )
    assert r.returncode == 0, r.stderr
    samples = [json.loads(line) for line in r.stdout.splitlines()]
    assert [s["sample"] for s in samples] == [0, 1, 2] and [s["seed"] for s in samples] == [4, 5, 6]
    prompt_ids = model.tokenizer.encode("Once upon a time")
    for s in samples:
        assert s["finish_reason"] in ("length", "eos") and s["prompt_tokens"] == len(prompt_ids)
        assert model.tokenizer.decode(s["token_ids"]) == s["text"]
        assert s["generated_tokens"] == len(s["token_ids"]) + (s["finish_reason"] == "eos")
        assert s["text"] == model.generate("Once upon a time", max_new_tokens=12, seed=s["seed"])
        # each chosen token's log-probability, as a full forward pass over prompt + new tokens gives it
        full = model.logprobs(prompt_ids + s["token_ids"])[len(prompt_ids) :]
        np.testing.assert_allclose(s["logprobs"], full, rtol=1e-4, atol=1e-5)
        assert s["timings"]["decode_seconds"] >= 0


def test_generate_json_finish_reasons(tiny):
    folder, _ = tiny
    model = picogpt.load(folder)
    greedy = model.generate("Once upon a time", max_new_tokens=12, temperature=0)
    stop = greedy[len(greedy) // 2 :][:3]
    [s] = [
        json.loads(r)
        for r in run(
            "generate", "Once upon a time", "--model", folder, "-n", "12", "-t", "0", "--stop", stop, "--json"
        ).stdout.splitlines()
    ]
    assert s["finish_reason"] == "stop" and s["text"] == greedy[: greedy.index(stop)] and "logprobs" not in s
    assert model.tokenizer.decode(s["token_ids"]).startswith(s["text"] + stop)
    [s] = [
        json.loads(r)
        for r in run(
            "generate", "Once upon a time", "--model", folder, "-n", "5", "-t", "0", "--json"
        ).stdout.splitlines()
    ]
    assert s["finish_reason"] == "length" and s["generated_tokens"] == 5
    assert [s["text"]] == [c["text"] for c in model.complete("Once upon a time", max_new_tokens=5, temperature=0)]
    # a row ends at <|endoftext|>: make it the likeliest third token
    eot, base, calls = model.tokenizer.eot_token, model.forward_rows, []

    def forward_rows(inputs, **kwargs):
        logits = base(inputs, **kwargs).copy()
        calls.append(len(inputs))
        logits[:, eot] += 1e4 if len(calls) == 3 else 0
        return logits

    model.forward_rows = forward_rows
    [out] = model.complete(["Once upon a time"], max_new_tokens=10, temperature=0)
    assert out["finish_reason"] == "eos" and out["generated_tokens"] == 3 and len(out["token_ids"]) == 2
    assert model.tokenizer.decode(out["token_ids"]) == out["text"]


@pytest.fixture(scope="module")
def with_nan(tiny, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("nan"))
    save_checkpoint(tiny[1], folder)
    tensors = load_file(os.path.join(folder, "model.safetensors"))
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = np.nan
    save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    return folder


def test_nan_weights_stop_generation_and_scoring_with_one_line(with_nan):
    for args in (
        ["generate", "Hello", "-n", "5", "-t", "0"],
        ["generate", "Hello", "--num-samples", "2"],
        ["score", "-"],
    ):
        r = run(*args, "--model", with_nan, stdin="some text to score here")
        assert r.returncode == 1 and "Traceback" not in r.stderr
        assert (
            r.stderr.strip().splitlines() == [r.stderr.strip()]
            and f"picogpt info --check --model {with_nan}" in r.stderr
            and "NaN" in r.stderr
        )
    assert "choosing new token 1" in run("generate", "Hello", "--model", with_nan).stderr
    assert "at token 1:" in run("score", "-", "--model", with_nan, stdin="some text to score").stderr


def test_info_check_names_the_bad_tensor(with_nan, tiny):
    r = run("info", "--model", with_nan, "--check")
    assert r.returncode == 1 and "transformer.h.1.mlp.c_fc.weight: 1 NaN or infinite" in r.stdout
    assert (
        r.stderr.strip().startswith("picogpt: error: 1 tensor holds NaN")
        and "transformer.h.1.mlp.c_fc.weight" in r.stderr
    )
    good = run("info", "--model", tiny[0], "--check", "--json")
    assert good.returncode == 0 and json.loads(good.stdout)["non_finite"] == {}


def test_the_finite_check_catches_nan_and_both_infinities():
    logits = np.zeros(50257, np.float32)
    scoring.check_finite(logits, "x")
    for bad in (np.nan, np.inf, -np.inf):
        logits[123] = bad
        with pytest.raises(picogpt.sampling.NonFiniteError, match="at x"):
            scoring.check_finite(logits, "x")


def test_score_command(short):
    folder, _ = short
    model = picogpt.load(folder)
    expected = model.score(TEXT, stride=7)
    r = run("score", "-", "--model", folder, "--stride", "7", stdin=TEXT)
    assert r.returncode == 0, r.stderr
    assert (
        f"{expected['perplexity']:.3f}" in r.stdout
        and f"{expected['tokens']} ({expected['scored_tokens']} scored" in r.stdout
    )
    j = json.loads(
        run("score", "-", "--model", folder, "--stride", "7", "--json", "--dtype", "int8", stdin=TEXT).stdout
    )
    assert [t["id"] for t in j["token_logprobs"]] == expected["ids"] and j["token_logprobs"][0]["logprob"] is None
    assert "".join(t["text"] for t in j["token_logprobs"]) == TEXT and j["dtype"] == "int8"
    assert j["nll"] == pytest.approx(-np.mean([t["logprob"] for t in j["token_logprobs"][1:]]), rel=1e-9)
    assert j["nll"] == pytest.approx(expected["nll"], rel=2e-2)  # int8 against float32


@pytest.mark.parametrize(
    "args,stdin,words",
    [
        (["--stride", "0"], TEXT, ["--stride"]),
        (["--stride", "20"], TEXT, ["--stride", "20"]),
        ([], "a", ["at least 2"]),
    ],
)
def test_score_mistakes_are_one_line(short, args, stdin, words):
    r = run("score", "-", "--model", short[0], *args, stdin=stdin)
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert all(w in r.stderr for w in words)


def test_score_refuses_a_file_that_is_not_utf8(short, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait".encode("latin-1"))
    r = run("score", str(tmp_path / "latin1.txt"), "--model", short[0])
    assert r.returncode == 1 and "not UTF-8" in r.stderr and "Traceback" not in r.stderr
    r = run("score", str(tmp_path / "missing.txt"), "--model", short[0])
    assert r.returncode == 1 and "missing.txt" in r.stderr and "Traceback" not in r.stderr
