"""picogpt against transformers (torch, CPU, float32) on the same weights, in the same run.

    python benchmarks/compare_torch.py --random gpt2          # random weights of gpt2's real shapes
    python benchmarks/compare_torch.py --model path/or/name   # a real checkpoint

Prints the largest |logit difference|, prefill tokens/s on a long prompt, and decode tokens/s
(greedy, batch 1, KV cache on both sides), measured the same way for both engines and interleaved so
that both see the same machine, each in a process of its own (workers.py): prefill is the time to the first new token after a long prompt;
decode is (N-1) / (time for N new tokens - time for 1 new token), so the prompt is left out of it.
"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np
import torch
import transformers

import picogpt

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from checkpoints import save_checkpoint  # noqa: E402
from workers import running  # noqa: E402

SHAPES = {
    "distilgpt2": dict(n_layer=6, n_head=12, n_embd=768),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),
}


def random_checkpoint(name, folder):
    """GPT-2 of a real size with transformers' own random initialisation, saved as safetensors."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(**SHAPES[name], attn_implementation="eager")
    return save_checkpoint(transformers.GPT2LMHeadModel(config).eval(), folder)


def converted(folder, dtype, where):
    """The checkpoint `folder` in `dtype`: written once into `where` as `picogpt convert` writes it
    (float32: `folder` itself)."""
    if dtype == "float32":
        return folder
    from picogpt.checkpoint import converted as convert

    convert.write(folder, dtype, where)
    return where


def seconds(fn):
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def best_of(fn, repeats):
    return min(seconds(fn) for _ in range(repeats))


def measure(specs, prompt, long_prompt, new_tokens, repeats):
    """{engine: {prefill_tok_s, decode_tok_s, decode_ms_per_token, first_token_ms}}, best of `repeats`,
    the engines of {name: spec} (single-stream engines of workers.py, each in its own process)
    interleaved, one at a time; first_token_ms: `prompt` to its first new token."""
    times = {name: {"prefill": [], "one": [], "all": []} for name in specs}

    def run(worker, ids, n):
        return worker.ask(n, *ids)["seconds"]

    with running(specs) as engines:
        for worker in engines.values():
            run(worker, prompt, 2)  # warm up (and load compiled kernels)
        for _ in range(repeats):
            for name, worker in engines.items():
                time.sleep(1.0)  # the last engine's idle threads stop spinning before this one starts
                times[name]["prefill"].append(run(worker, long_prompt, 1))
                times[name]["one"].append(run(worker, prompt, 1))
                times[name]["all"].append(run(worker, prompt, new_tokens))
    results = {}
    for name, t in times.items():
        decode = (min(t["all"]) - min(t["one"])) / (new_tokens - 1)
        results[name] = {
            "prefill_tok_s": len(long_prompt) / min(t["prefill"]),
            "decode_tok_s": 1 / decode,
            "decode_ms_per_token": 1000 * decode,
            "first_token_ms": 1000 * min(t["one"]),
        }
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a picogpt model name, hub repo id or local folder")
    which.add_argument("--random", choices=SHAPES, help="random weights of this model's shapes")
    p.add_argument("--prompt-tokens", type=int, default=16)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--backend", choices=["numba", "numpy"], default="numba")
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = random_checkpoint(args.random, tmp) if args.random else picogpt.checkpoint.hub.resolve(args.model)
        model = picogpt.load(folder, backend=args.backend)
        hf = transformers.GPT2LMHeadModel.from_pretrained(
            folder, dtype=torch.float32
        ).eval()  # default attention (sdpa)
        rng = np.random.default_rng(0)
        prompt = rng.integers(0, 50000, args.prompt_tokens).tolist()
        long_prompt = rng.integers(0, 50000, args.prefill_tokens).tolist()

        check = long_prompt[:64]
        with torch.no_grad():
            expected = hf(torch.tensor([check])).logits[0].numpy()
        diff = np.abs(model.forward(check, **model.params, n_head=model.config["n_head"]) - expected).max()

        del model, hf
        engines = {f"picogpt {args.backend}": f"picogpt:{args.backend}:{folder}", "torch": f"torch::{folder}"}
        results = measure(engines, prompt, long_prompt, args.new_tokens, args.repeats)

    name = args.random and f"random {args.random}" or args.model
    print(
        f"{name}: max |logit diff| vs torch = {diff:.2e}; torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    print(
        f"| engine | prefill {args.prefill_tokens} tok/s | decode tok/s ({args.prompt_tokens}-token prompt, {args.new_tokens} new) |"
    )
    print("|---|---|---|")
    for engine, r in results.items():
        print(f"| {engine} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} |")
    ours, torch_ = results[f"picogpt {args.backend}"], results["torch"]
    print(
        f"picogpt / torch: decode {ours['decode_tok_s'] / torch_['decode_tok_s']:.2f}x, prefill {ours['prefill_tok_s'] / torch_['prefill_tok_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
