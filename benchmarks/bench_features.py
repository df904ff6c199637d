"""Per-document features (docs/reading.md): what every feature costs on top of plain scoring, and
against computing them as users do today, transformers' logits then the statistics in torch.

    python benchmarks/bench_features.py                          # 100 docs of 10 to 2,000 tokens, best of 3
    python benchmarks/bench_features.py --docs 3 --low 900 --high 1400 --repeats 1   # a quick trial
    python benchmarks/bench_features.py --dtypes float32 int8     # picogpt's int8 rows too

A corpus of random-token documents as bench_corpus.py builds them (lengths log-uniform in --low ..
--high; the ones over gpt2's context of 1,024 are scored in sliding windows, stride 512), gpt2's real
shapes with random weights. Engines, each in a process of its own (workers.py), each over the whole corpus (text in, figures out), interleaved,
best of --repeats (every time is in the JSON), after an untimed warm-up on the 4 shortest documents:
- picogpt plain: `Model.score_many(docs)`, every result consumed;
- picogpt, every one-model feature: `Model.score_many(docs, features=FEATURES)` (below);
- picogpt, Binoculars: `features="binoculars"` with a second random gpt2 (another seed) as the
  observer: two models run, so near 2x plain; reported apart from the 1.15x target;
- transformers plain, for scale: bench_corpus.py's transformers_batched (log_softmax and gather), on
  the batches below;
- the transformers way: the same windows (scoring.windows, stride 512), tokenized by the same
  tokenizer, sorted by length and batched with padding and an attention mask under
  torch.inference_mode as bench_corpus.py's transformers_batched does; then in torch, on each window's
  scored positions: log_softmax over the vocabulary, the token's logprob by gather, rank = 1 +
  (logits > the token's logit).sum(-1), entropy = -(p * logp).sum(-1), variance = (p * (logp +
  H)^2).sum(-1), the top --top by topk (as a reading shows them; picogpt's features compute none);
  then each document's features from those, in torch, by the formulas of picogpt/features.py;
- the transformers way, Binoculars: both models' logits of each batch, the performer's logprobs and
  cross = -(softmax(observer) * log_softmax(performer)).sum(-1), then ppl over the mean cross.
torch runs on as many threads as picogpt may use (threads.available(); --threads fixes both).

The transformers way's features must equal picogpt's float32 ones, document by document (relative
1e-3, absolute below 1; GLTR's counts within --gltr-slack tokens, as ranks among near-tied logits of
random weights may differ by one), else the run fails after printing the table; the largest
differences are printed. int8 rows are compared too but only reported (int8 moves the logits).
Prints a Markdown table and writes the figures to --json. The default run (about 48,000 scored
tokens, 6 engines, 3 repeats) takes near an hour on 2 cores; --docs scales it, and --skip
binoculars transformers-binoculars transformers-plain leaves out the rows outside the two targets.
"""

import argparse
import json
import os
import sys
import tempfile
import time
import zlib

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

FEATURES = "min-k=20,min-k++=20,zlib,entropy,gltr,fast-detect"
ONE = "transformers, one document at a time, ranks by sorting (the tools' code), float32"
TARGET_COST, TARGET_SPEEDUP = 1.15, 3.0  # every feature / plain at most; transformers way / picogpt at least
RTOL = 1e-3


def observer_checkpoint(folder, seed=1):
    """A second random gpt2 (compare_torch.random_checkpoint's, with another seed): Binoculars' observer."""
    import torch
    import transformers
    from compare_torch import SHAPES, save_checkpoint  # tools/checkpoints.py's, as compare_torch imports it

    torch.manual_seed(seed)
    config = transformers.GPT2Config(**SHAPES["gpt2"], attn_implementation="eager")
    return save_checkpoint(transformers.GPT2LMHeadModel(config).eval(), folder)


def checkpoint(folder, make):
    if not os.path.exists(os.path.join(folder, "model.safetensors")):
        make(folder)
    return folder


# ---- picogpt ------------------------------------------------------------------------------------


