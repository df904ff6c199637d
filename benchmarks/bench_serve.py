"""Serving under load: `picogpt serve` against llama.cpp's own C++ server (`llama-server`) and
llama-cpp-python's OpenAI-compatible server, the same requests sent to each over HTTP, streamed,
measured at the client.

    python benchmarks/bench_serve.py [--sizes gpt2 gpt2-medium] [--dtypes float32 int8] [--concurrency 1 4 8 16]
                                     [--requests N] [--think SECONDS] [--servers picogpt llama-server llama.cpp]
                                     [--llama-server PATH] [--kv-dtype float16] [--slo-ttft 2.0] [--slo-tbt 0.2]

llama-server is what llama.cpp's users run: continuous batching over --parallel slots, here `-np
<largest concurrency> -c <1024 per slot> -cb -kvu -t 2` (unified KV cache, 2 threads). It is found as
--llama-server, $LLAMA_SERVER or `llama-server` on PATH, and left out with a note if missing; it is
built from the llama.cpp source that llama-cpp-python's sdist vendors (docs/development.md gives the
recipe). It gets the prompts' token ids, as picogpt does.

Random weights of GPT-2's real shapes; llama.cpp reads the same weights converted to GGUF (float32 ->
f32, int8 -> q8_0; needs llama-cpp-python and its source, see llama_cpp_engine.py; left out with a
note if missing). Each server runs alone, as its own process on 127.0.0.1 (picogpt with --parallel =
the largest concurrency; llama.cpp with n_ctx 1024, 2 threads, and interrupt_requests off: by default
it ends a running stream as soon as another request waits), started, warmed up with one short
request, loaded, stopped; llama.cpp first, so that picogpt's rows can carry the ratio to it.

The load, for each concurrency C: C clients (asyncio tasks), each sending its requests one after the
other (--requests per client; by default 8 at C = 1, 3 up to C = 8, 2 beyond), sleeping an
exponential time of mean --think seconds before each (Poisson arrivals within a client). A request:
a prompt of 16 to 512 random tokens (ids from a seeded RNG, decoded and encoded again so that the text
and the ids are the same prompt: picogpt gets the ids, llama-cpp-python's server takes only text),
max_tokens 64 to 128, temperature 0, stream, logit_bias -100 on <|endoftext|> so that every request
runs to max_tokens. Both servers get the same requests, waits and order.

`--servers engine` adds the ceiling: picogpt's engine in this process on the same requests, with
no HTTP and no waits, each finished sequence's row refilled at once from the queue of all clients'
requests (the most `picogpt serve` could deliver with them; times are the steps', not a client's).

Measured from the stream: time to first token = to the first chunk with text; time between tokens =
between successive chunks with text (a chunk may hold more than one token: a piece of a UTF-8
character waits for the rest); latency = to the end of the stream; output tokens = the usage's
completion_tokens when the server sends it (stream_options.include_usage), else the chunks with text.
Output tokens/s = all requests' output tokens / the wall time of the whole level, waits included.

Goodput, as serving papers compare schedulers (DistServe, Sarathi-Serve): the requests that meet a
latency target, time to first token within --slo-ttft (2 s) and the p99 of the request's own times
between tokens within --slo-tbt (200 ms); as a share of the requests sent (a failed one misses), and
per second (those requests / the level's wall time).

The roof: what an ideal engine on this machine could do with the level's exact requests. Prefill at
sgemm's rate: 2 x the blocks' weights per prompt token, plus attention's 2 x 2 x n_layer x n_embd per
key it reads (position + 1), the prompts' common start counted once (the --shared preamble); then
decode at the memory's bandwidth: output tokens / C steps (each decodes all C streams at once), each
reading every weight (the blocks' and the tied lm_head's, in picogpt's format: 4, 2 or 1.125 bytes)
once; biases, layer norms, the KV cache's reads and the clients' waits left out. Roof tok/s = output
tokens / (prefill s + decode s); each row gives its share of it. sgemm (NumPy float32, 512x768 @
768x3072) and the read (NumPy's x @ W through 512 MB) are measured at the start of the run, before
any server, best of 5, on llama-server's 2 threads (picogpt serve takes every core it may use: the
same on 2 cores). The figures, every row's and every roof's, also go to --json.
"""

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import httpx
import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tools"))
from ports import free_port  # noqa: E402  (tools/ports.py, shared with the tests)

