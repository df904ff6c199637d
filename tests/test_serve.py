"""`picogpt serve` over real HTTP: the shipped tiny model on 127.0.0.1 and a free port, reached with the
official `openai` client wherever it can speak, plain HTTP (httpx) where it cannot. The oracle is the
same model loaded in this process (Model.generate, Model.logprobs) and the server's own answers to
each request sent alone. Every request loop is bounded in count and in time."""

import json
import signal
import socket
import subprocess
import threading
import time

import httpx
import numpy as np
import openai
import pytest
from helpers import PICOGPT, assert_one_line_error, expect_error, metric, start, stop

import picogpt

pytestmark = pytest.mark.slow

PROMPTS = [
    "The list",
    "def main():",
    "import numpy as",
    "Returns the",
    "A function that",
    "x = ",
    "# Read the file",
    "class",
]


@pytest.fixture(scope="module")
def server():
    process, url = start("--parallel", "16", "--queue", "400", "--chunk", "16")
    yield url
    code, err = stop(process)
    assert code == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server}/v1", api_key="none", timeout=60, max_retries=0)


@pytest.fixture(scope="module")
def model():
    return picogpt.load("tiny")


# ---- the API -------------------------------------------------------------------------------------------


def test_greedy_equals_model_generate_and_the_cli(client, model):
    for prompt in PROMPTS[:3]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=24, temperature=0)
        assert r.object == "text_completion" and r.model == "tiny" and r.choices[0].index == 0
        assert r.choices[0].text == model.generate(prompt, max_new_tokens=24, temperature=0)
        assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    cli = subprocess.run(
        [PICOGPT, "generate", PROMPTS[0], "--model", "tiny", "-t", "0", "-n", "24"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    first = client.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=24, temperature=0)
    assert cli.returncode == 0 and cli.stdout == first.choices[0].text + "\n"  # the CLI ends the text with a newline


def test_stream_equals_non_stream_with_usage(client):
    for prompt in PROMPTS[:4]:
        whole = client.completions.create(model="tiny", prompt=prompt, max_tokens=40, temperature=0)
        chunks = list(
            client.completions.create(
                model="tiny",
                prompt=prompt,
                max_tokens=40,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        assert text == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_n_choices_with_a_seed_differ_and_repeat(client, model):
    ask = lambda: client.completions.create(model="tiny", prompt="The list", max_tokens=20, n=3, seed=7, temperature=1)  # noqa: E731
    first, again = ask(), ask()
    texts = [c.text for c in sorted(first.choices, key=lambda c: c.index)]
    assert [c.index for c in first.choices] == [0, 1, 2] and len(set(texts)) == 3
    assert texts == [c.text for c in sorted(again.choices, key=lambda c: c.index)]
    # choice i samples with seed + i: the same text as the model's own sampler gives with that seed
    for i, text in enumerate(texts):
        assert text == model.generate("The list", max_new_tokens=20, seed=7 + i, top_k=None, temperature=1.0)


def test_prompt_forms_and_choice_indexes(client, model):
    ids = model.tokenizer.encode("The list")
    for prompt in ["The list", ["The list", "class"], ids, [ids, model.tokenizer.encode("class")]]:
        r = client.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=0, n=2)
        n_prompts = 2 if isinstance(prompt[0], (str, list)) and not isinstance(prompt, str) else 1
        assert sorted(c.index for c in r.choices) == list(range(2 * n_prompts))
        assert r.choices[0].text == model.generate("The list", max_new_tokens=6, temperature=0)
        if n_prompts == 2:
            assert r.choices[2].text == model.generate("class", max_new_tokens=6, temperature=0)


def test_stop_strings(client, model):
    full = model.generate("The list", max_new_tokens=30, temperature=0)
    stop = full[10:14]  # a piece the greedy text holds
    r = client.completions.create(model="tiny", prompt="The list", max_tokens=30, temperature=0, stop=[stop, "zzzz"])
    assert r.choices[0].text == full[: full.index(stop)] and r.choices[0].finish_reason == "stop"
    streamed = "".join(
        c.choices[0].text
        for c in client.completions.create(
            model="tiny", prompt="The list", max_tokens=30, temperature=0, stop=stop, stream=True
        )
    )
    assert streamed == r.choices[0].text


def test_echo_logprobs_score_the_prompt_as_model_logprobs(client, model):
    text = "The list of files in the folder is read once, and each one is opened in turn."
    ids = model.tokenizer.encode(text)
    want = model.logprobs(ids)
    r = client.completions.create(model="tiny", prompt=text, max_tokens=0, echo=True, logprobs=3)
    lp = r.choices[0].logprobs
    assert r.choices[0].text == text and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert np.abs(np.array(lp.token_logprobs[1:]) - want[1:]).max() < 1e-4
    assert lp.tokens == [model.tokenizer.decode([t]) for t in ids]
    assert lp.text_offset == [len(model.tokenizer.decode(ids[:i])) for i in range(len(ids))]
    for position, top in enumerate(lp.top_logprobs[1:], 1):  # the 3 most likely, and the token itself
        assert 3 <= len(top) <= 4 and top[lp.tokens[position]] == lp.token_logprobs[position]
        assert max(top.values()) >= lp.token_logprobs[position]


def test_generated_logprobs_equal_the_models(client, model):
    r = client.completions.create(model="tiny", prompt="The list", max_tokens=12, temperature=0, logprobs=2)
    [want] = model.complete(["The list"], max_new_tokens=12, temperature=0, logprobs=True)
    lp = r.choices[0].logprobs
    assert "".join(lp.tokens) == r.choices[0].text == want["text"]
    assert np.abs(np.array(lp.token_logprobs) - np.array(want["logprobs"])).max() < 1e-4
    assert all(max(top.values()) == top[t] for top, t in zip(lp.top_logprobs, lp.tokens))  # greedy: the best one
    stream = [
        c
        for c in client.completions.create(
            model="tiny", prompt="The list", max_tokens=12, temperature=0, logprobs=2, stream=True
        )
    ]
    assert sum((c.choices[0].logprobs.token_logprobs for c in stream if c.choices[0].logprobs), []) == lp.token_logprobs


def test_penalties_and_logit_bias_follow_openai(client, model):
    banned = model.tokenizer.encode(" the")[0]
    plain = client.completions.create(model="tiny", prompt="The list", max_tokens=20, temperature=0)
    assert " the" in plain.choices[0].text
    r = client.completions.create(
        model="tiny", prompt="The list", max_tokens=20, temperature=0, logit_bias={str(banned): -100}
    )
    assert banned not in model.tokenizer.encode(r.choices[0].text) and r.choices[0].text != plain.choices[0].text
    repeats = lambda text: len(model.tokenizer.encode(text)) - len(set(model.tokenizer.encode(text)))  # noqa: E731
    r = client.completions.create(model="tiny", prompt="The list", max_tokens=20, temperature=0, frequency_penalty=2.0)
    assert repeats(r.choices[0].text) < repeats(plain.choices[0].text)
    r = client.completions.create(
        model="tiny",
        prompt="The list",
        max_tokens=20,
        temperature=0,
        extra_body={"repetition_penalty": 1.5, "top_k": 5},
    )
    assert r.choices[0].text == model.generate("The list", max_new_tokens=20, temperature=0, repetition_penalty=1.5)


def test_models_tokenize_detokenize_health(server, model):
    models = httpx.get(f"{server}/v1/models", timeout=10).json()
    assert [m["id"] for m in models["data"]] == ["tiny"] and models["object"] == "list"
    ids = httpx.post(f"{server}/tokenize", json={"prompt": "The list of files"}, timeout=10).json()["tokens"]
    assert ids == model.tokenizer.encode("The list of files")
    assert httpx.post(f"{server}/detokenize", json={"tokens": ids}, timeout=10).json()["prompt"] == "The list of files"
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200


def test_the_context_end_is_length(client, model):
    ids = [5] * (model.config["n_positions"] - 3)
    r = client.completions.create(
        model="tiny", prompt=ids, max_tokens=50, temperature=0, logit_bias={str(model.tokenizer.eot_token): -100}
    )
    assert (
        r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    )  # positions n_ctx - 3 .. n_ctx, and the pick after the last


# ---- errors ----------------------------------------------------------------------------------------------


def test_bad_requests_get_openai_errors_and_the_server_goes_on(server, client):
    post = lambda body, path="/v1/completions", **kw: httpx.post(f"{server}{path}", json=body, timeout=30, **kw)  # noqa: E731
    expect_error(httpx.post(f"{server}/v1/completions", content=b"{not json", timeout=10), 400)
    for field, value in [
        ("temperature", 3),
        ("temperature", "hot"),
        ("top_p", 0),
        ("n", 0),
        ("max_tokens", -1),
        ("logprobs", 6),
        ("stop", ["a", "b", "c", "d", "e"]),
        ("seed", 1.5),
        ("presence_penalty", 3),
        ("logit_bias", {"x": 1}),
        ("logit_bias", {"5": 200}),
        ("echo", "yes"),
        ("top_k", 0),
        ("stream", 1),
    ]:
        expect_error(post({"prompt": "hi", field: value}), 400, field)
    for prompt in [None, [], [[]], [-1], [[1, 2], "x"], [10**9]]:
        expect_error(post({"prompt": prompt}), 400, "prompt")
    expect_error(post({"prompt": "hi", "max_tokens": 0}), 400, "max_tokens")
    expect_error(post({"prompt": [5] * 300}), 400, "prompt")  # longer than the context of 256
    assert expect_error(post({"prompt": "hi", "model": "gpt-4"}), 404, "model")["code"] == "model_not_found"
    expect_error(httpx.get(f"{server}/v2/nothing", timeout=10), 404)
    expect_error(httpx.get(f"{server}/v1/completions", timeout=10), 405)
    expect_error(post({"messages": [{"role": "user", "content": "hi"}]}, "/v1/chat/completions"), 400)
    expect_error(post({"prompt": "x" * (2 << 20)}), 413)
    expect_error(post(None, "/tokenize"), 400)
    expect_error(post({"tokens": [-3]}, "/detokenize"), 400, "tokens")
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt="hi", temperature=9)
    assert httpx.get(f"{server}/health", timeout=10).status_code == 200
    assert (
        client.completions.create(model="tiny", prompt="hi", max_tokens=3, temperature=0).usage.completion_tokens >= 1
    )


def test_a_request_without_a_seed_samples_with_a_drawn_one(model, monkeypatch):
    """No seed: the server draws one (secrets.randbits) and samples choice i with it + i, as with a
    given seed; the response keeps OpenAI's shape, with no field for it."""
    from starlette.testclient import TestClient

    from picogpt.serve import http as server
    from picogpt.serve import protocol

    drawn = []
    monkeypatch.setattr(protocol.secrets, "randbits", lambda bits: drawn.append(bits) or 1234)
    web = server.app("tiny")
    with TestClient(web) as http:
        worker = server.ready(web, model, parallel=4, queue_size=4, chunk=16)
        body = {"prompt": "The list", "max_tokens": 12, "n": 2, "temperature": 1, "top_k": None}
        r = http.post("/v1/completions", json=body)
        assert r.status_code == 200 and "seed" not in r.json() and drawn == [32]
        texts = [c["text"] for c in sorted(r.json()["choices"], key=lambda c: c["index"])]
        assert texts == [c["text"] for c in http.post("/v1/completions", json=body | {"seed": 1234}).json()["choices"]]
        assert drawn == [32]  # a given seed is used as it is
        worker.stop()
    for i, text in enumerate(texts):
        assert text == model.generate("The list", max_new_tokens=12, seed=1234 + i, top_k=None, temperature=1.0)


def test_a_full_queue_answers_429_and_loading_503(model):
    """In the app itself (no port): a step that waits on a gate holds the one row while a second
    request comes, so the queue is full however fast the machine is; and before the engine starts,
    the app answers 503."""
    from starlette.testclient import TestClient

    from picogpt.serve import http as server

    gate = threading.Event()

    def gated(*args, **kwargs):
        gate.wait(60)
        return model.forward_rows(*args, **kwargs)

    slow = picogpt.Model(model.params, model.config, model.tokenizer, model.forward, model.folder, gated, "tiny")
    web = server.app("tiny")
    with TestClient(web) as http:
        expect_error(http.post("/v1/completions", json={"prompt": "hi"}), 503)  # loading
        assert http.get("/health").status_code == 503
        worker = server.ready(web, slow, parallel=1, queue_size=0, chunk=16)
        first = {}
        no_end = {"prompt": "The", "max_tokens": 3, "logit_bias": {str(model.tokenizer.eot_token): -100}}
        busy = threading.Thread(  # sampled, so the end of text is barred: all 3 tokens come
            target=lambda: first.update(r=http.post("/v1/completions", json=no_end))
        )
        busy.start()
        end = time.monotonic() + 30
        while worker.outstanding == 0 and time.monotonic() < end:
            time.sleep(0.01)
        r = http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        expect_error(r, 429)
        assert r.headers["retry-after"] == "1"
        gate.set()
        busy.join(timeout=60)
        assert first["r"].status_code == 200 and first["r"].json()["usage"]["completion_tokens"] == 3
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2}).status_code == 200  # room again
        worker.stop()