def picogpt_run(model, docs, features=None, observer=None):
    return list(model.score_many(docs, features=features, observer=observer))


# ---- the transformers way -----------------------------------------------------------------------


def pieces_of(tokenizer, docs, n_ctx, stride):
    """Every window of every document: (document, window's number, its ids, its first scored index)."""
    from bench_corpus import windows_of

    ids = [tokenizer.encode(text, allowed_special="all") for text in docs]  # as picogpt's tokenizer.encode
    out = [
        (d, w, doc[begin:end], first - begin)
        for d, doc in enumerate(ids)
        for w, (begin, first, end) in enumerate(windows_of(len(doc), n_ctx, stride))
    ]
    return ids, out


def batches(pieces, budget):
    """bench_corpus.transformers_batched's batching: sorted by length, as many as fit `budget` tokens."""
    ordered, at = sorted(pieces, key=lambda p: len(p[2])), 0
    while at < len(ordered):
        k = 1
        while at + k < len(ordered) and (k + 1) * len(ordered[at + k][2]) <= budget:
            k += 1
        yield ordered[at : at + k]
        at += k


def padded(torch, batch):
    width = max(len(p[2]) for p in batch)
    ids = torch.tensor([p[2] + [0] * (width - len(p[2])) for p in batch])
    mask = torch.tensor([[1] * len(p[2]) + [0] * (width - len(p[2])) for p in batch])
    return ids, mask


def window_plain(torch, logits, targets, observed, top):
    """Plain scoring (bench_corpus.py's): each scored position's logprob of its token."""
    return (torch.log_softmax(logits, dim=-1).gather(-1, targets[:, None])[:, 0],)


def window_features(torch, logits, targets, observed, top):
    """One window's scored positions: logits [n, vocab] (float32), targets [n] -> logprob, rank,
    entropy, variance [n] (and the top `top`, computed as a reading shows them, then dropped)."""
    logp = torch.log_softmax(logits, dim=-1)
    lp = logp.gather(-1, targets[:, None])[:, 0]
    rank = 1 + (logits > logits.gather(-1, targets[:, None])).sum(-1)
    p = logp.exp()
    entropy = -(p * logp).sum(-1)
    variance = (p * (logp + entropy[:, None]) ** 2).sum(-1)
    if top:
        logp.topk(top, dim=-1)
    return lp, rank, entropy, variance


def window_binoculars(torch, logits, targets, observed, top):
    """The performer's logprob and the cross term -sum q log p, q the observer's softmax."""
    logp = torch.log_softmax(logits, dim=-1)
    return logp.gather(-1, targets[:, None])[:, 0], -(torch.softmax(observed, dim=-1) * logp).sum(-1)


def lowest(torch, values, k):
    n = max(1, int(len(values) * k / 100))
    return float(torch.topk(values, n, largest=False).values.mean())


def doc_features(torch, columns, text):
    """A document's features from its tokens' logprob, rank, entropy, variance (float64), in torch."""
    lp, rank, h, var = columns
    buckets = torch.bucketize(rank, torch.tensor([10, 100, 1000]))  # 0: rank <= 10, ..., 3: beyond 1000
    return {
        "min-k=20": lowest(torch, lp, 20),
        "min-k++=20": lowest(torch, (lp + h) / var.sqrt(), 20),
        "zlib": float(-lp.mean()) / len(zlib.compress(text.encode("utf-8"))),
        "entropy": float(h.mean()),
        "gltr": torch.bincount(buckets, minlength=4).tolist(),
        "fast-detect": float((lp.sum() + h.sum()) / var.sum().sqrt()),
    }


def doc_binoculars(torch, columns, text):  # as the authors' code: perplexity(performer) / entropy(observer, performer)
    lp, cross = columns
    return {"binoculars": float(-lp.mean() / cross.mean())}


TRANSFORMERS = {  # kind: (what each window's scored positions give, a document's features from them)
    "plain": (window_plain, lambda torch, columns, text: None),
    "features": (window_features, doc_features),
    "binoculars": (window_binoculars, doc_binoculars),
}