GGUF_TYPE = {"float32": "f32", "float16": "f16", "int8": "q8_0"}
EOT = 50256
THREADS = 2  # llama-server's and llama.cpp's threads, and the machine's rates'
BODY = {"temperature": 0, "stream": True, "stream_options": {"include_usage": True}, "logit_bias": {str(EOT): -100}}


def per_client(concurrency, requests):
    return requests or (8 if concurrency == 1 else 3 if concurrency <= 8 else 2)


# ---- the load ------------------------------------------------------------------------------------------


def prompt(rng, tokenizer, shared=()):
    """Random ids of a random length, as (ids, text) that encode and decode to each other: random ids
    are rarely what the tokenizer makes of their text, and llama.cpp's server reads text only. With
    `shared` ids: those, then 32 of its own (--shared)."""
    n = int(rng.integers(16, 513)) if not len(shared) else len(shared) + 32
    ids = list(shared) + rng.integers(0, EOT, n - len(shared)).tolist()  # no <|endoftext|> in the prompt
    for _ in range(10):  # cutting to n tokens can split a character: encode again until it fits
        text = tokenizer.decode(ids[:n])
        ids = tokenizer.encode(text, allowed_special="all")
        if len(ids) <= n:
            break
    return ids, text


def plan(concurrency, n_requests, think, tokenizer, shared=0):
    """For each client, its requests: (wait before, ids, text, max_tokens); the same for every server.
    shared: every prompt begins with the same `shared` tokens (a few-shot preamble), then 32 of its
    own, and asks 32 new tokens."""
    rng = np.random.default_rng([0, concurrency])
    common = shared_ids(tokenizer, shared) if shared else ()
    return [
        [
            (
                float(rng.exponential(think)),
                *prompt(rng, tokenizer, common),
                32 if shared else int(rng.integers(64, 129)),
            )
            for _ in range(n_requests)
        ]
        for _ in range(concurrency)
    ]


def shared_ids(tokenizer, n):
    """n token ids whose text encodes back to them, and that a random continuation leaves whole: a
    preamble of words."""
    words = np.random.default_rng(7).choice(["the", "model", "reads", "a", "long", "preamble", "of", "words"], 2 * n)
    ids = tokenizer.encode(" ".join(words) + ".\n")
    return ids[: n - 1] + tokenizer.encode(".\n")[:1]


async def stream(client, url, body):
    """One streamed completion: {ttft, gaps, latency, tokens}, times in seconds."""
    start, times, usage = time.perf_counter(), [], None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):  # blank separators, ": ping" comments
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"error in the stream: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]["completion_tokens"]
            if any(c.get("text") for c in chunk.get("choices") or []):
                times.append(time.perf_counter())
    if not times:
        raise RuntimeError("no text in the stream")
    return dict(
        ttft=times[0] - start,
        gaps=np.diff(times).tolist(),
        latency=time.perf_counter() - start,
        tokens=len(times) if usage is None else usage,
    )


