"""Scoring a corpus: scored tokens per second, picogpt against transformers, in one run.

    python benchmarks/bench_corpus.py                          # gpt2's shapes, random weights
    python benchmarks/bench_corpus.py --mixed 60 --short 300   # how many documents in each corpus

Two corpora of random-token documents, lengths log-uniform: "mixed" (10 to 2,000 tokens: the long ones
need sliding windows, stride 512) and "short" (10 to 100). On each, for float32 (and int8 where said):
- picogpt `score --jsonl` (the command, end to end: start, load, score, write);
- picogpt one document at a time (Model.score in a loop, in this process: today's `score` per document);
- transformers as a user writes it: the same windows sorted by length, batched with padding and an
  attention mask under torch.no_grad, log_softmax and gather, torch on all cores;
- Ray Data on this machine (a local cluster of all cores, started before the clock: Scorer actors
  under map_batches, as `score --jsonl --ray` runs them; the cluster's start is printed apart);
beside the arithmetic limit: the FLOPs of the job (every window's tokens through the blocks and their
attention, the lm_head on the scored tokens) over this machine's sgemm rate (NumPy's float32 matmul of
gpt2's MLP shape, best of several, measured in the same run). Prints a Markdown table.
"""

import argparse
import json
import logging
import math
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
PICOGPT = os.path.join(os.path.dirname(sys.executable), "picogpt")


def corpus(rng, tokenizer, n, low, high):
    """n documents of random tokens, log-uniform lengths in [low, high] (as counted after re-encoding)."""
    docs = []
    for length in np.exp(rng.uniform(math.log(low), math.log(high), n)).astype(int):
        ids = rng.integers(0, 50000, length).tolist()
        docs.append(tokenizer.decode(ids))
    return docs


def windows_of(n_tokens, n_ctx, stride):
    from picogpt.scoring import windows

    return list(windows(n_tokens, n_ctx, stride)) if n_tokens >= 2 else []


def job_flops(lengths, config, stride):
    """The arithmetic of scoring these documents with these windows: matmul FLOPs of every token run
    through the blocks, attention over its window, and the lm_head on the scored tokens."""
    d, n_layer, n_ctx, vocab = config["n_embd"], config["n_layer"], config["n_positions"], config["vocab_size"]
    block = 2 * n_layer * (4 * d * d + 2 * d * 4 * d)  # c_attn, c_proj, c_fc, mlp c_proj
    total = scored = 0
    for n in lengths:
        for begin, first, end in windows_of(n, n_ctx, stride):
            run = end - 1 - begin  # tokens begin .. end-2
            total += run * block + 2 * 2 * n_layer * d * run * (run + 1) / 2  # q.k and p.v over the causal window
            total += 2 * d * vocab * (end - first)
            scored += end - first
    return total, scored


def sgemm_rate(repeats=5):
    a = np.random.rand(1024, 768).astype(np.float32)
    b = np.random.rand(768, 3072).astype(np.float32)
    a @ b
    best = min(timed(lambda: [a @ b for _ in range(4)]) for _ in range(repeats))
    return 4 * 2 * 1024 * 768 * 3072 / best


