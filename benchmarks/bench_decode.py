"""Decode and prefill speed of picogpt in every weight format against transformers and llama.cpp,
in one run, on random weights of GPT-2's real shapes, each engine in a process of its own (workers.py).

    python benchmarks/bench_decode.py [--sizes gpt2 gpt2-medium gpt2-large gpt2-xl] [--dtypes float32 int8]

For each size: a 16-token prompt then 128 new tokens, greedy, batch 1, KV cache on every engine
(first token ms: the 16-token prompt to its first new token); and a 512-token prefill (time to the
first new token). Engines: picogpt's numba kernels in each --dtypes
format (converted once, as `picogpt convert` does), transformers on torch in float32, and, when
`llama_cpp` is importable, llama.cpp in f32, f16 and q8_0 from GGUF files that llama.cpp's own
converter makes of the same weights (benchmarks/llama_cpp_engine.py). Engines are interleaved, one
working at a time, and the best of --repeats is kept; sizes whose engines do not all fit in memory at
once (gpt2-large, gpt2-xl) run one family at a time (picogpt, torch, llama.cpp), interleaved within it.

Also measured: this machine's memory bandwidth (NumPy's sgemv streaming a 512 MB matrix), which caps
batch-1 decoding at bandwidth / bytes of weights read per token (the "ceiling", for each format's
bytes), and the peak RSS of `picogpt generate` on the converted checkpoint folder of each format and
of transformers generating the same tokens, each in a child process after the timings.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

# Before NumPy loads OpenBLAS, as importing picogpt first would (picogpt/__init__.py): its idle threads
# sleep after 2^4 cycles rather than spin for 2^28 into the kernels that come next
os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")

import llama_cpp_engine
import numpy as np
import torch
import transformers
from compare_torch import SHAPES, best_of, converted, measure, random_checkpoint

import picogpt
from picogpt import formats

# Each child prints its own peak RSS (VmHWM, in KiB) last: ru_maxrss of a child would also count the
# pages it shared with this process between fork and exec.
PEAK = "print(next(l.split()[1] for l in open('/proc/self/status') if l.startswith('VmHWM')), file=sys.stderr)"
PICOGPT_CHILD = f"import sys; from picogpt.cli import main; main(sys.argv[1:]); {PEAK}"
TORCH_CHILD = f"""
import sys, torch, transformers
hf = transformers.GPT2LMHeadModel.from_pretrained(sys.argv[1], dtype=torch.float32).eval()
with torch.no_grad():
    hf.generate(torch.tensor([list(range(1000, 1016))]), max_new_tokens=int(sys.argv[2]), do_sample=False, pad_token_id=0)
{PEAK}
"""
LLAMA_TYPES = {"float32": "f32", "float16": "f16", "int8": "q8_0"}  # the llama.cpp format beside each of ours
BIG = ("gpt2-large", "gpt2-xl")  # too large to hold every engine at once in 24 GB


def bandwidth_gb_s():
    """Bytes per second that NumPy's sgemv (x @ W) streams through a matrix far larger than the caches."""
    w = np.random.default_rng(0).standard_normal((8192, 16384), dtype=np.float32)  # 512 MB
    x = np.ones(8192, np.float32)
    return w.nbytes / best_of(lambda: x @ w, 7) / 1e9


def bytes_per_token(params):
    """Every block weight and bias, the final layer norm and wte (the tied lm_head), in their formats."""
    blocks = sum(formats.nbytes(leaf) for block in params["h"] for part in block.values() for leaf in _leaves(part))
    return blocks + formats.nbytes(params["wte"]["weight"]) + sum(a.nbytes for a in params["ln_f"].values())


def _leaves(tree):
    return [leaf for v in tree.values() for leaf in _leaves(v)] if isinstance(tree, dict) else [tree]


def child_peak_rss_mb(code, *args):
    """Peak resident memory, in MB, of a fresh Python running `code`."""
    result = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return int(result.stderr.split()[-1]) * 1024 / 1e6


def families(folder, tmp, dtypes, with_llama):
    """{family: {engine name: worker spec}} of one size; picogpt's formats other than float32 are
    converted here once, into folders of their own, and run from there as after `picogpt convert`."""
    found = {"picogpt": {}, "torch": {"torch float32": f"torch::{folder}"}}
    for dtype in dtypes:
        where = converted(folder, dtype, os.path.join(tmp, dtype))
        found["picogpt"][f"picogpt {dtype}"] = f"picogpt:numba:{where}"
    if with_llama:
        paths = llama_cpp_engine.gguf_files(folder, [LLAMA_TYPES[d] for d in dtypes if d in LLAMA_TYPES], out_dir=tmp)
        found["llama.cpp"] = {f"llama.cpp {t}": f"llama.cpp::{path}" for t, path in paths.items()}
    return found


