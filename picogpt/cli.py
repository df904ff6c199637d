"""The command line: `picogpt generate "hello world" --model gpt2-medium`."""

import argparse
import os
import sys


DTYPES = ("float32", "float16", "bfloat16", "int8")  # formats.DTYPES, without importing NumPy before --threads
DTYPE_HELP = "weight format: float32, float16 (half the bytes, the fast 16-bit one), bfloat16 or int8 (blocks of 32 with a scale each)"


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other picogpt error, instead of usage + message
        self.exit(2, f"picogpt: error: {message} (see {self.prog} --help)\n")


def parser():
    p = Parser(prog="picogpt", description="GPT-2 inference in NumPy.")
    commands = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    g = commands.add_parser(
        "generate",
        help="continue a prompt and stream the text to stdout",
        description="Continue PROMPT with a GPT-2 model, streaming the new text to stdout as it is decoded.",
    )
    g.add_argument("prompt", help='the text to continue; "" starts a new text from <|endoftext|>, - reads it from stdin')
    g.add_argument("--model", "-m", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, distilgpt2, tiny (ships with picogpt), a hub repo id (org/name) or a local folder (default: %(default)s)")
    g.add_argument("--dtype", choices=DTYPES, default=None, help=f"{DTYPE_HELP} (default: as the checkpoint holds it, float32 for ordinary checkpoints)")
    g.add_argument("--max-new-tokens", "-n", type=int, default=50, help="generate at most this many tokens (default: %(default)s)")
    g.add_argument("--temperature", "-t", type=float, default=1.0, help="sampling temperature; 0 is greedy (default: %(default)s)")
    g.add_argument("--top-k", type=int, default=50, help="sample from the k most likely tokens only (default: %(default)s)")
    g.add_argument("--top-p", type=float, default=1.0, help="sample from the smallest set of tokens whose probability reaches p; 1 turns it off (default: %(default)s)")
    g.add_argument("--seed", type=int, default=None, help="random seed: the same seed gives the same text (default: a fresh one each run)")
    g.add_argument("--stop", action="append", default=None, metavar="TEXT", help="stop before this text appears; may be given more than once (default: none)")
    g.add_argument("--num-samples", type=int, default=1, help="how many continuations, decoded together as one batch (sample i uses seed + i) and separated by a line of dashes (default: %(default)s)")
    g.add_argument("--threads", type=int, default=None, help="CPU threads for the kernels and BLAS (default: all cores, or NUMBA_NUM_THREADS)")
    g.add_argument("--backend", choices=["numba", "numpy"], default="numba", help="numba kernels, or the pure NumPy reference (default: %(default)s)")
    g.add_argument("--verbose", "-v", action="store_true", help="print prompt and generation speed (tokens/s) to stderr (default: off)")
    c = commands.add_parser(
        "convert",
        help="convert a model's weights once and save them in a folder",
        description="Convert MODEL's weights to --dtype and write a checkpoint folder that `--model OUT_FOLDER` "
        "loads memory-mapped, with nothing to convert at load time.",
    )
    c.add_argument("model", help="gpt2, gpt2-medium, ..., tiny, a hub repo id (org/name) or a local folder")
    c.add_argument("out_folder", help="the folder to write (config.json, model.safetensors, vocab.json, merges.txt)")
    c.add_argument("--dtype", choices=DTYPES, required=True, help=DTYPE_HELP)
    return p


def check(args):
    """Reject bad options before spending time on loading a model."""
    from . import sampling

    if args.command == "convert":
        if os.path.exists(os.path.join(args.out_folder, "model.safetensors")):
            raise ValueError(f"{args.out_folder} already holds a model.safetensors: remove it or pick another folder")
        return
    sampling.check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    if args.num_samples < 1:
        raise ValueError(f"--num-samples must be >= 1, got {args.num_samples}")
    if args.stop is not None and not all(args.stop):
        raise ValueError("--stop needs a non-empty text")
    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")


def generate(args):
    from .generate import load, warn

    prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
    model = load(args.model, backend=args.backend, dtype=args.dtype)
    stats, later = {}, [""] * args.num_samples
    # --num-samples N: one batch of N rows, row i sampled with seed + i. Row 0 streams as it is decoded,
    # the others print when the batch is done (they finish at about the same time).
    for row, piece in model.stream(
        [prompt] * args.num_samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed, stop=args.stop, stats=stats,
    ):  # fmt: skip
        if row == 0:
            print(piece, end="", flush=True)
        else:
            later[row] += piece
    print(flush=True)
    for text in later[1:]:
        print("-" * 40)
        print(text, flush=True)
    if args.verbose and stats:
        prompt_rate = stats["prompt_tokens"] / max(stats["prefill_seconds"], 1e-9)
        decode_rate = stats["new_tokens"] / max(stats.get("decode_seconds", 0), 1e-9)
        warn(
            f"prompt: {stats['prompt_tokens']} tokens in {stats['prefill_seconds']:.2f} s ({prompt_rate:.1f} tokens/s); "
            f"generated: {stats['new_tokens']} tokens in {stats.get('decode_seconds', 0):.2f} s ({decode_rate:.1f} tokens/s"
            f"{f', {args.num_samples} rows at once' if args.num_samples > 1 else ''}); "
            f"{args.backend} backend, {model.dtype} weights, {threads()} threads"
        )


def convert(args):
    from .generate import load, warn
    from .weights import save_params

    model = load(args.model, backend="numpy", dtype=args.dtype)
    save_params(model.params, model.config, args.out_folder, model.folder)
    size = os.path.getsize(os.path.join(args.out_folder, "model.safetensors"))
    warn(f"wrote {args.out_folder}: {args.dtype} weights, {size / 1e6:.1f} MB; load it with --model {args.out_folder}")


def threads():
    if "numba" in sys.modules:
        import numba

        return numba.get_num_threads()
    return os.environ.get("OPENBLAS_NUM_THREADS", os.cpu_count())


def main(argv=None):
    args = parser().parse_args(argv)
    if getattr(args, "threads", None):  # before NumPy (OpenBLAS) and Numba read them at load time
        for name in ("NUMBA_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            os.environ[name] = str(args.threads)
    from .tokenizer import TokenizerError
    from .weights import CheckpointError

    try:
        check(args)
    except ValueError as e:
        print(f"picogpt: error: {e}", file=sys.stderr)
        return 2
    try:
        {"generate": generate, "convert": convert}[args.command](args)
    except BrokenPipeError:  # e.g. piped into `head`: not an error worth a message
        sys.stderr.close()
        return 1
    except (CheckpointError, TokenizerError, OSError) as e:
        print(f"picogpt: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(flush=True)  # keep what was printed, end its line
        print("picogpt: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
