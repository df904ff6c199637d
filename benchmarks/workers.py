"""Every engine a benchmark times runs in a process of its own, one engine working at a time.

An engine's idle threads (OpenBLAS's, torch's OpenMP pool, llama.cpp's) spin for a while after its
work, and in a process shared with the next engine they took its cores: picogpt's first token after
a 16-token prompt took 120 ms right after another engine in the same process, 56 ms alone. So a
benchmark starts a `Worker` for each engine, which runs `python SCRIPT --worker SPEC`: the script
builds its engine from SPEC and `serve`s, answering each request (a line of words) with a line of JSON.

This file is the worker of the single-stream engines that `compare_torch.measure` times (`stream`):
SPEC is `picogpt:BACKEND:FOLDER`, `torch::FOLDER` or `llama.cpp:THREADS:GGUF` (THREADS empty: every
core), and the request `N ID ID ...` is answered with the seconds it took to generate N greedy tokens
after the prompt of those ids, the KV cache built afresh.
"""

import contextlib
import json
import os
import subprocess
import sys
import time

import numpy as np


class Worker:
    """`python script --worker spec`, started now and ready for `ask`."""

    def __init__(self, name, spec, script=__file__, prefix=(), wait=True):
        self.name = name
        self.process = subprocess.Popen(
            [*prefix, sys.executable, script, "--worker", spec],  # prefix: a command that runs the rest
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=os.path.dirname(os.path.abspath(script)),
        )
        if wait:
            self.ready()

    def ready(self):
        """Wait until the worker has built its engine (several can start at once: wait=False, then this)."""
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError(f"{self.name}: the worker did not start")

    def ask(self, *words):
        """The worker's answer to one request, as JSON."""
        self.send(*words)
        return self.answer()

    def send(self, *words):
        """Send a request; `answer` waits for what it says (several workers can work at once)."""
        self.process.stdin.write(" ".join(map(str, words)) + "\n")
        self.process.stdin.flush()

    def answer(self):
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"{self.name}: the worker died")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def serve(handle):
    """In the worker: answer each line of stdin with json(handle(*its words)), until stdin closes."""
    print("ready", flush=True)
    for line in sys.stdin:
        print(json.dumps(handle(*line.split())), flush=True)


def stream(spec):
    """generate(ids, n): n greedy new tokens after `ids`, batch 1, on the engine `spec` names."""
    kind, option, where = spec.split(":", 2)
    if kind == "picogpt":
        import picogpt
        from picogpt.engine import decode_tokens

        model = picogpt.load(where, backend=option or "numba")
        greedy = lambda logits: int(np.argmax(logits))  # noqa: E731

        def generate(ids, n):
            for _ in decode_tokens(model.forward, model.params, model.config, ids, n, greedy):
                pass

        return generate
    if kind == "torch":
        import torch
        import transformers

        hf = transformers.GPT2LMHeadModel.from_pretrained(where, dtype=torch.float32).eval()  # default attention (sdpa)

        def generate(ids, n):
            with torch.no_grad():
                hf.generate(torch.tensor([ids]), max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)

        return generate
    if kind == "llama.cpp":
        from llama_cpp_engine import llama_generate

        return llama_generate(where, int(option) if option else None)
    raise ValueError(f"unknown engine {kind!r}")


@contextlib.contextmanager
def running(specs, script=__file__):
    """{name: Worker} from {name: spec}, each started now and closed on leaving (this file's workers:
    the single-stream engines)."""
    started = {}
    try:
        for name, spec in specs.items():
            started[name] = Worker(name, spec, script)
        yield started
    finally:
        for worker in started.values():
            worker.close()


def main():
    generate = stream(sys.argv[sys.argv.index("--worker") + 1])

    def timed(n, *ids):
        start = time.perf_counter()
        generate([int(i) for i in ids], int(n))
        return {"seconds": time.perf_counter() - start}

    serve(timed)


if __name__ == "__main__":
    main()