def timed(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def picogpt_cli(folder, path, dtype, out):
    if os.path.exists(out):
        os.remove(out)
    cmd = [PICOGPT, "score", "--jsonl", path, "--model", folder, "--dtype", dtype, "-o", out]
    start = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    return time.perf_counter() - start


def picogpt_loop(model, docs):
    return timed(lambda: [model.score(t) for t in docs if len(model.tokenizer.encode(t)) >= 2])


def transformers_batched(hf, tokenizer, docs, n_ctx, stride, budget=2048):
    import torch

    pieces = []
    for text in docs:
        ids = tokenizer.encode(text)
        pieces += [(ids[begin:end], first - begin) for begin, first, end in windows_of(len(ids), n_ctx, stride)]

    def run():
        ordered = sorted(pieces, key=lambda p: len(p[0]))
        total, at = 0.0, 0
        with torch.no_grad():
            while at < len(ordered):
                k = 1
                while at + k < len(ordered) and (k + 1) * len(ordered[at + k][0]) <= budget:
                    k += 1
                batch = ordered[at : at + k]
                width = max(len(p[0]) for p in batch)
                ids = torch.tensor([p[0] + [0] * (width - len(p[0])) for p in batch])
                mask = torch.tensor([[1] * len(p[0]) + [0] * (width - len(p[0])) for p in batch])
                logp = torch.log_softmax(hf(ids, attention_mask=mask).logits[:, :-1].float(), dim=-1)
                got = logp.gather(-1, ids[:, 1:, None])[..., 0]
                for row, (p, first) in enumerate(batch):
                    total += float(got[row, first - 1 : len(p) - 1].sum())
                at += k
        return total

    return timed(run)


def ray_data(folder, path, dtype):
    """Scorer actors under map_batches on a local cluster of all cores, as `--ray` runs them."""
    import ray
    import ray.data

    from picogpt import corpus
    from picogpt import ray as on_ray

    start = time.perf_counter()
    cores = os.cpu_count()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    started = time.perf_counter() - start
    logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        ray.data.DataContext.get_current().execution_options.preserve_order = True
        ray.data.DataContext.get_current().enable_progress_bars = False
        job = corpus.Job([path])

        def run():
            ds = ray.data.read_datasource(on_ray.datasource(job, 0), num_cpus=on_ray.READ_CPUS)
            ds = ds.map_batches(
                on_ray.Scorer,
                fn_constructor_kwargs=dict(model=folder, dtype=dtype),
                compute=ray.data.ActorPoolStrategy(size=1),
                num_cpus=cores - on_ray.READ_CPUS,
                batch_size=128,
                runtime_env=on_ray.blas_threads(cores - on_ray.READ_CPUS),
            )
            for _ in ds.iter_rows():
                pass

        return timed(run), started
    finally:
        ray.shutdown()


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mixed", type=int, default=60, help="documents in the mixed corpus (default: %(default)s)")
    p.add_argument("--short", type=int, default=300, help="documents in the short corpus (default: %(default)s)")
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "picogpt-bench-gpt2"))
    p.add_argument("--skip", nargs="*", default=[], help="engines to leave out: loop, transformers, ray, int8")
    args = p.parse_args()

    import torch
    import transformers
    from compare_torch import random_checkpoint

    import picogpt

    if not os.path.exists(os.path.join(args.folder, "model.safetensors")):
        random_checkpoint("gpt2", args.folder)
    model = picogpt.load(args.folder)
    tokenizer, config, stride = model.tokenizer, model.config, model.config["n_positions"] // 2
    hf = transformers.GPT2LMHeadModel.from_pretrained(args.folder, attn_implementation="sdpa").eval()
    torch.set_num_threads(os.cpu_count())
    rng = np.random.default_rng(0)
    rate = sgemm_rate()
    width = "AVX-512" if "avx512f" in open("/proc/cpuinfo").read() else "AVX2"
    print(f"host: {os.cpu_count()} cores, {width}; sgemm {rate / 1e9:.1f} GFLOP/s (NumPy float32, 1024x768 @ 768x3072)")
    print()
    print("| corpus | engine | scored tok/s | vs transformers | of the arithmetic limit |")
    print("|---|---|---|---|---|")
    for name, n, low, high in (("mixed", args.mixed, 10, 2000), ("short", args.short, 10, 100)):
        docs = corpus(rng, tokenizer, n, low, high)
        lengths = [len(tokenizer.encode(t)) for t in docs]
        flops, scored = job_flops(lengths, config, stride)
        limit = scored / (flops / rate)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "corpus.jsonl")
            with open(path, "w") as f:
                for i, t in enumerate(docs):
                    f.write(json.dumps({"id": i, "text": t}) + "\n")
            rows = {}
            rows["picogpt score --jsonl, float32"] = picogpt_cli(args.folder, path, "float32", path + ".out")
            if "int8" not in args.skip:
                rows["picogpt score --jsonl, int8"] = picogpt_cli(args.folder, path, "int8", path + ".out8")
            if "loop" not in args.skip:
                rows["picogpt, one document at a time, float32"] = picogpt_loop(model, docs)
            if "transformers" not in args.skip:
                rows["transformers, sorted and padded batches, float32"] = transformers_batched(
                    hf, tokenizer, docs, config["n_positions"], stride
                )
            if "ray" not in args.skip:
                took, started = ray_data(args.folder, path, "float32")
                rows[f"Ray Data, 1 actor, float32 (cluster start {started:.0f} s apart)"] = took
        hf_rate = scored / rows.get("transformers, sorted and padded batches, float32", float("nan"))
        for engine, seconds in rows.items():
            r = scored / seconds
            print(
                f"| {name}: {n} docs, {scored} scored tokens | {engine} | {r:.1f} | {r / hf_rate:.2f}x | {r / limit:.0%} |"
            )
        print(f"| {name} | arithmetic limit | {limit:.1f} | {limit / hf_rate:.2f}x | 100% |")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