def test_a_failing_step_is_a_500_and_the_server_goes_on(model):
    from starlette.testclient import TestClient

    from picogpt.serve import http as server

    calls = []

    def flaky(*args, **kwargs):  # the first step fails, as a bug in a kernel would
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("a kernel broke")
        return model.forward_rows(*args, **kwargs)

    broken = picogpt.Model(model.params, model.config, model.tokenizer, model.forward, model.folder, flaky, "tiny")
    web = server.app("tiny")
    with TestClient(web) as http:
        worker = server.ready(web, broken, parallel=2, queue_size=2, chunk=16)
        error = expect_error(http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}), 500)
        assert "a kernel broke" in error["message"] and "Traceback" not in error["message"]
        assert http.post("/v1/completions", json={"prompt": "hi", "max_tokens": 3}).status_code == 200
        worker.stop()


# ---- many clients --------------------------------------------------------------------------------------


def alone(client, prompt, max_tokens, **options):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, **options).choices[0].text


def test_sixteen_clients_at_once_get_what_they_get_alone(client):
    jobs = [
        (PROMPTS[i % len(PROMPTS)], 8 + 3 * i, {"temperature": 0} if i % 2 else {"temperature": 1, "seed": i})
        for i in range(16)
    ]
    want = [alone(client, p, n, **o) for p, n, o in jobs]
    got, threads = [None] * 16, []
    for i, (p, n, o) in enumerate(jobs):
        threads.append(threading.Thread(target=lambda i=i, p=p, n=n, o=o: got.__setitem__(i, alone(client, p, n, **o))))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert got == want


