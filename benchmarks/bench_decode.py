"""Decode and prefill speed of picogpt (numba kernels and the NumPy reference) against transformers,
in one process and one run, on random weights of gpt2 and gpt2-medium's real shapes.

    python benchmarks/bench_decode.py [--sizes gpt2 gpt2-medium] [--json benchmarks/bench_decode.json]

For each size: a 16-token prompt then 128 new tokens, greedy, batch 1, KV cache on every engine; and
a 512-token prefill (time to the first new token). Also measured: this machine's memory bandwidth
(NumPy's sgemv streaming a 512 MB matrix), which caps batch-1 decoding at bandwidth / bytes of
weights read per token, and the peak RSS of `picogpt generate` and of transformers generating the
same 128 tokens, each in a child process after the timings (nothing else runs while timing).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch
import transformers
from compare_torch import SHAPES, best_of, measure, picogpt_generate, random_checkpoint, torch_generate

import picogpt

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


def bandwidth_gb_s():
    """Bytes per second that NumPy's sgemv (x @ W) streams through a matrix far larger than the caches."""
    w = np.random.default_rng(0).standard_normal((8192, 16384), dtype=np.float32)  # 512 MB
    x = np.ones(8192, np.float32)
    return w.nbytes / best_of(lambda: x @ w, 7) / 1e9


def bytes_per_token(params):
    """Every block weight and bias, the final layer norm and wte (the tied lm_head); wpe is one row."""
    blocks = sum(leaf.nbytes for block in params["h"] for part in block.values() for leaf in _leaves(part))
    return blocks + params["wte"]["weight"].nbytes + sum(a.nbytes for a in params["ln_f"].values())


def _leaves(tree):
    return [tree] if isinstance(tree, np.ndarray) else [leaf for v in tree.values() for leaf in _leaves(v)]


def child_peak_rss_mb(code, *args):
    """Peak resident memory, in MB, of a fresh Python running `code`."""
    result = subprocess.run([sys.executable, "-c", code, *args], check=True, capture_output=True, text=True)
    return int(result.stderr.split()[-1]) * 1024 / 1e6


def bench_size(name, args, bandwidth):
    with tempfile.TemporaryDirectory() as folder:
        random_checkpoint(name, folder)
        fast, ref = picogpt.load(folder, backend="numba"), picogpt.load(folder, backend="numpy")
        hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32).eval()
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, 50000, args.prompt_tokens).tolist()
        long_prompt = rng.integers(0, 50000, args.prefill_tokens).tolist()
        engines = {"picogpt numba": picogpt_generate(fast), "picogpt numpy": picogpt_generate(ref), "torch": torch_generate(hf)}
        results = measure(engines, prompt, long_prompt, args.new_tokens, args.repeats)
        weight_mb = os.path.getsize(os.path.join(folder, "model.safetensors")) / 1e6
        per_token = bytes_per_token(fast.params)
        del hf
        n = str(args.new_tokens)
        rss = {
            "picogpt numba": child_peak_rss_mb(PICOGPT_CHILD, "generate", "x" * 16, "--model", folder, "-n", n, "-t", "0"),
            "picogpt numpy": child_peak_rss_mb(PICOGPT_CHILD, "generate", "x" * 16, "--model", folder, "-n", n, "-t", "0", "--backend", "numpy"),
            "torch": child_peak_rss_mb(TORCH_CHILD, folder, n),
        }
    ceiling = bandwidth * 1e9 / per_token
    torch_ = results["torch"]
    for engine, r in results.items():
        r["decode_vs_torch"] = r["decode_tok_s"] / torch_["decode_tok_s"]
        r["prefill_vs_torch"] = r["prefill_tok_s"] / torch_["prefill_tok_s"]
        r["decode_vs_ceiling"] = r["decode_tok_s"] / ceiling
        if engine in rss:
            r["peak_rss_mb"] = rss[engine]
    return {"weights_mb": weight_mb, "bytes_read_per_token_mb": per_token / 1e6, "ceiling_tok_s": ceiling, "engines": results}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["gpt2", "gpt2-medium"], choices=SHAPES)
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", default=os.path.join(os.path.dirname(__file__), "bench_decode.json"))
    args = p.parse_args()

    import numba

    bandwidth = bandwidth_gb_s()
    report = {
        "machine": {"cores": os.cpu_count(), "bandwidth_gb_s": bandwidth, "numba_threads": numba.get_num_threads(), "torch_threads": torch.get_num_threads()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "numpy": np.__version__, "numba": numba.__version__},
        "setup": vars(args) | {"when": time.strftime("%Y-%m-%d %H:%M")},
        "sizes": {name: bench_size(name, args, bandwidth) for name in args.sizes},
    }
    with open(args.json, "w") as f:
        json.dump(report, f, indent=2)

    print(f"{os.cpu_count()} cores, sgemv bandwidth {bandwidth:.1f} GB/s; torch {torch.__version__} ({torch.get_num_threads()} threads), numba {numba.__version__} ({numba.get_num_threads()} threads)")
    print(f"greedy, batch 1: {args.prompt_tokens}-token prompt + {args.new_tokens} new tokens; prefill = time to first token after {args.prefill_tokens} tokens; best of {args.repeats}")
    print()
    print("| model | engine | decode tok/s | ms/token | vs torch | vs ceiling | prefill tok/s | vs torch | peak RSS MB |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, size in report["sizes"].items():
        for engine, r in size["engines"].items():
            print(
                f"| {name} | {engine} | {r['decode_tok_s']:.1f} | {r['decode_ms_per_token']:.1f} | {r['decode_vs_torch']:.2f}x | "
                f"{100 * r['decode_vs_ceiling']:.0f}% | {r['prefill_tok_s']:.0f} | {r['prefill_vs_torch']:.2f}x | {r.get('peak_rss_mb', float('nan')):.0f} |"
            )
        print(f"| {name} | ceiling | {size['ceiling_tok_s']:.1f} | {1000 / size['ceiling_tok_s']:.1f} | | 100% | | | weights {size['weights_mb']:.0f} |")
        rss = size["engines"]["picogpt numba"]["peak_rss_mb"]
        print(f"{name}: picogpt peak RSS {rss:.0f} MB = {rss / size['weights_mb']:.2f}x the weights")
    print(f"\nwritten to {args.json}")


if __name__ == "__main__":
    main()