async def level(url, clients, use_ids, timeout, level_timeout):
    """Run every client's requests; return (results, errors, wall seconds). A result is stream()'s
    dict plus the max_tokens asked for; a request still running at the level's timeout is an error."""
    results, errors = [], []

    async def client_loop(http, requests):
        for wait, ids, text, max_tokens in requests:
            await asyncio.sleep(wait)
            body = BODY | {"prompt": ids if use_ids else text, "max_tokens": max_tokens}
            try:
                results.append(await asyncio.wait_for(stream(http, url, body), timeout) | {"asked": max_tokens})
            except Exception as e:  # noqa: BLE001 - counted and reported, the load goes on
                errors.append(f"{type(e).__name__}: {e}" if str(e) else type(e).__name__)

    limits = httpx.Limits(max_connections=len(clients) + 1, max_keepalive_connections=len(clients) + 1)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=10), limits=limits) as http:
        start = time.perf_counter()
        tasks = [asyncio.ensure_future(client_loop(http, requests)) for requests in clients]
        _, pending = await asyncio.wait(tasks, timeout=level_timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    sent = sum(map(len, clients))
    errors += [f"the level's {level_timeout:.0f} s timeout"] * (sent - len(results) - len(errors))
    return results, errors, wall


def engine_alone(folder, dtype, clients, parallel, kv_dtype="float32"):
    """The same requests through picogpt's Engine in this process, `parallel` rows kept full, as the
    server runs it (its prefill budget, greedy, end-of-text banned): returns what level() does."""
    import picogpt
    from picogpt import budget, engine, options, sampling, warmup

    model = picogpt.load(folder, dtype=dtype, kv_dtype=kv_dtype)
    chunk, eot = options.SERVE["chunk"], model.tokenizer.eot_token
    longest = min(chunk or budget.IDLE, model.config["n_positions"] - 3)  # as serve's warm-up
    warmup.warm_up(model, [[eot] * longest, [eot]], 3, say=None)
    run = engine.Engine(
        model.forward_rows,
        model.params,
        model.config,
        parallel,
        budget=budget.Budget(cap=chunk),
        eot=eot,
        kv_dtype=kv_dtype,
    )
    for k, v in run.cache:  # the pages touched before timing, as the server does
        k.fill(0), v.fill(0)
    queue = [
        (ids, max_tokens) for requests in zip(*clients) for _, ids, _, max_tokens in requests
    ]  # the clients' requests in turn
    times, results = {}, []
    start = time.perf_counter()
    while queue or run.busy:
        while queue and len(run.running) + len(run.waiting) < parallel:
            ids, max_tokens = queue.pop(0)
            seq = run.add(
                ids,
                max_tokens,
                sampling.picker(
                    ids,
                    options.SamplingParams(temperature=0, logit_bias={EOT: -100.0}),
                    n_vocab=model.config["vocab_size"],
                ),
            )
            times[seq.id] = (max_tokens, [time.perf_counter()])
        step = run.step()
        now = time.perf_counter()
        for seq, _ in step:
            times[seq.id][1].append(now)
            if seq.finish is not None:
                asked, (added, *stamps) = times.pop(seq.id)
                results.append(
                    dict(
                        ttft=stamps[0] - added,
                        gaps=np.diff(stamps).tolist(),
                        latency=now - added,
                        tokens=len(stamps),
                        asked=asked,
                    )
                )
    return results, [], time.perf_counter() - start


# ---- the machine and the roof --------------------------------------------------------------------------


def machine_rates(threads=THREADS):
    """{sgemm_gflop_s, read_gb_s} on `threads` threads, measured in a fresh Python: OpenBLAS takes its
    thread count from the environment when NumPy loads."""
    env = os.environ | {name: str(threads) for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    code = "import json, bench_serve; print(json.dumps(bench_serve.rates_here()))"
    done = subprocess.run([sys.executable, "-c", code], cwd=HERE, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout)


def rates_here(repeats=5):
    """This process's sgemm GFLOP/s (float32 [512, 768] @ [768, 3072]) and read GB/s (x @ W through a
    512 MB matrix, as bench_decode.py's ceiling), best of `repeats` after one untimed call."""

    def best(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return min(times)

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8192, 16384), dtype=np.float32)  # 512 MB: far beyond the caches
    x = np.ones(8192, np.float32)
    read = w.nbytes / best(lambda: x @ w) / 1e9
    a, b = rng.standard_normal((512, 768), dtype=np.float32), rng.standard_normal((768, 3072), dtype=np.float32)
    sgemm = 2 * 512 * 768 * 3072 / best(lambda: a @ b) / 1e9
    return {"sgemm_gflop_s": sgemm, "read_gb_s": read}


def roof(clients, config, dtype, rates):
    """The least time an ideal engine on this machine needs for one level's requests (the docstring's
    roof), and what it comes to: a dict for the report."""
    from picogpt import formats

    d, n_layer = config["n_embd"], config["n_layer"]
    prompts = [ids for requests in clients for _, ids, _, _ in requests]
    output = sum(max_tokens for requests in clients for *_, max_tokens in requests)  # every request runs to it
    common = len(os.path.commonprefix(prompts))  # a start every prompt shares is computed once

    def flops(lo, hi):  # prompt tokens at positions lo..hi-1: the blocks' matmuls, attention over position + 1 keys
        return 2 * 12 * n_layer * d * d * (hi - lo) + 2 * 2 * n_layer * d * (hi * (hi + 1) - lo * (lo + 1)) / 2

    prompt_flops = flops(0, common) + sum(flops(common, len(ids)) for ids in prompts)
    weight_bytes = (12 * n_layer * d * d + config["vocab_size"] * d) * formats.FORMATS[dtype].bytes_per_weight
    steps = output / len(clients)  # every step decodes all C streams at once
    prefill_s = prompt_flops / (rates["sgemm_gflop_s"] * 1e9)
    decode_s = steps * weight_bytes / (rates["read_gb_s"] * 1e9)
    return dict(
        requests=len(prompts),
        prompt_tokens=sum(map(len, prompts)),
        common_start=common,
        output_tokens=output,
        prompt_gflop=prompt_flops / 1e9,
        prefill_s=prefill_s,
        decode_steps=steps,
        weight_mb=weight_bytes / 1e6,
        decode_s=decode_s,
        roof_s=prefill_s + decode_s,
        roof_tok_s=output / (prefill_s + decode_s),
    )


# ---- the servers ---------------------------------------------------------------------------------------


@contextlib.contextmanager
def running(command, ready_url, log_path, start_timeout=600):
    """Start a server; yield once ready_url answers 200 (polled, at most start_timeout s); stop it
    at the end (SIGINT, then terminate, then kill), whatever happens."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=HERE)
        try:
            deadline = time.monotonic() + start_timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(
                        f"the server exited ({process.returncode}) before it was ready:\n{tail(log_path)}"
                    )
                if time.monotonic() > deadline:
                    raise RuntimeError(f"the server was not ready after {start_timeout} s:\n{tail(log_path)}")
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                time.sleep(0.5)
            yield process
        finally:
            for stop, wait in [
                (lambda: process.send_signal(signal.SIGINT), 30),
                (process.terminate, 10),
                (process.kill, 10),
            ]:
                if process.poll() is not None:
                    break
                stop()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(wait)


def tail(path, n=20):
    with open(path, errors="replace") as f:
        return "".join(f.readlines()[-n:])


def server_command(server, size_folder, dtype, gguf, port, parallel, llama_server=None, kv_dtype="float32"):
    if server == "llama-server":
        return [
            llama_server,
            *("-m", gguf, "--host", "127.0.0.1", "--port", str(port), "-np", str(parallel), "-c", str(1024 * parallel)),
            *("-cb", "-kvu", "-t", str(THREADS), "--log-disable"),
        ], "/health"
    if server.startswith("picogpt"):
        return [
            sys.executable,
            "-m",
            "picogpt",
            "serve",
            "--model",
            size_folder,
            "--dtype",
            dtype,
            "--port",
            str(port),
            "--parallel",
            str(parallel),
            "--kv-dtype",
            kv_dtype,
            *(["--no-prefix-cache"] if server == "picogpt-nocache" else []),
        ], "/health"
    return [
        sys.executable,
        "-m",
        "llama_cpp.server",
        "--model",
        gguf,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--n_ctx",
        "1024",
        "--n_threads",
        str(THREADS),
        "--interrupt_requests",
        "False",
    ], "/v1/models"


def llama_tokens_differ(gguf, prompts):
    """How many prompt texts llama.cpp's own tokenizer reads differently from picogpt's ids."""
    import ctypes

    import llama_cpp
    import llama_cpp_engine

    # quiet: a vocabulary-only model still makes a context, and llama.cpp warns about its size on stderr
    llama_cpp_engine._quiet = llama_cpp_engine._quiet or llama_cpp.llama_log_callback(llama_cpp_engine._quiet_log)
    llama_cpp.llama_log_set(llama_cpp_engine._quiet, ctypes.c_void_p(0))
    vocab = llama_cpp.Llama(model_path=gguf, vocab_only=True, verbose=False)
    return sum(vocab.tokenize(text.encode("utf-8"), add_bos=True, special=True) != ids for ids, text in prompts)


# ---- the report ----------------------------------------------------------------------------------------


def row(size, name, concurrency, results, errors, wall, single, peer, slo, roof_rate):
    """Print one table row; return its figures (a dict for --json). slo: (TTFT s, p99 TBT s)."""
    tokens = sum(r["tokens"] for r in results)
    rate = tokens / wall
    single = single or (rate if concurrency == 1 else None)
    ms = lambda xs, q: f"{1000 * np.percentile(xs, q):.0f}" if len(xs) else ""  # noqa: E731
    ttft, gaps = [r["ttft"] for r in results], [g for r in results for g in r["gaps"]]
    short = sum(r["tokens"] < r["asked"] for r in results)
    done = f"{len(results)}/{len(results) + len(errors)}" + (f" ({short} short)" if short else "")
    vs_one = f"{rate / single:.2f}x" if single else ""
    vs_peer = f"{rate / peer:.2f}x" if peer else ""
    latency = f"{np.median([r['latency'] for r in results]):.2f}" if results else ""
    # goodput: the requests within both targets (one token, no gaps: its TTFT alone), of those sent
    good = sum(bool(r["ttft"] <= slo[0] and (not r["gaps"] or np.percentile(r["gaps"], 99) <= slo[1])) for r in results)
    share, good_rate = good / (len(results) + len(errors)), good / wall
    print(
        f"| {size} | {name} | {concurrency} | {done} | {rate:.1f} | {rate / roof_rate:.2f}x of {roof_rate:.0f} | {vs_one} | {vs_peer} "
        f"| {100 * share:.0f}% | {good_rate:.2f} | {ms(ttft, 50)} | {ms(ttft, 99)} | {ms(gaps, 50)} | {ms(gaps, 99)} | {latency} |",
        flush=True,
    )
    percentile = lambda xs, q: float(np.percentile(xs, q)) if len(xs) else None  # noqa: E731
    return dict(
        model=size,
        server=name,
        concurrency=concurrency,
        done=len(results),
        sent=len(results) + len(errors),
        short=short,
        wall_s=wall,
        output_tokens=tokens,
        output_tok_s=rate,
        of_roof=rate / roof_rate,
        goodput_share=share,
        goodput_req_s=good_rate,
        ttft_median_s=percentile(ttft, 50),
        ttft_p99_s=percentile(ttft, 99),
        tbt_median_s=percentile(gaps, 50),
        tbt_p99_s=percentile(gaps, 99),
        latency_median_s=percentile([r["latency"] for r in results], 50),
    )


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2"], choices=["gpt2", "gpt2-medium"])
    p.add_argument("--dtypes", nargs="+", default=["float32", "int8"], choices=list(GGUF_TYPE))
    p.add_argument("--concurrency", nargs="+", type=int, default=[1, 4, 8, 16])
    p.add_argument(
        "--requests",
        type=int,
        default=None,
        help="requests per client (default: 8 at concurrency 1, 3 up to 8, 2 beyond)",
    )
    p.add_argument(
        "--think", type=float, default=0.5, help="mean seconds a client waits before each request (exponential)"
    )
    p.add_argument(
        "--servers",
        nargs="+",
        default=["picogpt", "llama-server"],
        choices=["picogpt", "picogpt-nocache", "llama-server", "llama.cpp", "engine"],
    )
    p.add_argument(
        "--shared",
        type=int,
        default=0,
        help="every prompt begins with the same SHARED tokens, then 32 of its own, 32 new tokens (the prefix cache's load)",
    )
    p.add_argument("--llama-server", default=os.environ.get("LLAMA_SERVER") or shutil.which("llama-server"))
    p.add_argument(
        "--kv-dtype",
        default="float32",
        choices=["float32", "float16"],
        help="picogpt's KV cache (llama-server's is f16 by default)",
    )
    p.add_argument("--timeout", type=float, default=300, help="seconds per request")
    p.add_argument("--level-timeout", type=float, default=1800, help="seconds per concurrency level of one server")
    p.add_argument("--slo-ttft", type=float, default=2.0, help="goodput's target: seconds to the first token")
    p.add_argument(
        "--slo-tbt", type=float, default=0.2, help="goodput's target: p99 of a request's seconds between tokens"
    )
    p.add_argument("--json", default=os.path.join(HERE, "bench_serve.json"), help="where the figures go")
    args = p.parse_args()
    kv_note = ", float16 KV cache" if args.kv_dtype == "float16" else ""
    slo = (args.slo_ttft, args.slo_tbt)
    rates_now = machine_rates()  # before any server starts

    from compare_torch import random_checkpoint
    from llama_cpp_engine import available, gguf_files

    import picogpt

    servers = [
        s for s in ["llama-server", "llama.cpp", "picogpt", "picogpt-nocache", "engine"] if s in args.servers
    ]  # llama.cpp's first: picogpt's rows compare with them
    notes = []
    if "llama-server" in servers and not (args.llama_server and os.access(args.llama_server, os.X_OK)):
        servers.remove("llama-server")
        notes.append("llama-server left out: not found (--llama-server PATH, $LLAMA_SERVER, or on PATH)")
    if "llama.cpp" in servers and not available():
        servers.remove("llama.cpp")
        notes.append("llama.cpp left out: llama-cpp-python is not installed (or its library does not load)")
    peer_name = next((s for s in servers if s in ("llama-server", "llama.cpp")), None)
    versions = f"picogpt {picogpt.__version__}" + (
        f", llama-cpp-python {__import__('llama_cpp').__version__}" if "llama.cpp" in servers else ""
    )
    print(
        f"{os.cpu_count()} cores; sgemm {rates_now['sgemm_gflop_s']:.1f} GFLOP/s, read {rates_now['read_gb_s']:.1f} GB/s "
        f"(NumPy float32 512x768 @ 768x3072, x @ W through 512 MB; {THREADS} threads); "
        f"{versions}, httpx {httpx.__version__}; each server alone on 127.0.0.1; prompts of 16-512 random tokens, "
        f"64-128 new tokens (temperature 0, end-of-text banned), streamed; Poisson waits of mean {args.think} s before each request"
        + (
            f"; --shared {args.shared}: every prompt {args.shared} shared tokens + 32 of its own, 32 new tokens"
            if args.shared
            else ""
        )
        + f"; goodput: TTFT <= {args.slo_ttft:g} s and the request's p99 TBT <= {1000 * args.slo_tbt:g} ms"
    )
    report = {
        "machine": {"cores": os.cpu_count(), "threads": THREADS, **rates_now},
        "versions": {"picogpt": picogpt.__version__, "httpx": httpx.__version__, "numpy": np.__version__},
        "setup": vars(args) | {"servers": servers, "when": time.strftime("%Y-%m-%d %H:%M")},
        "slo": {"ttft_s": args.slo_ttft, "tbt_p99_s": args.slo_tbt},
        "roofs": [],
        "rows": [],
    }

    def save(figures):  # a row into the report, and the report to --json (a run cut short keeps its rows)
        report["rows"].append(figures)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        return figures["output_tok_s"]

    print()
    print(
        f"| model | server | concurrency | requests done/sent | output tok/s | of roof tok/s | vs concurrency 1 | vs {peer_name or 'llama.cpp'} (same format) "
        f"| goodput % (TTFT <= {args.slo_ttft:g} s, p99 TBT <= {1000 * args.slo_tbt:g} ms) | goodput req/s "
        "| TTFT median ms | TTFT p99 ms | TBT median ms | TBT p99 ms | latency median s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as tmp:
            folder = random_checkpoint(size, os.path.join(tmp, size))
            tokenizer = picogpt.load_tokenizer(folder)
            plans = {
                c: plan(c, per_client(c, args.requests), args.think, tokenizer, args.shared) for c in args.concurrency
            }
            with open(os.path.join(folder, "config.json")) as f:
                config = json.load(f)
            ggufs = {}
            if {"llama.cpp", "llama-server"} & set(servers):
                ggufs = gguf_files(folder, types=[GGUF_TYPE[d] for d in args.dtypes], out_dir=os.path.join(tmp, "gguf"))
            if "llama.cpp" in servers:  # the one server fed text
                differ = llama_tokens_differ(
                    next(iter(ggufs.values())),
                    [(ids, text) for c in plans.values() for client in c for _, ids, text, _ in client],
                )
                if differ:
                    notes.append(
                        f"{size}: llama.cpp's tokenizer reads {differ} of the prompt texts differently from picogpt's ids"
                    )
            for dtype in args.dtypes:
                rates = {}  # (server, concurrency) -> output tok/s
                roofs = {c: roof(plans[c], config, dtype, rates_now) for c in args.concurrency}
                report["roofs"] += [dict(model=size, dtype=dtype, concurrency=c, **r) for c, r in roofs.items()]
                for server in servers:
                    if server == "engine":  # the ceiling: no HTTP, no waits
                        for c in args.concurrency:
                            results, errors, wall = engine_alone(folder, dtype, plans[c], c, args.kv_dtype)
                            rates[server, c] = save(
                                row(
                                    size,
                                    f"picogpt {dtype}{kv_note}, engine alone",
                                    c,
                                    results,
                                    errors,
                                    wall,
                                    rates.get((server, 1)),
                                    rates.get((peer_name, c)),
                                    slo,
                                    roofs[c]["roof_tok_s"],
                                )
                            )
                        continue
                    name = (
                        f"{server.replace('-nocache', ', no prefix cache')} {dtype}{kv_note}"
                        if server.startswith("picogpt")
                        else f"{server} {GGUF_TYPE[dtype]}"
                    )
                    port = free_port()
                    command, ready = server_command(
                        server,
                        folder,
                        dtype,
                        ggufs.get(GGUF_TYPE[dtype]),
                        port,
                        max(args.concurrency),
                        args.llama_server,
                        args.kv_dtype,
                    )
                    url = f"http://127.0.0.1:{port}"
                    log_path = os.path.join(tmp, f"{server}-{dtype}.log")
                    with running(command, url + ready, log_path):
                        warm = [
                            [(0.0, *prompt(np.random.default_rng(1), tokenizer), 8)]
                        ]  # first-request costs, not measured
                        _, errors, _ = asyncio.run(
                            level(
                                url + "/v1/completions", warm, server != "llama.cpp", args.timeout, args.level_timeout
                            )
                        )
                        if errors:
                            notes.append(f"{size} {name}: the warm-up request failed: {errors[0][:300]}")
                        for c in args.concurrency:
                            results, errors, wall = asyncio.run(
                                level(
                                    url + "/v1/completions",
                                    plans[c],
                                    server != "llama.cpp",  # ids, but llama-cpp-python's server reads text only
                                    args.timeout,
                                    args.level_timeout,
                                )
                            )
                            peer = rates.get((peer_name, c)) if server.startswith("picogpt") else None
                            rates[server, c] = save(
                                row(
                                    *(size, name, c, results, errors, wall, rates.get((server, 1)), peer),
                                    *(slo, roofs[c]["roof_tok_s"]),
                                )
                            )
                            if errors:
                                notes.append(
                                    f"{size} {name} concurrency {c}: {len(errors)} failed, first: {errors[0][:300]}"
                                )
    print()
    print(
        f"The roof: prefill at {rates_now['sgemm_gflop_s']:.1f} GFLOP/s (2 x blocks' weights per prompt token + attention, a common start once), "
        f"then output tokens / C decode steps, each reading the weights once at {rates_now['read_gb_s']:.1f} GB/s"
    )
    print()
    print(
        "| model | weights | concurrency | requests | prompt tokens (common start) | output tokens | prompt GFLOP | prefill s "
        "| decode steps | weights MB | decode s | roof s | roof tok/s |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in report["roofs"]:
        print(
            f"| {r['model']} | {r['dtype']} | {r['concurrency']} | {r['requests']} | {r['prompt_tokens']} ({r['common_start']}) "
            f"| {r['output_tokens']} | {r['prompt_gflop']:.0f} | {r['prefill_s']:.2f} | {r['decode_steps']:.0f} | {r['weight_mb']:.0f} "
            f"| {r['decode_s']:.2f} | {r['roof_s']:.2f} | {r['roof_tok_s']:.0f} |"
        )
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)
    for note in notes:
        print(f"\nNote: {note}", flush=True)


if __name__ == "__main__":
    main()
