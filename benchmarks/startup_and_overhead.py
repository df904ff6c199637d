"""Start-up and per-token overhead of the numba backend.

    python benchmarks/startup_and_overhead.py [--size gpt2]

1. Start-up: `picogpt generate` on the shipped tiny model (README's first command) and on random
   weights of the real shape, first with an empty Numba cache (the first-ever run compiles every
   kernel it needs), then again (kernels load from the on-disk cache): wall time to the first piece
   of text on stdout, and to the end.
2. Per-token split: ms/token of a decode step on the real shapes, against the same number of layers
   and kernel calls with tiny widths, where the arithmetic is negligible and what remains is Python,
   dispatch and thread wake-ups.
"""

import argparse
import os
import subprocess
import sys
import tempfile
import time

import transformers
from compare_torch import SHAPES, random_checkpoint

import picogpt
from picogpt import kernels, model


def cli_seconds(model, cache_dir, *options):
    """(seconds to the first text on stdout, seconds to the end) of `picogpt generate`."""
    cmd = [
        os.path.join(os.path.dirname(sys.executable), "picogpt"),
        "generate",
        "The list",
        "--model",
        model,
        "-t",
        "0",
        *options,
    ]
    start = time.perf_counter()
    p = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env={**os.environ, "NUMBA_CACHE_DIR": cache_dir}
    )
    p.stdout.read(1)
    first = time.perf_counter() - start
    p.communicate()
    return first, time.perf_counter() - start


def ms_per_token(params, config, steps=100):
    n_layer, n_head, n_embd = config["n_layer"], config["n_head"], config["n_embd"]
    cache = model.kv_cache(n_layer, n_head, config["n_positions"], n_embd)
    kernels.gpt2(list(range(16)), **params, n_head=n_head, cache=cache, last=True)
    for i in range(3):
        kernels.gpt2([5], **params, n_head=n_head, cache=cache, past=16 + i)
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for i in range(steps):
            kernels.gpt2([5], **params, n_head=n_head, cache=cache, past=16 + i)
        best = min(best, (time.perf_counter() - start) / steps * 1000)
    return best


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="gpt2", choices=SHAPES)
    args = p.parse_args()
    for dtype in ("float32", "int8"):
        with tempfile.TemporaryDirectory() as cache_dir:
            (cold_first, cold), (warm_first, warm) = (
                cli_seconds("tiny", cache_dir, "-n", "60", "--dtype", dtype) for _ in range(2)
            )
        print(
            f'`picogpt generate "The list" --model tiny -n 60 --dtype {dtype}`: first-ever run {cold_first:.1f} s to the first '
            f"token, {cold:.1f} s in all (compiles); next run {warm_first:.2f} s and {warm:.2f} s"
        )
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as cache_dir:
        random_checkpoint(args.size, folder)
        (cold_first, cold), (warm_first, warm) = (
            cli_seconds(folder, cache_dir, "-n", "2"),
            cli_seconds(folder, cache_dir, "-n", "2"),
        )
        print(
            f"`picogpt generate` to 2 new tokens ({args.size}): first-ever run {cold:.1f} s (compiles), next run {warm:.1f} s"
        )
        real = picogpt.load(folder)
        total = ms_per_token(real.params, real.config)

    shape = SHAPES[args.size]
    tiny_config = transformers.GPT2Config(
        n_layer=shape["n_layer"],
        n_head=shape["n_head"],
        n_embd=shape["n_head"] * 2,
        vocab_size=64,
        bos_token_id=0,
        eos_token_id=0,
    )
    tiny = transformers.GPT2LMHeadModel(tiny_config)
    params = picogpt.checkpoint.params.to_params(
        {k: v.detach().numpy() for k, v in tiny.state_dict().items()}, tiny_config.to_dict()
    )
    overhead = ms_per_token(params, tiny_config.to_dict())
    print(
        f"decode step ({args.size}): {total:.2f} ms/token = {total - overhead:.2f} ms in kernels + {overhead:.2f} ms Python, dispatch and thread wake-ups ({100 * overhead / total:.0f}%)"
    )


if __name__ == "__main__":
    main()
