"""Inside the model: picogpt's run_with_cache and patching sweeps against TransformerLens on the same
random weights of gpt2's shapes, each in its own process on the same thread count.

    python benchmarks/bench_inside.py [--size gpt2] [--threads 2] [--repeats 3]

(a) run_with_cache of every hook point for 8 prompts x 64 tokens: picogpt, picogpt's plain forward
    on the same batch (the engine's kernels.gpt2_rows, every position's logits), and TransformerLens
    4 (TransformerBridge.boot_transformers on the folder, enable_compatibility_mode(no_processing=True)).
(b) an activation patching sweep of resid_pre over every layer x 16 positions of an IOI-style pair
    (the corrupted prompt differs in two tokens; metric: a logit difference at the last position):
    picogpt's Model.patching, against TransformerLens's loop of run_with_hooks as its users write it.
(c) memory: the bytes NumPy allocated at the peak of a run_with_cache (tracemalloc, in a fresh
    process, after a pass of the same batch that keeps nothing), of every name against one layer's
    names, with the logits and stopped after that layer.
Times are the best of --repeats after a warm-up. Nothing else may run meanwhile: check `uptime`.
"""

import argparse
import json
import os
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from compare_torch import SHAPES, best_of, random_checkpoint  # noqa: E402
from workers import Worker, serve  # noqa: E402

BATCH, POS, SWEEP_POS = 8, 64, 16
GOOD, BAD = 100, 200


def inputs(n_vocab=50257):
    rng = np.random.default_rng(0)
    batch = rng.integers(0, n_vocab, (BATCH, POS))
    clean = rng.integers(0, n_vocab, SWEEP_POS)
    corrupted = clean.copy()
    corrupted[[3, 9]] = rng.integers(0, n_vocab, 2)  # IOI's names swapped: two tokens differ
    return batch, clean, corrupted


def best(fn, repeats):
    fn()  # warm-up: compiles, faults pages in
    return best_of(fn, repeats)


def picogpt_worker(threads, folder):
    import picogpt
    from picogpt import threads as picogpt_threads

    picogpt_threads.use(int(threads), why="bench")
    m = picogpt.load(folder)
    batch, clean, corrupted = inputs()

    def plain():
        n_layer, n_head, n_embd = m.config["n_layer"], m.config["n_head"], m.config["n_embd"]
        kv = picogpt.model.kv_cache(n_layer, n_head, POS, n_embd, n_rows=BATCH)
        return m.forward_rows(
            list(batch), **m.params, n_head=n_head, cache=kv, rows=list(range(BATCH)), past=[0] * BATCH, last=False
        )

    def handle(task, repeats="3"):
        repeats = int(repeats)
        if task == "forward":
            return best(plain, repeats)
        if task == "cache":
            return best(lambda: m.run_with_cache(batch), repeats)
        if task == "sweep":
            return best(lambda: m.patching(clean, corrupted, (GOOD, BAD)), repeats)
        if task.startswith("memory"):  # memory-all, memory-layer, memory-layer-stop: once, in a fresh process
            import tracemalloc

            layer = m.config["n_layer"] // 2
            names = None if task == "memory-all" else f"blocks.{layer}"
            stop = layer + 1 if task == "memory-layer-stop" else None
            m.run_with_cache(batch, names=[])  # warm-up: compiles, and makes the buffers every later pass reuses
            tracemalloc.start()
            out, kept = m.run_with_cache(batch, names=names, stop_at_layer=stop)
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            return {"peak": peak, "kept": kept.nbytes, "out": out.nbytes}
        raise ValueError(task)

    return handle