def test_a_client_that_leaves_mid_stream_frees_its_rows(server):
    before = metric(server, "picogpt_generation_tokens_total")
    with httpx.Client(timeout=60) as http:
        # 64 sequences of 250 tokens on 16 rows: four waves, seconds of work, so it cannot end on its own first
        body = {"prompt": "The", "max_tokens": 250, "n": 64, "stream": True, "logit_bias": {"4095": -100}}
        with http.stream("POST", f"{server}/v1/completions", json=body) as r:
            for i, _ in zip(range(3), r.iter_lines()):
                pass
    end = time.monotonic() + 20
    while metric(server, "picogpt_sequences_running") and time.monotonic() < end:
        time.sleep(0.05)
    assert metric(server, "picogpt_sequences_running") == 0
    assert metric(server, "picogpt_generation_tokens_total") - before < 64 * 250 / 2  # stopped early, not run out
    assert metric(server, "picogpt_requests_running") == 0 and metric(server, "picogpt_requests_waiting") == 0


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def test_soak_loses_and_mixes_nothing_and_memory_stays_flat():
    process, url = start("--parallel", "8", "--queue", "400")  # no --chunk: the budget decides
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", timeout=60, max_retries=0)
        rng = np.random.default_rng(0)
        requests = [
            (PROMPTS[int(rng.integers(len(PROMPTS)))] * int(rng.integers(1, 20)), int(rng.integers(1, 40)))
            for _ in range(24)
        ]
        want = {r: alone(client, *r, temperature=0) for r in requests}
        baseline = rss_mb(process.pid)
        wrong, left, deadline = [], [], time.monotonic() + 300

        def user(k):
            with httpx.Client(timeout=60) as http:
                for j in range(20):  # 16 users x 20 requests
                    if time.monotonic() > deadline:
                        return
                    prompt, n = requests[(k * 7 + j) % len(requests)]
                    body = {"prompt": prompt, "max_tokens": n, "temperature": 0, "stream": bool(j % 2)}
                    if j % 5 == 4:  # leave mid-stream
                        with http.stream("POST", f"{url}/v1/completions", json=body | {"stream": True}) as r:
                            next(r.iter_lines())
                        left.append(1)
                    elif body["stream"]:
                        text = ""
                        with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                            for line in r.iter_lines():
                                if line.startswith("data: {"):
                                    text += "".join(c["text"] for c in json.loads(line[6:])["choices"])
                        wrong.extend([(prompt, n, text)] if text != want[(prompt, n)] else [])
                    else:
                        text = http.post(f"{url}/v1/completions", json=body).json()["choices"][0]["text"]
                        wrong.extend([(prompt, n, text)] if text != want[(prompt, n)] else [])

        threads = [threading.Thread(target=user, args=(k,)) for k in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=360)
        assert not any(t.is_alive() for t in threads) and time.monotonic() < deadline
        assert wrong == [] and len(left) == 16 * 4
        end = time.monotonic() + 20
        while metric(url, "picogpt_sequences_running") and time.monotonic() < end:
            time.sleep(0.05)
        assert metric(url, "picogpt_sequences_running") == 0 and metric(url, "picogpt_requests_waiting") == 0
        assert rss_mb(process.pid) - baseline < 64, (baseline, rss_mb(process.pid))
        code, err = stop(process, signal.SIGTERM)
        assert code == 0 and "Traceback" not in err, err
    finally:
        process.kill()