def bench_size(name, args, bandwidth):
    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(name, os.path.join(tmp, "float32"))
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, 50000, args.prompt_tokens).tolist()
        long_prompt = rng.integers(0, 50000, args.prefill_tokens).tolist()
        found = families(folder, tmp, args.dtypes, args.llama)
        groups = [list(found)] if name not in BIG else [[family] for family in found]
        results = {}
        for group in groups:  # one family at a time for the big sizes, all together otherwise
            engines = {k: v for family in group for k, v in found[family].items()}
            results |= measure(engines, prompt, long_prompt, args.new_tokens, args.repeats)
        per_token = {d: bytes_per_token(picogpt.load(folder, dtype=d).params) for d in args.dtypes}
        n = str(args.new_tokens)
        rss = {
            f"picogpt {d}": child_peak_rss_mb(
                PICOGPT_CHILD, "generate", "x" * 16, "--model", os.path.join(tmp, d), "-n", n, "-t", "0"
            )
            for d in args.dtypes
        }
        rss["torch float32"] = child_peak_rss_mb(TORCH_CHILD, folder, n)
        weight_mb = {d: os.path.getsize(os.path.join(tmp, d, "model.safetensors")) / 1e6 for d in args.dtypes}
    f32 = results.get("picogpt float32")
    torch_ = results["torch float32"]
    for engine, r in results.items():
        dtype = engine.split()[-1]
        r["decode_vs_torch"] = r["decode_tok_s"] / torch_["decode_tok_s"]
        r["prefill_vs_torch"] = r["prefill_tok_s"] / torch_["prefill_tok_s"]
        if f32:
            r["decode_vs_picogpt_float32"] = r["decode_tok_s"] / f32["decode_tok_s"]
            r["prefill_vs_picogpt_float32"] = r["prefill_tok_s"] / f32["prefill_tok_s"]
        if engine.startswith("picogpt"):
            r["ceiling_tok_s"] = bandwidth * 1e9 / per_token[dtype]
            r["decode_vs_ceiling"] = r["decode_tok_s"] / r["ceiling_tok_s"]
            r["bytes_per_token_mb"] = per_token[dtype] / 1e6
            r["weights_mb"] = weight_mb[dtype]
        if engine in rss:
            r["peak_rss_mb"] = rss[engine]
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"], choices=SHAPES)
    p.add_argument("--dtypes", nargs="+", default=list(formats.DTYPES), choices=formats.DTYPES)
    p.add_argument(
        "--llama",
        action=argparse.BooleanOptionalAction,
        default=llama_cpp_engine.available(),
        help="put llama.cpp beside them (default: when llama_cpp is importable)",
    )
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "bench_decode.json"))
    args = p.parse_args()

    import numba

    bandwidth = bandwidth_gb_s()
    versions = {
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "numba": numba.__version__,
    }
    if args.llama:
        import llama_cpp

        versions["llama_cpp_python"] = llama_cpp.__version__
    report = {
        "machine": {
            "cores": os.cpu_count(),
            "bandwidth_gb_s": bandwidth,
            "numba_threads": numba.get_num_threads(),
            "torch_threads": torch.get_num_threads(),
        },
        "versions": versions,
        "setup": vars(args) | {"when": time.strftime("%Y-%m-%d %H:%M")},
        "sizes": {},
    }
    print(
        f"{os.cpu_count()} cores, sgemv bandwidth {bandwidth:.1f} GB/s; "
        + ", ".join(f"{k} {v}" for k, v in versions.items())
    )
    print(
        f"greedy, batch 1: {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens; prefill = time to first token after {args.prefill_tokens} tokens; best of {args.repeats}"
    )
    print()
    print(
        "| model | engine | decode tok/s | vs picogpt f32 | vs torch | vs ceiling | first token ms | prefill tok/s | vs picogpt f32 | peak RSS MB | weights MB |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in args.sizes:
        results = report["sizes"][name] = bench_size(name, args, bandwidth)
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        for engine, r in results.items():
            ceiling = (
                f"{100 * r['decode_vs_ceiling']:.0f}% of {r['ceiling_tok_s']:.0f}" if "decode_vs_ceiling" in r else ""
            )
            cells = [
                f"{r['decode_tok_s']:.1f}",
                cell(r, "decode_vs_picogpt_float32", "{:.2f}x"),
                f"{r['decode_vs_torch']:.2f}x",
                ceiling,
                f"{r['first_token_ms']:.1f}",
                f"{r['prefill_tok_s']:.0f}",
                cell(r, "prefill_vs_picogpt_float32", "{:.2f}x"),
                cell(r, "peak_rss_mb", "{:.0f}"),
                cell(r, "weights_mb", "{:.0f}"),
            ]
            print(f"| {name} | {engine} | " + " | ".join(cells) + " |", flush=True)
    print(f"\nwritten to {args.json}")


def cell(r, key, fmt):
    """A table cell: the figure if this engine has it (llama.cpp's RSS is not measured), else blank."""
    value = r.get(key)
    return "" if value is None or value != value else fmt.format(value)


if __name__ == "__main__":
    main()
