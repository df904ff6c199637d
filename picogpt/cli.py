"""The command line: `picogpt generate "hello world" --model gpt2-medium`."""

import argparse
import contextlib
import gc
import json
import os
import secrets
import signal
import sys
from dataclasses import dataclass

from . import __version__, threads
from .options import FIELDS, FLAGS, SERVE, SamplingParams

DTYPES = ("float32", "float16", "bfloat16", "int8")  # formats.DTYPES, without importing NumPy before --threads
KV_DTYPES = ("float32", "float16")  # model.KV_DTYPES, without importing NumPy before --threads
DTYPE_HELP = "weight format: float32, float16 (half the bytes, the fast 16-bit one), bfloat16 or int8 (blocks of 32 with a scale each)"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other picogpt error, instead of usage + message
        self.exit(2, f"picogpt: error: {message} (see {self.prog} --help)\n")


def model_options(p, run=True):
    p.add_argument(
        "--model",
        "-m",
        default="gpt2",
        help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny (ships with picogpt), a hub repo id (org/name) or a local folder (default: %(default)s)",
    )
    p.add_argument("--revision", default=None, help="a branch, tag or commit of a hub model (default: main)")
    if run:
        p.add_argument(
            "--dtype",
            choices=DTYPES,
            default=None,
            help=f"{DTYPE_HELP} (default: as the checkpoint holds it, float32 for ordinary checkpoints)",
        )
        p.add_argument(
            "--kv-dtype",
            choices=KV_DTYPES,
            default="float32",
            help="the KV cache's format: float32, or float16 (half the memory per sequence and half the bytes attention reads; logits change slightly) (default: %(default)s)",
        )
        p.add_argument(
            "--threads",
            type=int,
            default=None,
            help="CPU threads for the kernels and BLAS (default: all cores, or NUMBA_NUM_THREADS)",
        )
        p.add_argument(
            "--backend",
            choices=["numba", "numpy"],
            default="numba",
            help="numba kernels, or the pure NumPy reference (default: %(default)s)",
        )


def corpus_options(p, field, output):
    p.add_argument(
        "--jsonl",
        nargs="+",
        metavar="FILE",
        help=f"read a corpus instead: JSON Lines (.jsonl, .jsonl.gz; - for stdin), one object per line, and write {output}, in input order",
    )
    p.add_argument(
        "--output",
        "-o",
        metavar="OUT.jsonl",
        help="with --jsonl: write the lines here (default: stdout); a file that exists is continued where it stopped",
    )
    p.add_argument("--field", default=field, help="with --jsonl: the field that holds the text (default: %(default)s)")
    p.add_argument(
        "--id-field",
        default="id",
        help="with --jsonl: the field copied to each output line as its id, else the line number (default: %(default)s)",
    )
    p.add_argument(
        "--ray",
        nargs="?",
        const="local",
        metavar="ADDRESS",
        help="with --jsonl: run through Ray Data, on the cluster at ADDRESS or a local one (needs pip install 'picogpt[ray]')",
    )


class Failed(Exception):
    """A problem found while running a command: its message is the one line the user sees."""


class BadOption(Failed):
    """An option value that only the loaded model shows to be wrong: exit 2, as for any bad option."""