def tl_worker(threads, folder):
    import torch
    import transformers
    from transformer_lens.model_bridge import TransformerBridge

    torch.set_num_threads(int(threads))
    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    tl = TransformerBridge.boot_transformers(folder, hf_model=hf, device="cpu")
    tl.enable_compatibility_mode(no_processing=True)
    batch, clean, corrupted = (torch.tensor(a) for a in inputs())

    def sweep():  # as TransformerLens's users write it: a run_with_hooks per layer and position
        with torch.no_grad():
            _, corrupted_cache = tl.run_with_cache(corrupted[None])
            out = torch.zeros(tl.cfg.n_layers, SWEEP_POS)
            for layer in range(tl.cfg.n_layers):
                name = f"blocks.{layer}.hook_resid_pre"
                for pos in range(SWEEP_POS):

                    def patch(x, hook, pos=pos, name=name):
                        x = x.clone()
                        x[:, pos] = corrupted_cache[name][:, pos]
                        return x

                    logits = tl.run_with_hooks(clean[None], fwd_hooks=[(name, patch)])
                    out[layer, pos] = logits[0, -1, GOOD] - logits[0, -1, BAD]
        return out

    def handle(task, repeats="3"):
        repeats = int(repeats)
        with torch.no_grad():
            if task == "cache":
                return best(lambda: tl.run_with_cache(batch), repeats)
            if task == "sweep":
                return best(sweep, repeats)
        raise ValueError(task)

    return handle


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", choices=SHAPES)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=None)
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        kind, threads, folder = args.worker.split(":", 2)
        return serve((picogpt_worker if kind == "picogpt" else tl_worker)(threads, folder))

    from picogpt.kernels import target

    print(f"{args.size}, {args.threads} threads each, kernels {target.name()}; best of {args.repeats}", file=sys.stderr)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(args.size, os.path.join(tmp, "float32"))
        for kind in ("picogpt", "tl"):
            worker = Worker(kind, f"{kind}:{args.threads}:{folder}", script=__file__)
            tasks = ("forward", "cache", "sweep") if kind == "picogpt" else ("cache", "sweep")
            for task in tasks:
                results[f"{kind} {task}"] = worker.ask(task, args.repeats)
                print(f"{kind} {task}: {results[f'{kind} {task}']:.3f} s", file=sys.stderr, flush=True)
            worker.process.stdin.close()
            worker.process.wait()
        for task in ("memory-all", "memory-layer", "memory-layer-stop"):
            worker = Worker(task, f"picogpt:{args.threads}:{folder}", script=__file__)
            results[task] = worker.ask(task, 1)
            worker.process.stdin.close()
            worker.process.wait()

    r = results
    mb = lambda b: f"{b / 1e6:.0f} MB"  # noqa: E731
    layer = SHAPES[args.size]["n_layer"] // 2
    print(f"\n{args.size}, random weights, {args.threads} threads each, kernels {target.name()}\n")
    print("| | picogpt | TransformerLens | TransformerLens / picogpt |")
    print("|---|---|---|---|")
    print(f"| plain forward, {BATCH} x {POS} tokens, every position's logits | {r['picogpt forward']:.3f} s | | |")
    print(
        f"| run_with_cache, every name | {r['picogpt cache']:.3f} s ({r['picogpt cache'] / r['picogpt forward']:.2f}x the forward) "
        f"| {r['tl cache']:.3f} s | {r['tl cache'] / r['picogpt cache']:.2f}x |"
    )
    n_layer = SHAPES[args.size]["n_layer"]
    print(
        f"| patching sweep, resid_pre, {n_layer} layers x {SWEEP_POS} positions | {r['picogpt sweep']:.3f} s "
        f"| {r['tl sweep']:.3f} s | {r['tl sweep'] / r['picogpt sweep']:.2f}x |"
    )
    print("\n| run_with_cache of | NumPy's peak (tracemalloc) | kept | returned (logits or residual) |")
    print("|---|---|---|---|")
    for task, what in [
        ("memory-all", "every name"),
        ("memory-layer", f'block {layer}\'s names ("blocks.{layer}")'),
        ("memory-layer-stop", f"block {layer}'s names, stop_at_layer={layer + 1}"),
    ]:
        m = r[task]
        print(
            f"| {what} | {mb(m['peak'])} ({m['peak'] / r['memory-all']['peak']:.2f}x) | {mb(m['kept'])} | {mb(m['out'])} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
