"""Batched decoding: aggregate tokens/s of B sequences decoded together, picogpt against transformers
and llama.cpp's own batched decoding, each engine in its own process.

    python benchmarks/bench_batch.py [--sizes gpt2 gpt2-medium] [--batches 1 2 4 8 16] [--dtypes float32 int8]

Random weights of GPT-2's real shapes; llama.cpp reads the same weights converted to GGUF (float32 ->
f32, float16 -> f16, int8 -> q8_0; needs llama-cpp-python and its source, see llama_cpp_engine.py;
left out with a note if missing). For each batch size B: B different prompts of 13 to 16 tokens, greedy,
KV cache on every engine, every row decoding --new-tokens tokens (no early end):
- picogpt: Model.generate's decode loop (kernels.gpt2_rows), each row at its own positions;
- transformers: generate() on the prompts left-padded with an attention mask;
- llama.cpp: one `llama_batch` per step holding every sequence's new token, `llama_decode`, a greedy
  pick per sequence from `llama_get_logits_ith` (a context with n_seq_max = B and a unified KV cache).
Aggregate decode tokens/s = B * (new_tokens - 1) / the time from an engine's first new tokens to its
last, so prefill is not counted; time to first token = prefill of all B prompts and the first pick.

Every engine runs in its own process (workers.py: an engine's idle thread pool spinning into the next
engine's work halves the next one's speed when they share one), one at a time, engines alternating
within each round; best of --repeats rounds.
"""

import argparse
import os
import tempfile
import time

import numpy as np
from workers import running, serve

GGUF_TYPE = {"float32": "f32", "float16": "f16", "int8": "q8_0"}


def prompts_for(batch):
    rng = np.random.default_rng(batch)
    return [[int(t) for t in rng.integers(0, 50257, 16 - i % 4)] for i in range(batch)]


# ---- the engines, each built inside its worker process ---------------------------------------------


def picogpt_engine(folder, dtype):
    import picogpt
    from picogpt.engine import decode_rows

    model = picogpt.load(folder, dtype=None if dtype == "float32" else dtype)
    greedy = lambda logits: int(np.argmax(logits))  # noqa: E731

    def generate(prompts, n):
        start = time.perf_counter()
        for i, _ in enumerate(
            decode_rows(model.forward_rows, model.params, model.config, prompts, n, [greedy] * len(prompts), eot=None)
        ):
            if i == 0:
                first = time.perf_counter()
        return first - start, time.perf_counter() - first

    return generate


def torch_engine(folder):
    import torch
    import transformers

    torch.set_num_threads(os.cpu_count())
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()

    class Clock:  # a streamer that notes when each new token arrives (its first put() is the prompt)
        def __init__(self):
            self.times = []

        def put(self, value):
            self.times.append(time.perf_counter())

        def end(self):
            pass

    def generate(prompts, n):
        width = max(map(len, prompts))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        clock, start = Clock(), time.perf_counter()
        with torch.no_grad():
            hf.generate(
                ids,
                attention_mask=mask,
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
                pad_token_id=0,
                streamer=clock,
            )
        return clock.times[1] - start, clock.times[-1] - clock.times[1]

    return generate


def llama_engine(path):
    from llama_cpp_engine import llama_batch_generate

    engines = {}  # n_seq -> generate: a context is made for a number of sequences

    def generate(prompts, n):
        if len(prompts) not in engines:
            engines.clear()
            engines[len(prompts)] = llama_batch_generate(path, len(prompts), n_ctx=64)
        return engines[len(prompts)](prompts, n)

    return generate


def worker(spec):
    """Answer `B n` with one timed run of B prompts, n new tokens each: {first, decode} seconds."""
    kind, arg, folder = spec.split(":", 2)
    generate = {
        "picogpt": lambda: picogpt_engine(folder, arg),
        "torch": lambda: torch_engine(folder),
        "llama.cpp": lambda: llama_engine(arg),
    }[kind]()

    def run(batch, n):
        first, decode = generate(prompts_for(int(batch)), int(n))
        return {"first": first, "decode": decode}

    serve(run)


# ---- the driver --------------------------------------------------------------------------------------


def run(worker, batch, n):
    answer = worker.ask(batch, n)
    time.sleep(1.0)  # let this engine's threads go idle before the next engine runs
    return answer


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"])
    p.add_argument("--batches", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--dtypes", nargs="+", default=["float32", "int8"], choices=list(GGUF_TYPE))
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args.worker)

    import torch
    import transformers
    from compare_torch import random_checkpoint
    from llama_cpp_engine import available, gguf_files

    import picogpt

    has_llama = available()
    print(
        f"{os.cpu_count()} cores; picogpt {picogpt.__version__}, torch {torch.__version__}, transformers {transformers.__version__}"
        f"{', llama-cpp-python ' + __import__('llama_cpp').__version__ if has_llama else ' (llama.cpp: llama-cpp-python not installed)'}; "
        f"greedy, prompts of 13-16 tokens, {args.new_tokens} new tokens per row; each engine in its own process; best of {args.repeats}"
    )
    print()
    print(
        "| model | engine | batch | decode tok/s (all rows) | vs batch 1 | vs torch | vs llama.cpp (same format) | time to first token ms |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        with tempfile.TemporaryDirectory() as folder:
            random_checkpoint(size, folder)
            specs = {f"picogpt {d}": f"picogpt:{d}:{folder}" for d in args.dtypes}
            if not args.no_torch:
                specs["torch float32"] = f"torch::{folder}"
            if has_llama:
                paths = gguf_files(
                    folder, types=[GGUF_TYPE[d] for d in args.dtypes], out_dir=os.path.join(folder, "gguf")
                )
                specs |= {f"llama.cpp {GGUF_TYPE[d]}": f"llama.cpp:{paths[GGUF_TYPE[d]]}:{folder}" for d in args.dtypes}
            with running(specs, script=__file__) as engines:
                single = {}
                for batch in args.batches:
                    for engine in engines.values():
                        run(engine, batch, 2)  # warm up: compile, allocate
                    runs = {name: [] for name in engines}
                    for _ in range(args.repeats):
                        for name, engine in engines.items():
                            runs[name].append(run(engine, batch, args.new_tokens))
                    first = {e: min(r["first"] for r in rs) for e, rs in runs.items()}
                    rate = {e: batch * (args.new_tokens - 1) / min(r["decode"] for r in rs) for e, rs in runs.items()}
                    for e in engines:
                        single.setdefault(e, rate[e])
                        torch_ratio = f"{rate[e] / rate['torch float32']:.2f}x" if "torch float32" in rate else ""
                        peer = f"llama.cpp {GGUF_TYPE[e.split()[1]]}" if e.startswith("picogpt") else None
                        llama_ratio = f"{rate[e] / rate[peer]:.2f}x" if peer in rate else ""
                        print(
                            f"| {size} | {e} | {batch} | {rate[e]:.1f} | {rate[e] / single[e]:.2f}x | {torch_ratio} | {llama_ratio} | {1000 * first[e]:.0f} |",
                            flush=True,
                        )


if __name__ == "__main__":
    main()