def parser():
    # One option a line, as --help lists them:
    # fmt: off
    p = Parser(prog="picogpt", description="GPT-2 inference in NumPy.")
    p.add_argument("--version", action="version", version=f"picogpt {__version__}")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = commands.add_parser("generate", help="continue a prompt and stream the text to stdout", description="Continue PROMPT with a GPT-2 model, streaming the new text to stdout as it is decoded.")
    g.add_argument("prompt", nargs="?", help='the text to continue; "" starts a new text from <|endoftext|>, - reads it from stdin')
    model_options(g)
    g.add_argument("--max-new-tokens", "-n", type=int, default=FIELDS["max_new_tokens"].default, help="generate at most this many tokens (default: %(default)s)")
    g.add_argument("--temperature", "-t", type=float, default=FIELDS["temperature"].default, help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=FIELDS["top_k"].default, help="sample from the k most likely tokens only (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=FIELDS["top_p"].default, help="sample from the smallest set of tokens whose probability reaches p; 1 turns it off (default: %(default)s)")
    g.add_argument("--repetition-penalty", type=float, default=FIELDS["repetition_penalty"].default, help="divide the positive logits of tokens already in the text by P, multiply the negative ones, as transformers does; 1 turns it off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text (default: a fresh one each run, which --json and --jsonl report)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before this text appears; may be given more than once (default: none)")
    g.add_argument("--num-samples", type=int, default=1, help="how many continuations, decoded together as one batch (sample i uses seed + i) and separated by a line of dashes (default: %(default)s)")
    g.add_argument("--json", action="store_true", help="print one JSON object per sample (text, token ids, finish reason, counts, timings) and nothing else")
    g.add_argument("--logprobs", action="store_true", help="with --json: each new token's log-probability under the model")
    g.add_argument("--verbose", "-v", action="store_true", help="print prompt and generation speed (tokens/s) to stderr (default: off)")
    corpus_options(g, "prompt", "each line's continuation: id, text, finish_reason, prompt_tokens, generated_tokens, seed (line i, counting from 0, samples with --seed + i)")
    g.add_argument("--rows", type=int, default=8, help="with --jsonl: prompts decoded together; a finished row takes the next prompt at once (default: %(default)s)")
    g.add_argument("--steer", metavar="FILE.npy", default=None, help="add this vector (a NumPy .npy file of n_embd numbers, for instance from Model.direction) to the residual stream at every position, as llama.cpp's control vectors do; see docs/inside.md")
    g.add_argument("--steer-layer", type=int, default=None, metavar="L", help="with --steer: add it before block L (its hook_resid_pre; default: the middle block)")
    g.add_argument("--steer-scale", type=float, default=1.0, metavar="S", help="with --steer: multiply it by S first (default: %(default)s)")
    s = commands.add_parser("score", help="perplexity of a text file", description="Score FILE's text: token count, mean negative log-likelihood, perplexity, bits per byte. Texts longer than the context slide a window of the context length by --stride tokens.")
    s.add_argument("file", nargs="?", help="a UTF-8 text file, or - for standard input")
    model_options(s)
    s.add_argument("--stride", type=int, default=None, help="tokens between the starts of windows (default: half the context)")
    s.add_argument("--json", action="store_true", help="print the totals and every token's id, text and log-probability as JSON")
    s.add_argument("--tokens", action="store_true", help="each token as the model read it: its text, id, log-probability, rank (1: the model's first choice), the entropy of the distribution (nats) and the --top most likely tokens; with --json, a \"tokens\" list (see docs/reading.md)")
    s.add_argument("--top", type=int, default=5, metavar="K", help="with --tokens: how many of the most likely tokens to show at each position, 0 to 100 (default: %(default)s)")
    s.add_argument("--features", metavar="LIST", default=None, help="per document figures, comma-separated: min-k=K, min-k++=K (K a percentage, default 20), zlib, entropy, gltr, fast-detect, binoculars (needs --observer); in the totals, --json and each --jsonl line (see docs/reading.md)")
    s.add_argument("--observer", metavar="MODEL", default=None, help="the second model of binoculars, sharing the tokenizer (for instance gpt2 beside --model gpt2-medium); loaded with --model's --dtype and --backend")
    corpus_options(s, "text", "each document's id, tokens, scored_tokens, nll, perplexity, bits_per_byte, bytes; null figures and a reason for one under 2 tokens; an error for a bad line")
    s.add_argument("--buckets", action="store_true", help="with --jsonl and -o: tag each document head, middle or tail by this run's perplexity terciles, as CCNet does (the cutoffs are printed)")
    i = commands.add_parser("info", help="a model's config, size, files and memory needs", description="Print MODEL's config, parameter count, files (where they are cached) and the memory its weights need in each dtype.")
    model_options(i, run=False)
    i.add_argument("--check", action="store_true", help="also scan every tensor for NaN and infinite values and name the bad ones")
    i.add_argument("--json", action="store_true", help="print it as JSON")
    v = commands.add_parser("serve", help="serve a model over HTTP with OpenAI's completions API", description="Serve MODEL over HTTP with OpenAI's completions API (/v1/completions, streaming included), decoding the requests together (continuous batching). Ctrl-C or SIGTERM stops it; running requests end with what they have.")
    model_options(v)
    v.add_argument("--host", default=SERVE["host"], help="the address to listen on (default: %(default)s; 0.0.0.0 for every interface)")
    v.add_argument("--port", type=int, default=SERVE["port"], help="the port to listen on (default: %(default)s)")
    v.add_argument("--parallel", type=int, default=SERVE["parallel"], help="the most sequences decoded together: rows of the KV cache (default: %(default)s)")
    v.add_argument("--queue", type=int, default=SERVE["queue"], help="the most sequences waiting beyond --parallel; more get 429 (default: %(default)s)")
    v.add_argument("--cache-mb", type=int, default=SERVE["cache_mb"], help="megabytes of KV cache rows beyond --parallel's that keep finished requests' keys and values for later prompts that begin the same way (default: %(default)s; the batch's free rows keep them too)")
    v.add_argument("--no-prefix-cache", dest="prefix_cache", action="store_false", help="compute every prompt whole, sharing nothing with earlier requests")
    v.add_argument("--chunk", type=int, default=SERVE["chunk"], help="the most prompt tokens one step prefills, 1 to 256 (default: no cap: a budget from the step times measured keeps a step beside running streams within about 2.5x a decoding step, and prefills a lone prompt at once; see docs/serving.md)")
    d = commands.add_parser("download", help="fetch and check a hub model ahead of time, so later runs work offline", description="Fetch NAME from the Hugging Face hub into its cache (or refresh it there), read every safetensors header and check the shapes against config.json.")
    d.add_argument("name", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2 or a hub repo id (org/name)")
    d.add_argument("--revision", default=None, help="a branch, tag or commit (default: main)")
    c = commands.add_parser("convert", help="convert a model's weights once and save them in a folder", description="Convert MODEL's weights to --dtype and write a checkpoint folder that `--model OUT_FOLDER` loads memory-mapped, with nothing to convert at load time.")
    c.add_argument("model", help="gpt2, gpt2-medium, ..., tiny, a hub repo id (org/name) or a local folder")
    c.add_argument("out_folder", help="the folder to write (config.json, model.safetensors, vocab.json, merges.txt)")
    c.add_argument("--dtype", choices=DTYPES, required=True, help=DTYPE_HELP)
    # fmt: on
    return p


@dataclass(frozen=True)
class Plan:
    """What `check` makes of the options: the commands read it beside `args`, which stays as parsed."""

    threads: int | None = None  # --threads, at most the cores here (None: not given)
    params: SamplingParams | None = None  # generate's sampling flags; the seed is --seed's or one drawn
    steer_vector: object = None  # generate --steer's vector (a NumPy array), read


def params_of(args, seed):
    """The SamplingParams of `generate`'s flags, with `seed`: ValueError naming the flag of a bad value."""
    if args.stop is not None and not all(args.stop):
        raise ValueError("--stop needs a non-empty text")
    return SamplingParams.named(FLAGS, **{field: getattr(args, field) for field in FLAGS} | {"seed": seed})


def check(args):
    """Reject bad options before spending time on loading a model; the Plan the command runs by."""
    if args.command == "convert":
        if os.path.exists(args.out_folder) and not os.path.isdir(args.out_folder):
            raise ValueError(
                f"{args.out_folder} is a file, not a folder: give OUT_FOLDER a folder to write (it is made if missing)"
            )
        if os.path.exists(os.path.join(args.out_folder, "model.safetensors")):
            raise ValueError(f"{args.out_folder} already holds a model.safetensors: remove it or pick another folder")
        return Plan()
    n_threads = getattr(args, "threads", None)
    if n_threads is not None and n_threads < 1:
        raise ValueError(f"--threads must be >= 1, got {n_threads}")
    if n_threads is not None and n_threads > cores():
        print(
            f"picogpt: --threads {n_threads} is more than the {plural(cores(), 'core')} here: using {cores()}",
            file=sys.stderr,
        )
        n_threads = cores()
    if args.command == "serve":
        for flag, value, low, high in [
            ("--port", args.port, 0, 65535),
            ("--parallel", args.parallel, 1, 256),
            ("--queue", args.queue, 0, 100000),
            ("--chunk", args.chunk, 1, 256),
            ("--cache-mb", args.cache_mb, 0, 1_000_000),
        ]:
            if value is not None and not low <= value <= high:  # --chunk: None is no cap
                raise ValueError(f"{flag} must be from {low} to {high}, got {value}")
        return Plan(n_threads)
    if args.command in ("score", "generate"):
        check_corpus(args)
    if args.command == "score":
        check_reading(args)
    if args.command != "generate":
        return Plan(n_threads)
    # --seed, or a seed of its own, reported (--json, --jsonl lines) so the run can be repeated
    params = params_of(args, secrets.randbits(32) if args.seed is None else args.seed)
    if args.logprobs and not args.json:
        raise ValueError("--logprobs goes with --json: add --json")
    vector = steer_vector(args)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    return Plan(n_threads, params, vector)


def steer_vector(args):
    """--steer's vector, read now (its length and layer are checked against the model once loaded)."""
    if args.steer is not None and getattr(args, "ray", False):
        raise ValueError("--steer does not go with --ray (the actors load their own models): run without --ray")
    if args.steer is None:
        if args.steer_layer is not None or args.steer_scale != 1.0:
            raise ValueError("--steer-layer and --steer-scale go with --steer FILE.npy: add it")
        return None
    import numpy as np

    try:
        vector = np.load(args.steer, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(
            f"--steer {args.steer}: not a NumPy .npy file of numbers ({e}); write one with numpy.save"
        ) from None
    if vector.ndim != 1 or vector.dtype.kind not in "fiu" or not np.isfinite(vector).all():
        raise ValueError(
            f"--steer {args.steer}: it must hold one row of finite numbers, got {vector.dtype} {vector.shape}"
        )
    if not np.isfinite(args.steer_scale):
        raise ValueError(f"--steer-scale must be a finite number, got {args.steer_scale}")
    return vector


def steer_of(args, plan, model):
    """The Steer --steer asks for, on the loaded model: BadOption (exit 2) if it does not fit."""
    if plan.steer_vector is None:
        return None
    from .inside import Steer

    layer = model.config["n_layer"] // 2 if args.steer_layer is None else args.steer_layer
    try:
        return Steer(plan.steer_vector, layer, args.steer_scale).checked(model.config)
    except ValueError as e:
        raise BadOption(f"--steer: {e}") from None


def check_corpus(args):
    """One input: a text (or prompt), or --jsonl files; the corpus options only with --jsonl."""
    text = "file" if args.command == "score" else "prompt"
    given = getattr(args, text)
    if (given is None) == (args.jsonl is None):
        raise ValueError(f"give either {text.upper()} or --jsonl FILE..., not {'both' if given else 'neither'}")
    if args.jsonl is None:
        for flag, value in [
            ("--output", args.output),
            ("--ray", args.ray),
            ("--buckets", getattr(args, "buckets", False)),
        ]:
            if value:
                raise ValueError(f"{flag} goes with --jsonl: add --jsonl FILE...")
        return
    if args.json or getattr(args, "logprobs", False) or getattr(args, "num_samples", 1) != 1:
        raise ValueError("--jsonl writes JSON lines of its own: leave out --json, --logprobs and --num-samples")
    if getattr(args, "buckets", False) and not args.output:
        raise ValueError("--buckets needs -o OUT.jsonl: the tags come from the whole run, written once it ends")
    if args.ray and "-" in args.jsonl:
        raise ValueError("--ray reads files: give their paths rather than - (standard input)")
    if args.output and args.output in args.jsonl:
        raise ValueError(f"-o {args.output} is also an input: pick another -o")
    if getattr(args, "rows", 1) < 1 or getattr(args, "rows", 1) > 256:
        raise ValueError(f"--rows must be from 1 to 256, got {args.rows}")


def check_reading(args):
    """score's --stride, --tokens, --top, --features and --observer, before any model loads."""
    from .api import parse_features

    if args.stride is not None and args.stride < 1:
        raise ValueError(f"--stride must be >= 1, got {args.stride}")
    if not 0 <= args.top <= 100:
        raise ValueError(f"--top must be from 0 to 100, got {args.top}")
    if args.tokens and args.jsonl:
        raise ValueError("--tokens reads one FILE; for a corpus, --features gives each document's figures")
    if args.observer and "binoculars" not in (args.features or ""):
        raise ValueError("--observer goes with --features binoculars")
    if args.features is not None:
        parse_features(args.features, args.observer or None)


def job_of(args):
    """The corpus.Job of score --jsonl or generate --jsonl."""
    from . import corpus

    return corpus.Job(
        args.jsonl, args.output, args.field, args.id_field, getattr(args, "stride", None),
        getattr(args, "buckets", False), getattr(args, "rows", 8), getattr(args, "features", None),
        getattr(args, "observer", None),
    )  # fmt: skip


def corpus(args, plan, interrupt):
    """score --jsonl or generate --jsonl: a result line for each input line (corpus.py), a progress bar,
    and one line on stderr at the end."""
    import time

    from tqdm import tqdm

    from . import corpus
    from .log import warn

    job = job_of(args)
    scoring = args.command == "score"
    total = corpus.size_of(args.jsonl)
    bar = tqdm(
        total=total,
        unit="B",
        unit_scale=True,
        desc="scoring" if scoring else "generating",
        file=sys.stderr,
        disable=None,
    )
    start, said = time.perf_counter(), [0.0]

    def progress(counts):
        interrupt.poll()
        now = time.perf_counter()
        if now - said[0] > 0.5:  # the bar's figures, twice a second at most
            said[0], took = now, max(now - start, 1e-9)
            done = counts.get("done", 0) + counts.get("short", 0) + counts.get("bad", 0)
            bar.set_postfix_str(f"{done / took:.1f} docs/s, {counts.get('tokens', 0) / took:.0f} tok/s", refresh=False)
            bar.update(progress.where[0] - bar.n if progress.where else 0)

    progress.where = []
    try:
        if args.ray:
            from . import ray as on_ray

            counts = on_ray.run(job, args, plan, progress)
        else:
            from .api import load

            model = load(
                args.model, backend=args.backend, dtype=args.dtype, revision=args.revision, kv_dtype=args.kv_dtype
            )
            counts = (
                corpus.score(model, job, progress, observer=observer_of(args, model))
                if scoring
                else corpus.generate(model, job, plan.params, progress, steer=steer_of(args, plan, model))
            )
    except corpus.CorpusError as e:
        raise Failed(str(e)) from None
    finally:
        bar.close()
    took = time.perf_counter() - start
    where = f"; wrote {args.output}" if args.output else ""
    n = counts.get("done", 0)
    if scoring:
        warn(
            f"scored {plural(n, 'document')} ({plural(counts.get('tokens', 0), 'token')}, {counts.get('tokens', 0) / took:.0f} tokens/s), "
            f"{counts.get('short', 0)} too short, {plural(counts.get('bad', 0), 'bad line')}{where}"
        )
        if job.buckets:
            cutoffs = corpus.buckets(args.output)
            if cutoffs:
                warn(f"buckets by perplexity: head <= {cutoffs[0]:.3f} < middle <= {cutoffs[1]:.3f} < tail")
    else:
        warn(
            f"generated for {plural(n, 'prompt')} ({plural(counts.get('tokens', 0), 'token')}, {counts.get('tokens', 0) / took:.0f} tokens/s), "
            f"{plural(counts.get('bad', 0), 'bad line')}{where}"
        )


def generate(args, plan, interrupt):
    if args.jsonl:
        return corpus(args, plan, interrupt)
    from .api import load
    from .log import warn

    prompt = read_text("-") if args.prompt == "-" else args.prompt
    model = load(args.model, backend=args.backend, dtype=args.dtype, revision=args.revision, kv_dtype=args.kv_dtype)
    params, steer = plan.params, steer_of(args, plan, model)
    if args.json:  # one JSON object per sample, when the batch is done, and nothing else on stdout
        samples = model.complete([prompt] * args.num_samples, logprobs=args.logprobs, params=params, steer=steer)
        for i, sample in enumerate(samples):
            seed = params.seed + i  # check drew one if --seed was not given
            print(
                json.dumps({"sample": i, "seed": seed, **sample, "model": args.model, "dtype": model.dtype}), flush=True
            )
        return
    stats, later = {}, [""] * args.num_samples
    # --num-samples N: one batch of N rows, row i sampled with seed + i. Row 0 streams as it is decoded,
    # the others print when the batch is done (they finish at about the same time).
    for row, piece in model.stream([prompt] * args.num_samples, params, stats=stats, steer=steer):
        interrupt.poll()
        if row == 0:
            print(piece, end="", flush=True)
            interrupt.open_line = bool(piece) and not piece.endswith("\n")
        else:
            later[row] += piece
    print(flush=True)
    interrupt.open_line = False
    for text in later[1:]:
        print("-" * 40)
        print(text, flush=True)
    if args.verbose and stats:
        prompt_rate = stats["prompt_tokens"] / max(stats["prefill_seconds"], 1e-9)
        decode_rate = stats["new_tokens"] / max(stats.get("decode_seconds", 0), 1e-9)
        compiled = (
            f"kernels compiled in {stats['compile_seconds']:.1f} s (once); " if stats.get("compile_seconds") else ""
        )
        warn(
            f"{compiled}prompt: {plural(stats['prompt_tokens'], 'token')} in {stats['prefill_seconds']:.2f} s ({prompt_rate:.1f} tokens/s); "
            f"generated: {plural(stats['new_tokens'], 'token')} in {stats.get('decode_seconds', 0):.2f} s ({decode_rate:.1f} tokens/s"
            f"{f', {args.num_samples} rows at once' if args.num_samples > 1 else ''}); "
            f"{args.backend} backend, {model.dtype} weights, {threads.describe(args.backend == 'numba')}"
            f"{f', {threads.used()}' if threads.used() else ''}"
            f"{'' if model.kv_dtype == 'float32' else f', {model.kv_dtype} KV cache'}"
        )


def convert(args):
    from .checkpoint import converted, hub
    from .log import warn

    converted.write(
        hub.resolve(args.model), args.dtype, args.out_folder
    )  # tensor by tensor, the way --dtype keeps its copies
    size = os.path.getsize(os.path.join(args.out_folder, "model.safetensors"))
    warn(f"wrote {args.out_folder}: {args.dtype} weights, {size / 1e6:.1f} MB; load it with --model {args.out_folder}")


def observer_of(args, model):
    """score's --observer, loaded as --model is (None without one); BadOption unless it shares
    `model`'s tokenizer."""
    from .api import load

    if not getattr(args, "observer", None):
        return None
    observer = load(
        args.observer, backend=args.backend, dtype=args.dtype, revision=args.revision, kv_dtype=args.kv_dtype
    )
    try:
        model.observer_rows(observer)
    except ValueError as e:
        raise BadOption(f"--observer {args.observer}: {e}") from None
    return observer


def score(args, plan, interrupt):
    if args.jsonl:
        return corpus(args, plan, interrupt)
    from tqdm import tqdm

    from . import features
    from .api import load
    from .reading import Reading, piece
    from .scoring import summary

    text = read_text(args.file)
    model = load(args.model, backend=args.backend, dtype=args.dtype, revision=args.revision, kv_dtype=args.kv_dtype)
    ids = model.tokenizer.encode(text, allowed_special="all")
    n_ctx = model.config["n_positions"]
    stride = n_ctx // 2 if args.stride is None else args.stride
    if len(ids) < 2:
        raise Failed(
            f"{'standard input' if args.file == '-' else args.file} holds {plural(len(ids), 'token')}; scoring needs at least 2"
        )
    if stride >= n_ctx:
        raise BadOption(f"--stride must be less than the model's context of {n_ctx} tokens, got {stride}")
    observer = observer_of(args, model)
    with tqdm(
        total=max(len(ids) - 1, 0),
        unit="tok",
        desc="scoring",
        file=sys.stderr,
        disable=True if len(ids) <= n_ctx else None,
    ) as bar:
        progress = lambda n: (interrupt.poll(), bar.update(n))  # noqa: E731
        if args.tokens or args.features:
            records = model.records(ids, args.top if args.tokens else 0, stride, observer, progress)
            logprobs = records["logprob"]
        else:
            logprobs = model.logprobs(ids, stride, progress=progress)
    totals = {
        "model": args.model,
        "dtype": model.dtype,
        **summary(model.tokenizer, ids, logprobs),
        "n_ctx": n_ctx,
        "stride": stride,
    }
    if args.features:
        totals["features"] = features.of(records, text.encode("utf-8"), features.parse(args.features))
    reading = Reading.of(model.tokenizer, ids, records) if args.tokens else None
    if args.json:
        pieces = [piece(model.tokenizer, t) for t in ids]
        tokens = [
            {"id": t, "text": p, "logprob": None if i == 0 else float(lp)}
            for i, (t, p, lp) in enumerate(zip(ids, pieces, logprobs))
        ]
        more = {"tokens": reading.rows(model.tokenizer)} if reading else {}
        print(json.dumps({**totals, "token_logprobs": tokens, **more}))
        return
    if reading:
        print_reading(model.tokenizer, reading)
    print(
        f"tokens        {totals['tokens']} ({totals['scored_tokens']} scored, {totals['bytes']} bytes; windows of {n_ctx} tokens, stride {stride})"
    )
    print(f"nll           {totals['nll']:.4f} nats per token")
    print(f"perplexity    {totals['perplexity']:.3f}")
    print(f"bits per byte {totals['bits_per_byte']:.4f}")
    for key, value in totals.get("features", {}).items():
        print(f"{key:<13} {value if isinstance(value, list) else f'{value:.4f}'}")


def print_reading(tokenizer, reading):
    """score --tokens: a line a token, its text quoted as JSON does (spaces and newlines seen)."""
    from .reading import piece

    print(f"{'token':<16} {'id':>6} {'logprob':>8} {'rank':>6} {'entropy':>7}  top")
    for i, (token, t) in enumerate(zip(reading.tokens, reading.ids)):
        shown = json.dumps(token, ensure_ascii=False)
        if i == 0:
            print(f"{shown:<16} {t:>6}")
            continue
        top = ", ".join(
            f"{json.dumps(piece(tokenizer, a), ensure_ascii=False)} {lp:.2f}"
            for a, lp in zip(reading.top[i], reading.top_logprob[i])
        )
        print(f"{shown:<16} {t:>6} {reading.logprob[i]:>8.3f} {reading.rank[i]:>6} {reading.entropy[i]:>7.3f}  {top}")


def info(args, interrupt):
    from .checkpoint import manage

    about = manage.info(args.model, args.revision) | {"threads": threads.describe()}
    if args.check:
        from tqdm import tqdm

        total = sum(size for name, size in about["files"].items() if name.endswith(".safetensors"))
        with tqdm(total=total, unit="B", unit_scale=True, desc="checking", file=sys.stderr, disable=None) as bar:
            about["non_finite"] = manage.check(about["folder"], progress=lambda n: (interrupt.poll(), bar.update(n)))
    if args.json:
        print(json.dumps(about))
    else:
        mb = lambda n: f"{n / 1e6:,.1f} MB" if n >= 1e6 else f"{n / 1e3:,.1f} kB"  # noqa: E731
        print(f"model       {args.model}" + (f" (revision {args.revision})" if args.revision else ""))
        print(
            f"config      {about['n_layer']} layers, {about['n_head']} heads, width {about['n_embd']}, context {about['n_positions']}, vocabulary {about['vocab_size']}"
        )
        print(f"parameters  {about['parameters']:,}")
        print(f"stored as   {about['stored_as']}")
        print(f"folder      {about['folder']}")
        for name, size in about["files"].items():
            print(f"  {name:<34} {mb(size):>10}")
        print("weights in  " + ", ".join(f"{dtype} {mb(n)}" for dtype, n in about["memory"].items()))
        print(f"threads     {about['threads']}")
        for i, (dtype, copy) in enumerate(about["converted"].items()):  # what --dtype has kept (converted.py)
            print(f"{'converted' if i == 0 else '':<12}{dtype:<9}{mb(copy['bytes']):>10}  {copy['folder']}")
        if args.check:
            print(
                "check       "
                + (
                    ", ".join(f"{name}: {n} NaN or infinite" for name, n in about["non_finite"].items())
                    or "every tensor is finite"
                )
            )
    if about.get("non_finite"):
        n = len(about["non_finite"])
        raise Failed(
            f"{n} tensor{'s hold' if n > 1 else ' holds'} NaN or infinite values ({', '.join(about['non_finite'])}): the checkpoint is damaged; download or save it again"
        )


def download(args):
    from .checkpoint import manage
    from .log import warn

    folder = manage.download(args.name, args.revision)
    size = sum(os.path.getsize(os.path.join(folder, f)) for f in manage.hub.checkpoint_files(folder))
    warn(
        f"{args.name} is ready in {folder} ({size / 1e6:,.1f} MB, checked against its config): it now loads with no network"
    )


def serve(args):
    from .serve import http as server

    # uvicorn takes SIGINT and SIGTERM while it serves and raises them again once it has stopped: ignored
    # then, so a clean stop exits 0.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if args.backend != "numba":
        raise Failed("serve runs on the numba backend: leave out --backend")
    server.serve(
        args.model, args.dtype, args.revision, args.host, args.port, args.parallel, args.queue, args.chunk,
        kv_dtype=args.kv_dtype, prefix_cache=args.prefix_cache, cache_mb=args.cache_mb,
    )  # fmt: skip


def read_text(path):
    """The text of a file, or of standard input for "-": UTF-8, strictly, whatever the locale says."""
    name = "standard input" if path == "-" else path
    if path == "-":
        data = sys.stdin.buffer.read()
    else:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError as e:  # no such file, a folder, no permission
            raise Failed(f"cannot read {path}: {e.strerror}: give a text file, or - for standard input") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise Failed(f"{name} is not UTF-8 text ({e.reason} at byte {e.start}): convert it to UTF-8") from None


def plural(n, word):
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def cores():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def main(argv=None, interrupt=None):
    """The command `argv` asks for; its exit code. `interrupt`: entry's, which its SIGINT handler sets (a
    call from Python without one gets one of its own, which nothing sets)."""
    interrupt = Interrupt() if interrupt is None else interrupt
    try:
        args = parser().parse_args(argv)
        try:
            plan = check(args)
        except ValueError as e:
            print(f"picogpt: error: {e}", file=sys.stderr)
            return 2
        if plan.threads:  # before NumPy (OpenBLAS) and Numba read them at load time
            for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                os.environ[name] = str(plan.threads)
            threads.use(plan.threads, why="--threads")  # fixed: not adapted to the load
        from .checkpoint.params import CheckpointError
        from .sampling import NonFiniteError
        from .tokenizer import TokenizerError

        try:
            {
                "generate": lambda: generate(args, plan, interrupt),
                "score": lambda: score(args, plan, interrupt),
                "info": lambda: info(args, interrupt),
                "download": lambda: download(args),
                "convert": lambda: convert(args),
                "serve": lambda: serve(args),
            }[args.command]()
        except BrokenPipeError:  # e.g. piped into `head`: not an error worth a message
            sys.stderr.close()
            return 1
        except (CheckpointError, TokenizerError, OSError, NonFiniteError, Failed) as e:
            message = str(e).replace(
                "--model MODEL", f"--model {getattr(args, 'model', 'MODEL')}"
            )  # NaN logits: name the model
            print(f"picogpt: error: {message}", file=sys.stderr)
            return 2 if isinstance(e, BadOption) else 1
        interrupt.poll()  # a Ctrl-C that a C callback swallowed near the end
    except BaseException as e:
        # Ctrl-C comes as a KeyboardInterrupt, or wrapped in another error where Python raised it: a
        # SystemError as a compiled kernel returns, a RuntimeError inside a class being defined (an
        # import). Any error after Ctrl-C is the interrupt's doing.
        if interrupt.stopped or any(isinstance(x, KeyboardInterrupt) for x in (e, e.__cause__, e.__context__)):
            return interrupt.interrupted(e)
        raise
    return 0


class Interrupt:
    """Ctrl-C in the `picogpt` command: `stop`, the SIGINT handler, and the hooks `install` sets beside it
    remember it; `poll`, called at each piece of output or progress, raises it; `interrupted` says so."""

    def __init__(self):
        self.stopped = []  # the signal, once Ctrl-C is pressed (the picogpt command only)
        self.kept = []  # what an interrupt cut short, never freed (see `interrupted`)
        self.open_line = False  # True while streamed text on stdout has no newline at its end

    def install(self):
        signal.signal(signal.SIGINT, self.stop)
        sys.unraisablehook, sys.excepthook = self.unraisable, self.excepthook

    def stop(self, signum, frame):
        """Ctrl-C: raise KeyboardInterrupt once, and remember it. Python runs this handler between any two
        bytecodes, including those of a callback from C (LLVM's object cache, as Numba loads a cached
        kernel), which would print the exception as ignored and go on: there, only remember it, and
        `poll` raises it at the next piece of output or progress. Finalizers and weakref callbacks
        (`__del__`, importlib's module locks) swallow it the same way: `unraisable` keeps them quiet."""
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C while stopping: ignored
        gc.disable()  # nor is anything collected from here to the end (see `interrupted`)
        self.stopped.append(signum)
        while frame is not None:
            if frame.f_code.co_name.startswith("_raw_object_cache"):  # llvmlite's callbacks
                return
            frame = frame.f_back
        raise KeyboardInterrupt

    def unraisable(self, info):
        """sys.unraisablehook: a Ctrl-C that landed in a finalizer or a callback, which Python can only
        report, is already in `stopped` for `poll`; after a Ctrl-C, a finalizer's error is the debris of
        what it cut short (llvmlite's PassBuilder, interrupted in its constructor while Numba compiled,
        has no handle for its __del__ to free); anything else is reported as usual."""
        if not (self.stopped or issubclass(info.exc_type, KeyboardInterrupt)):
            sys.__unraisablehook__(info)

    def excepthook(self, kind, value, traceback):
        """sys.excepthook, which only C code calls here (PyErr_Print: an import made from C that the Ctrl-C
        landed in): the interrupt is already in `stopped`; anything else is reported as usual."""
        if not (self.stopped and issubclass(kind, KeyboardInterrupt)):
            sys.__excepthook__(kind, value, traceback)

    def poll(self):
        if self.stopped:
            raise KeyboardInterrupt

    def interrupted(self, error=None):
        """Print that the command was interrupted; 130, its exit code. `error`, the interrupt, is kept with
        the frames its traceback holds until the process ends (`entry` ends it with os._exit, freeing
        nothing): freeing what the Ctrl-C cut short, such as a kernel Numba was loading from its cache,
        could crash the process after this line (a score --jsonl run once ended so, by SIGSEGV)."""
        self.kept.append(error)
        if self.open_line:  # keep what was printed, end its line; a --json run's stdout holds whole objects only
            print(flush=True)
        print("picogpt: interrupted", file=sys.stderr, flush=True)
        return 130


def entry():
    """The `picogpt` command: main() under Interrupt.stop, then out without Python's slow shutdown, during
    which a Ctrl-C would kill the process (its handlers are reset to the default by then)."""
    interrupt = Interrupt()  # held until os._exit, with what it keeps
    interrupt.install()
    try:
        code = main(interrupt=interrupt)
    except KeyboardInterrupt as e:  # between main's last line and this one
        code = interrupt.interrupted(e)
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    entry()