def transformers_way(kind, hf, tokenizer, docs, n_ctx, stride, top=0, observer=None, budget=2048):
    """Each document's figures as users compute them today: [{nll, features}] (features None for
    plain scoring); observer: the second model's logits of the same batches (Binoculars)."""
    import torch

    per_window, per_doc = TRANSFORMERS[kind]
    ids, pieces = pieces_of(tokenizer, docs, n_ctx, stride)
    stats = [[] for _ in docs]
    with torch.inference_mode():
        for batch in batches(pieces, budget):
            tokens, mask = padded(torch, batch)
            logits = hf(tokens, attention_mask=mask).logits
            observed = None if observer is None else observer(tokens, attention_mask=mask).logits
            for row, (d, w, window, first) in enumerate(batch):
                at = slice(first - 1, len(window) - 1)  # the positions that predict tokens first .. end-1
                seen = None if observed is None else observed[row, at].float()
                got = per_window(torch, logits[row, at].float(), tokens[row, first : len(window)], seen, top)
                stats[d].append((w, got))
        out = []
        for d, text in enumerate(docs):
            if len(ids[d]) < 2:
                out.append({"nll": None, "features": None})
                continue
            ordered = [got for _, got in sorted(stats[d], key=lambda s: s[0])]  # the windows in the text's order
            columns = [torch.cat(c) for c in zip(*ordered)]
            columns = [c.double() if c.is_floating_point() else c for c in columns]
            out.append({"nll": float(-columns[0].mean()), "features": per_doc(torch, columns, text)})
    return out


def one_at_a_time(hf, tokenizer, docs, n_ctx, stride):
    """The features as the published tools' code computes them: one document at a time, each window
    its own pass of one sequence (the Hugging Face perplexity guide's loop, Min-K%'s and GLTR's), and
    each token's rank by sorting the vocabulary, as GLTR's code does (argsort, then where the token
    is); logprob, entropy and variance as above; each document's features by doc_features."""
    import torch
    from bench_corpus import windows_of

    out = []
    with torch.inference_mode():
        for text in docs:
            ids = tokenizer.encode(text, allowed_special="all")
            if len(ids) < 2:
                out.append({"nll": None, "features": None})
                continue
            parts = []
            for begin, first, end in windows_of(len(ids), n_ctx, stride):
                logits = hf(torch.tensor([ids[begin:end]])).logits[0, first - 1 - begin : end - 1 - begin].float()
                targets = torch.tensor(ids[first:end])
                logp = torch.log_softmax(logits, dim=-1)
                order = torch.argsort(logits, dim=-1, descending=True)
                rank = 1 + (order == targets[:, None]).nonzero()[:, 1]
                p = logp.exp()
                entropy = -(p * logp).sum(-1)
                variance = (p * (logp + entropy[:, None]) ** 2).sum(-1)
                parts.append((logp.gather(-1, targets[:, None])[:, 0], rank, entropy, variance))
            columns = [torch.cat(c) for c in zip(*parts)]
            columns = [c.double() if c.is_floating_point() else c for c in columns]
            out.append({"nll": float(-columns[0].mean()), "features": doc_features(torch, columns, text)})
    return out


# ---- checking -----------------------------------------------------------------------------------


def differences(got, want):
    """{figure: the largest difference over the documents}: scalars |a - b| / max(|b|, 1), GLTR the
    largest count apart (tokens), nll of the scored tokens included."""
    worst = {}
    for g, w in zip(got, want):
        if w["nll"] is None:
            continue
        pairs = [("nll", g["nll"], w["nll"])] + [(k, g["features"][k], v) for k, v in (w["features"] or {}).items()]
        for key, a, b in pairs:
            if key == "gltr":
                d = max(abs(x - y) for x, y in zip(a, b))
            else:
                d = abs(a - b) / max(abs(b), 1.0)
            worst[key] = max(worst.get(key, 0), d)
    return worst