def test_ctrl_c_ends_running_streams_with_what_they_have():
    process, url = start("--parallel", "2")
    try:
        with httpx.Client(timeout=60) as http:
            body = {
                "prompt": "The",
                "max_tokens": 250,
                "stream": True,
                "logit_bias": {"4095": -100},
                "stream_options": {"include_usage": True},
            }
            with http.stream("POST", f"{url}/v1/completions", json=body) as r:
                lines = r.iter_lines()
                next(lines)
                process.send_signal(signal.SIGINT)
                rest = [line for line in lines if line]
        assert rest[-1] == "data: [DONE]" and json.loads(rest[-3][6:])["choices"][0]["finish_reason"] == "length"
        assert json.loads(rest[-2][6:])["usage"]["completion_tokens"] < 250  # cut short, not run to its end
        _, err = process.communicate(timeout=60)
        assert process.returncode == 0 and "Traceback" not in err, err
    finally:
        process.kill()


def test_a_port_in_use_is_told_without_claiming_to_listen():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [PICOGPT, "serve", "--model", "tiny", "--port", str(port)], capture_output=True, text=True, timeout=120
        )
    assert result.returncode == 1 and "listening on" not in result.stderr and "loading" not in result.stderr
    assert_one_line_error(result, f"127.0.0.1:{port}", "the port is in use", "--port")
