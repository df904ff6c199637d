"""How far the matmul microkernel is from the machine's limits, per weight format and row count.

    python benchmarks/bench_kernels.py [--sizes gpt2 gpt2-medium] [--rows 1 2 4 8 16] [--lanes 8 16]

For every block linear of a model's real shapes (random weights; c_attn, attn.c_proj, c_fc,
mlp.c_proj of every layer: hundreds of MB, so they stream from DRAM as in a decode step), one pass of
R rows through all of them with `microkernel.linear` (the weights in its column panels). Reported:

- GFLOP/s: 2 * R * weights / seconds (the arithmetic limit: sgemm's rate, below);
- GB/s: the weights' bytes / seconds (the bandwidth limit: a plain read, below);
- beside them, NumPy's sgemm (`x @ w`, float32, the same R rows and matrices) and a plain parallel
  read of the same bytes (8-byte words xor-ed together: no arithmetic to speak of).

Best of --repeats passes, after one untimed pass. Nothing else should run on the machine meanwhile.
--lanes 8 16 measures both vector widths' tiles on one machine, each in a process of its own (the
shape is fixed when the kernels are compiled: kernels/target.py); a width wider than the host's
registers runs as pieces of the host's, so only the host's own width says what its CPU can do.
"""

import argparse
import os
import subprocess
import sys
import time

import numba
import numpy as np
from numba import njit, prange

from picogpt import formats
from picogpt.kernels import microkernel, target

SHAPES = {
    "gpt2": (12, 768),
    "gpt2-medium": (24, 1024),
    "gpt2-large": (36, 1280),
    "gpt2-xl": (48, 1600),
}  # n_layer, n_embd


def matrices(n_layer, n_embd, rng):
    """[in, out] float32 weights of every block linear, in decode order."""
    shapes = [(n_embd, 3 * n_embd), (n_embd, n_embd), (n_embd, 4 * n_embd), (4 * n_embd, n_embd)]
    return [(0.02 * rng.standard_normal(shape)).astype(np.float32) for _ in range(n_layer) for shape in shapes]


@njit(parallel=True, cache=True)
def read_words(words, n_bands):  # a plain read: each thread xors its band of 8-byte words
    partial = np.zeros(n_bands, np.uint64)
    for band in prange(n_bands):
        part = words[band * words.size // n_bands : (band + 1) * words.size // n_bands]
        acc = np.uint64(0)
        for i in range(part.size):  # from 0 over a slice: LLVM vectorizes it (over a range from lo, 8x slower)
            acc ^= part[i]
        partial[band] = acc
    return partial


def raw_words(w):
    """The weight's bytes as uint64 words (a packed weight's data and scales)."""
    arrays = [w] if isinstance(w, np.ndarray) else list(w)
    return [a.reshape(-1).view(np.uint8)[: a.nbytes // 8 * 8].view(np.uint64) for a in arrays]


def best(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return min(times)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"], choices=SHAPES)
    p.add_argument("--rows", nargs="+", type=int, default=[1, 2, 4, 8, 16])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--lanes", nargs="+", choices=["8", "16"], help="each vector width in turn (default: the host's)")
    args = p.parse_args()
    if args.lanes:
        for lanes in args.lanes:  # each in a process of its own
            own = sys.argv[1:]  # this command without --lanes and its values
            i = j = own.index("--lanes")
            while j + 1 < len(own) and own[j + 1] in ("8", "16"):
                j += 1
            own = own[:i] + own[j + 1 :]
            subprocess.run([sys.executable, __file__, *own], env={**os.environ, "PICOGPT_LANES": lanes}, check=True)
        return
    threads, rng = numba.get_num_threads(), np.random.default_rng(0)
    print(
        f"{threads} threads; numpy {np.__version__}, numba {numba.__version__}; best of {args.repeats}; all block linears of each model per pass"
    )
    host = "AVX-512" if target.AVX512 else "AVX2" if "+avx2" in target.FEATURES else "no AVX2"
    print(
        f"microkernel {target.name()}: tiles of {microkernel.R} rows x {microkernel.C} vectors of {microkernel.LANES} float32, panels of {microkernel.P} outputs; int8 dot products by {target.DOT}; host {host}"
    )
    print("| model | weights | rows | GFLOP/s | GB/s | vs sgemm GFLOP/s | vs plain read GB/s |")
    print("|---|---|---|---|---|---|---|")
    for size in args.sizes:
        wide = matrices(*SHAPES[size], rng)
        n_weights = sum(w.size for w in wide)
        for dtype in formats.DTYPES:
            ws = wide if dtype == "float32" else [formats.pack(w, dtype) for w in wide]
            layers = [microkernel.linear_of(w) for w in ws]  # column panels
            ws = [layer.weight for layer in layers]  # their bytes are read: the padding counts
            n_bytes = sum(formats.nbytes(w) for w in ws)
            words = [a for w in ws for a in raw_words(w)]
            read = n_bytes / best(lambda: [read_words(a, threads) for a in words], args.repeats) / 1e9
            for rows in args.rows:
                xs = [(0.1 * rng.standard_normal((rows, w.shape[0]))).astype(np.float32) for w in wide]
                none = np.empty((0, 0), np.float32)
                sgemm = 2 * rows * n_weights / best(lambda: [x @ w for x, w in zip(xs, wide)], args.repeats) / 1e9
                time.sleep(0.5)  # OpenBLAS's threads spin for a while after a call, taking a core from the next
                seconds = best(
                    lambda: [microkernel.linear(x, *layer, none, threads) for x, layer in zip(xs, layers)], args.repeats
                )
                flops, gbs = 2 * rows * n_weights / seconds / 1e9, n_bytes / seconds / 1e9
                print(
                    f"| {size} | {dtype} | {rows} | {flops:.1f} | {gbs:.1f} | {flops / sgemm:.2f}x of {sgemm:.0f} | {gbs / read:.2f}x of {read:.1f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