def agree(worst, gltr_slack):
    return all(d <= (gltr_slack if key == "gltr" else RTOL) for key, d in worst.items())


# ---- the run ------------------------------------------------------------------------------------


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=100, help="documents in the corpus (default: %(default)s)")
    p.add_argument("--low", type=int, default=10, help="shortest document, tokens (default: %(default)s)")
    p.add_argument("--high", type=int, default=2000, help="longest document, tokens (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="runs of each engine, interleaved; the best counts")
    p.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "int8"], help="picogpt's formats")
    p.add_argument("--top", type=int, default=5, help="the transformers way's topk per position (0: none)")
    p.add_argument(
        "--threads", type=int, default=None, help="fix picogpt's and torch's threads (default: picogpt's own)"
    )
    p.add_argument("--gltr-slack", type=int, default=2, help="GLTR counts may differ by this many tokens")
    p.add_argument(
        "--skip",
        nargs="*",
        default=[],
        choices=["binoculars", "transformers-binoculars", "transformers-plain", "one-at-a-time"],
    )
    p.add_argument("--folder", default=os.path.join(tempfile.gettempdir(), "picogpt-bench-gpt2"))
    p.add_argument("--observer", default=os.path.join(tempfile.gettempdir(), "picogpt-bench-gpt2-observer"))
    p.add_argument("--json", default=os.path.join(HERE, "bench_features.json"))
    args = p.parse_args()

    import numba
    import torch
    import transformers
    from bench_corpus import corpus, job_flops, sgemm_rate
    from compare_torch import random_checkpoint
    from workers import Worker

    import picogpt
    from picogpt import threads
    from picogpt.kernels import target

    cpus = threads.available()
    if args.threads:
        threads.use(args.threads, why="--threads")
    folder = checkpoint(args.folder, lambda f: random_checkpoint("gpt2", f))
    observer_folder = checkpoint(args.observer, observer_checkpoint)
    model = picogpt.load(folder)  # its tokenizer and config: this process times nothing but the sgemm rate
    tokenizer, config = model.tokenizer, model.config
    n_ctx, stride = config["n_positions"], config["n_positions"] // 2
    docs = corpus(np.random.default_rng(0), tokenizer, args.docs, args.low, args.high)
    lengths = [len(tokenizer.encode(t, allowed_special="all")) for t in docs]
    scored = sum(max(0, n - 1) for n in lengths)
    flops, _ = job_flops(lengths, config, stride)
    rate = sgemm_rate()
    limit = scored / (flops / rate)

    engines = table(args)
    setup = os.path.join(tempfile.mkdtemp(prefix="bench-features-"), "setup.json")
    with open(setup, "w") as f:
        json.dump({"args": vars(args), "folder": folder, "observer": observer_folder, "docs": docs}, f)
    print(f"starting {len(engines)} workers, one an engine", file=sys.stderr, flush=True)
    started = {name: Worker(name, f"{setup}#{name}", script=__file__) for name in engines}
    versions = (
        f"picogpt {picogpt.__version__}, numpy {np.__version__}, numba {numba.__version__}, "
        f"torch {torch.__version__}, transformers {transformers.__version__}"
    )
    windowed = sum(n > n_ctx for n in lengths)
    header = [
        f"host: {os.cpu_count()} cores ({cpus.why}), kernels {target.name()}; sgemm {rate / 1e9:.1f} GFLOP/s; {versions}",
        f"threads: picogpt {threads.describe()}, torch {args.threads or cpus.n}; each engine in a process of its own",
        f"corpus: {args.docs} random-token docs of {min(lengths)} to {max(lengths)} tokens ({args.low}-{args.high} "
        f"log-uniform), {windowed} over the context of {n_ctx} (windows, stride {stride}), {scored} scored tokens; "
        f"gpt2's shapes, random weights; best of {args.repeats}; arithmetic limit {limit:.0f} scored tok/s",
        f"features: {FEATURES}; the transformers way also takes the top {args.top} per position",
    ]
    for line in header:
        print(line, file=sys.stderr, flush=True)

    times = {name: [] for name in engines}
    results = {}
    try:
        for worker in started.values():  # warm-up, untimed: picogpt's kernels compiled or loaded; torch's first passes
            worker.ask("warm")
        for r in range(args.repeats):
            for name, worker in started.items():
                time.sleep(1.0)  # the last engine's idle threads stop spinning before this one starts
                answer = worker.ask("all")
                results[name] = answer["results"]
                times[name].append(answer["seconds"])
                print(f"  run {r + 1}: {name}: {answer['seconds']:.2f} s", file=sys.stderr, flush=True)
    finally:
        for worker in started.values():
            worker.close()
    best = {name: min(t) for name, t in times.items()}

    # Equality: every picogpt row against the transformers row of its kind (plain: the nll alone)
    checks, failed = {}, []
    for name, (dtype, kind, _) in engines.items():
        if dtype is None:
            continue
        reference = next((n for n, (d, k, _) in engines.items() if d is None and k == kind), None)
        if reference is None:
            continue
        worst = differences(results[name], results[reference])
        checks[name] = {"against": reference, "largest": worst, "agree": agree(worst, args.gltr_slack)}
        if dtype == "float32" and not checks[name]["agree"]:
            failed.append(name)
    if ONE in results and "picogpt, every feature, float32" in results:  # the same figures, the tools' way
        worst = differences(results["picogpt, every feature, float32"], results[ONE])
        checks[ONE] = {
            "against": "picogpt, every feature, float32",
            "largest": worst,
            "agree": agree(worst, args.gltr_slack),
        }
        if not checks[ONE]["agree"]:
            failed.append(ONE)

    tf = {kind: best[n] for n, (d, kind, _) in engines.items() if d is None}
    rows = []
    print()
    print("\n".join(header))
    print()
    print("| engine | seconds | scored tok/s | cost vs picogpt plain | transformers, same figures / this |")
    print("|---|---|---|---|---|")
    for name, (dtype, kind, _) in engines.items():
        plain = best.get(f"picogpt plain, {dtype or 'float32'}")
        cost = best[name] / plain if plain else float("nan")
        speedup = tf[kind] / best[name] if kind in tf and dtype is not None else None
        rows.append(
            {
                "engine": name,
                "dtype": dtype or "float32",
                "kind": kind,
                "seconds": best[name],
                "all_seconds": times[name],
                "scored_tok_s": scored / best[name],
                "cost_vs_plain": cost,
                "transformers_way_over_this": speedup,
            }
        )
        print(
            f"| {name} | {best[name]:.2f} | {scored / best[name]:.0f} | {cost:.2f}x | "
            + (f"{speedup:.2f}x |" if speedup is not None else "— |")
        )
    print()
    for dtype in args.dtypes:
        cost = best[f"picogpt, every feature, {dtype}"] / best[f"picogpt plain, {dtype}"]
        speedup = tf["features"] / best[f"picogpt, every feature, {dtype}"]
        print(
            f"targets, {dtype}: every feature {cost:.3f}x plain (at most {TARGET_COST}x: "
            f"{'met' if cost <= TARGET_COST else 'MISSED'}); transformers way {speedup:.2f}x its time "
            f"(at least {TARGET_SPEEDUP}x: {'met' if speedup >= TARGET_SPEEDUP else 'MISSED'})"
            + (
                f"; the tools' code one document at a time {best[ONE] / best[f'picogpt, every feature, {dtype}']:.2f}x its time"
                if ONE in best
                else ""
            )
        )
    for name, c in checks.items():
        worst = ", ".join(f"{k} {v:.2g}" for k, v in c["largest"].items())
        verdict = "agree" if c["agree"] else ("DISAGREE" if name in failed else "differ (int8: reported only)")
        print(f"largest differences, {name} against {c['against']}: {worst} -> {verdict}")

    report = {
        "setup": vars(args)
        | {
            "features": FEATURES,
            "cores": os.cpu_count(),
            "cpus": cpus.why,
            "kernels": target.name(),
            "threads": {"picogpt": threads.describe(), "torch": args.threads or cpus.n},
            "versions": versions,
            "sgemm_flops": rate,
            "when": time.strftime("%Y-%m-%d %H:%M"),
        },
        "corpus": {"docs": args.docs, "scored_tokens": scored, "windowed_docs": windowed, "lengths": lengths},
        "arithmetic_limit_tok_s": limit,
        "rows": rows,
        "checks": checks,
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nfigures: {args.json}")
    if failed:
        sys.exit(f"bench_features: the transformers way's features disagree with picogpt's: {', '.join(failed)}")


def table(args):
    """The engines timed, in order: name -> (picogpt's dtype, or None for transformers; kind; make),
    make(folder, observer folder) -> fn(docs) -> each document's results. Only a worker calls make."""
    import picogpt

    def way(kind, observed=False):
        def make(folder, observer):
            import transformers

            load = lambda f: transformers.GPT2LMHeadModel.from_pretrained(f, attn_implementation="sdpa").eval()  # noqa: E731
            hf, model = load(folder), picogpt.load(folder)
            seen = load(observer) if observed else None
            n_ctx = model.config["n_positions"]
            return lambda d: transformers_way(kind, hf, model.tokenizer, d, n_ctx, n_ctx // 2, args.top, seen)

        return make

    def one(folder, observer):
        import transformers

        hf, model = (
            transformers.GPT2LMHeadModel.from_pretrained(folder, attn_implementation="sdpa").eval(),
            picogpt.load(folder),
        )
        n_ctx = model.config["n_positions"]
        return lambda d: one_at_a_time(hf, model.tokenizer, d, n_ctx, n_ctx // 2)

    def on(dtype, features=None, observed=False):
        def make(folder, observer):
            m = picogpt.load(folder, dtype=dtype)
            o = picogpt.load(observer, dtype=dtype) if observed else None
            return lambda d: picogpt_run(m, d, features, o)

        return make

    engines = {}
    for dtype in args.dtypes:
        engines[f"picogpt plain, {dtype}"] = (dtype, "plain", on(dtype))
        engines[f"picogpt, every feature, {dtype}"] = (dtype, "features", on(dtype, FEATURES))
        if "binoculars" not in args.skip:
            engines[f"picogpt, binoculars (2 models), {dtype}"] = (dtype, "binoculars", on(dtype, "binoculars", True))
    if "transformers-plain" not in args.skip:
        engines["transformers plain (log_softmax, gather), float32"] = (None, "plain", way("plain"))
    engines["transformers way, every feature, float32"] = (None, "features", way("features"))
    if "one-at-a-time" not in args.skip:
        engines[ONE] = (None, "one", one)
    if "binoculars" not in args.skip and "transformers-binoculars" not in args.skip:
        engines["transformers way, binoculars (2 models), float32"] = (None, "binoculars", way("binoculars", True))
    return engines


def worker(spec):
    """In an engine's own process: build the engine `spec` names (SETUP.json#NAME), then answer "warm"
    (the 4 shortest documents, untimed by the caller's figures) and "all" with its seconds and results."""
    import torch
    from workers import serve

    from picogpt import threads

    path, name = spec.split("#", 1)
    with open(path) as f:
        setup = json.load(f)
    args = argparse.Namespace(**setup["args"])
    if args.threads:
        threads.use(args.threads, why="--threads")
    torch.set_num_threads(args.threads or threads.available().n)
    fn = table(args)[name][2](setup["folder"], setup["observer"])
    docs = setup["docs"]

    def handle(what):
        chosen = docs if what == "all" else sorted(docs, key=len)[:4]
        start = time.perf_counter()
        results = fn(chosen)
        return {"seconds": time.perf_counter() - start, "results": results}

    serve(handle)


if __name__ == "__main__":
    if "--worker" in sys.argv:
        worker(sys.argv[sys.argv.index("--worker") + 1])
    else:
        main()
