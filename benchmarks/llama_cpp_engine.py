"""llama.cpp (through llama-cpp-python) as a third engine beside picogpt and transformers.

    python benchmarks/llama_cpp_engine.py --random gpt2         # random weights of gpt2's real shapes
    python benchmarks/llama_cpp_engine.py --model path/or/name  # a real checkpoint

converts the checkpoint to GGUF (f32, f16, q8_0), checks that llama.cpp's f32 greedy tokens equal
picogpt's, prints the largest |logit difference| on the prompt and a quick decode tok/s per type.

Nothing here is a dependency of picogpt: `llama_cpp` is imported only when used. To get it:

    pip install llama-cpp-python      # builds llama.cpp from source (~40 min on 2 cores)

The conversion is llama.cpp's own `convert_hf_to_gguf.py`, which is not in the wheel but is in the
source distribution:

    pip download --no-deps --no-binary :all: llama-cpp-python
    tar xzf llama_cpp_python-*.tar.gz
    export LLAMA_CPP_SOURCE=$PWD/llama_cpp_python-<version>/vendor/llama.cpp

It runs with the gguf-py that sits next to it (PyPI's `gguf` can lag behind the converter), and for
GPT-2 needs only numpy, torch, transformers (for the tokenizer), pyyaml and tqdm, all already
installed with the benchmarks: nothing more to install (sentencepiece and protobuf, in its
requirements, are for other models' tokenizers).
"""

import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

DEFAULT_SOURCE = "/work/llama/sdist/llama_cpp_python-0.3.36/vendor/llama.cpp"  # where the benchmark host unpacked it

# Runs convert_hf_to_gguf.py (argv[1]) as a script, with one fix: GPT-2's causal-mask buffers
# (h.N.attn.bias, h.N.attn.masked_bias, in the hub's own gpt2 files) are not weights, and the
# converter's GPT2Model means to skip them but hands them to its name mapping, which then fails.
CONVERT = """
import os, runpy, sys
sys.argv.pop(0)
sys.path.insert(0, os.path.dirname(sys.argv[0]))
from conversion.gpt2 import GPT2Model
keep = GPT2Model.filter_tensors
GPT2Model.filter_tensors = classmethod(lambda cls, item: None if item[0].endswith(('.attn.bias', '.attn.masked_bias')) else keep(item))
runpy.run_path(sys.argv[0], run_name='__main__')
"""


def available():
    """True when llama-cpp-python is installed and its library loads."""
    try:
        import llama_cpp  # noqa: F401
    except Exception:  # ImportError, or OSError when the shared library does not load
        return False
    return True


def llama_cpp_source():
    """The llama.cpp source folder holding convert_hf_to_gguf.py: $LLAMA_CPP_SOURCE, else DEFAULT_SOURCE."""
    source = os.environ.get("LLAMA_CPP_SOURCE") or DEFAULT_SOURCE
    if not os.path.isfile(os.path.join(source, "convert_hf_to_gguf.py")):
        raise FileNotFoundError(
            f"no convert_hf_to_gguf.py in {source!r}: set LLAMA_CPP_SOURCE to the vendor/llama.cpp folder of "
            "llama-cpp-python's source distribution (pip download --no-deps --no-binary :all: llama-cpp-python, then untar it)"
        )
    return source


def _gpt2_config(folder, staging):
    """The converter reads GPT-2's context length from config.json's "n_ctx" and the model class from
    "architectures", which the hub's GPT-2 configs have but save_pretrained (n_ctx) and
    config.to_json_file (architectures) leave out: if one is missing, return a view of `folder`
    (symlinks) whose config.json has it, rather than touch the user's folder."""
    with open(os.path.join(folder, "config.json")) as f:
        config = json.load(f)
    missing = {"n_ctx": config["n_positions"], "architectures": ["GPT2LMHeadModel"]}
    missing = {k: v for k, v in missing.items() if k not in config}
    if not missing:
        return folder
    for name in os.listdir(folder):
        if name != "config.json":
            os.symlink(os.path.abspath(os.path.join(folder, name)), os.path.join(staging, name))
    with open(os.path.join(staging, "config.json"), "w") as f:
        json.dump(config | missing, f, indent=2)
    return staging


def gguf_files(folder, types=("f32", "f16", "q8_0"), out_dir=None):
    """Convert the Hugging Face GPT-2 checkpoint in `folder` with llama.cpp's convert_hf_to_gguf.py,
    once per type; return {type: path of out_dir/model-<type>.gguf} (out_dir defaults to `folder`)."""
    source = llama_cpp_source()
    out_dir = out_dir or folder
    os.makedirs(out_dir, exist_ok=True)
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(filter(None, [os.path.join(source, "gguf-py"), os.environ.get("PYTHONPATH")])),
    )
    paths = {}
    with tempfile.TemporaryDirectory() as staging:
        model_dir = _gpt2_config(folder, staging)
        for outtype in types:
            path = os.path.join(out_dir, f"model-{outtype}.gguf")
            command = [
                sys.executable,
                "-c",
                CONVERT,
                os.path.join(source, "convert_hf_to_gguf.py"),
                model_dir,
                "--outtype",
                outtype,
                "--outfile",
                path,
            ]
            command += ["--model-name", os.path.basename(os.path.normpath(folder))]  # not the staging folder's name
            result = subprocess.run(command, env=env, capture_output=True, text=True)
            if result.returncode != 0:
                log = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
                raise RuntimeError(f"convert_hf_to_gguf.py --outtype {outtype} failed ({result.returncode}):\n{log}")
            paths[outtype] = path
    return paths


def llama_generate(path, n_threads=None, n_ctx=1024, streaming=False, **llama_kwargs):
    """Load the GGUF model at `path` once; return generate(ids, n) -> the n greedy new token ids after
    the prompt `ids`, processing the prompt afresh on every call like the other engines (streaming:
    a generator of them, each as it is chosen).
    Extra keyword arguments go to llama_cpp.Llama (e.g. type_k/type_v for the KV cache's type)."""
    import llama_cpp

    n_threads = n_threads or os.cpu_count()
    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=n_ctx,
        n_threads=n_threads,
        n_threads_batch=n_threads,
        n_batch=512,
        verbose=False,
        logits_all=False,
        **llama_kwargs,
    )
    n_vocab = llm.n_vocab()

    def greedy():
        # The logits of the last token evaluated, read in place: without logits_all, llm.scores is not
        # filled, and llm.sample(temp=0) would build (and free) a sampler chain for every token.
        pointer = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.ctypeslib.as_array(pointer, shape=(n_vocab,)).argmax())

    def stream(ids, n):
        if len(ids) + n - 1 > n_ctx:
            raise ValueError(f"{len(ids)} prompt tokens + {n} new ones do not fit in n_ctx={n_ctx}")
        # reset() sets n_tokens to 0, so eval() first drops the whole KV cache: nothing is reused from
        # the last call (the prefix reuse of llama-cpp-python lives in Llama.generate, not used here).
        llm.reset()
        llm.eval(ids)
        token = greedy()
        yield token
        for _ in range(n - 1):  # exactly n tokens: end-of-text is just another token here
            llm.eval([token])
            token = greedy()
            yield token

    return stream if streaming else lambda ids, n: list(stream(ids, n))


def _quiet_log(level, text, user_data):  # llama.cpp's log lines: none
    pass


_quiet = None  # the ctypes callback, made on first use (llama_cpp is imported only when used)


def llama_batch_generate(path, n_seq, n_threads=None, n_ctx=1024):
    """llama.cpp's own batched decoding: load the GGUF model at `path` once, with a context of n_seq
    sequences (n_seq_max) in one unified KV cache; return generate(prompts, n) -> (seconds to the first
    new tokens, seconds for the n - 1 decode steps after them). Each step is one llama_batch holding
    the new token of every sequence (the prompts: one batch with all of them), one llama_decode, and
    a greedy pick from llama_get_logits_ith for each sequence, as llama.cpp's batched example does."""
    import ctypes

    import llama_cpp

    global _quiet
    _quiet = _quiet or llama_cpp.llama_log_callback(_quiet_log)
    n_threads = n_threads or os.cpu_count()
    llama_cpp.llama_log_set(_quiet, ctypes.c_void_p(0))
    llama_cpp.llama_backend_init()
    model = llama_cpp.llama_model_load_from_file(path.encode(), llama_cpp.llama_model_default_params())
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_batch, params.n_ubatch = n_ctx * n_seq, 512 * n_seq, 512
    params.n_seq_max, params.kv_unified = n_seq, True
    params.n_threads = params.n_threads_batch = n_threads
    ctx = llama_cpp.llama_init_from_model(model, params)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(model))
    batch = llama_cpp.llama_batch_init(512 * n_seq, 0, n_seq)

    def decode(items):  # [(token, position, sequence, wants logits)] -> the greedy pick of each item that wants them
        for i, (token, pos, seq, logits) in enumerate(items):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, pos, 1, logits
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(items)
        if llama_cpp.llama_decode(ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        picks = []
        for i, item in enumerate(items):
            if item[3]:
                pointer = llama_cpp.llama_get_logits_ith(ctx, i)
                picks.append(
                    int(
                        np.ctypeslib.as_array(
                            ctypes.cast(pointer, ctypes.POINTER(ctypes.c_float)), shape=(n_vocab,)
                        ).argmax()
                    )
                )
        return picks

    def generate(prompts, n):
        assert len(prompts) <= n_seq
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(ctx), True)
        start = time.perf_counter()
        items = [(t, pos, s, pos == len(p) - 1) for s, p in enumerate(prompts) for pos, t in enumerate(p)]
        tokens = decode(items)
        first = time.perf_counter()
        for step in range(n - 1):
            tokens = decode([(t, len(p) + step, s, True) for s, (t, p) in enumerate(zip(tokens, prompts))])
        return first - start, time.perf_counter() - first

    return generate


def prompt_logits(path, ids, **llama_kwargs):
    """llama.cpp's logits at every position of `ids`, from a separate logits_all instance."""
    import llama_cpp

    llm = llama_cpp.Llama(
        model_path=path,
        n_ctx=max(64, len(ids)),
        n_threads=os.cpu_count(),
        verbose=False,
        logits_all=True,
        **llama_kwargs,
    )
    llm.eval(ids)
    logits = llm.scores[: len(ids)].copy()
    llm.close()
    return logits


def main():
    import argparse

    from compare_torch import SHAPES, measure, random_checkpoint

    import picogpt
    from picogpt.engine import decode_tokens

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--model", help="a picogpt model name, hub repo id or local folder")
    which.add_argument("--random", choices=SHAPES, help="random weights of this model's shapes")
    p.add_argument("--check-tokens", type=int, default=20, help="greedy tokens compared with picogpt")
    p.add_argument("--new-tokens", type=int, default=64, help="new tokens for the quick speed")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        folder = (
            random_checkpoint(args.random, os.path.join(tmp, args.random))
            if args.random
            else picogpt.checkpoint.hub.resolve(args.model)
        )
        paths = gguf_files(folder, out_dir=os.path.join(tmp, "gguf"))
        for outtype, path in paths.items():
            print(f"{outtype}: {os.path.getsize(path) / 1e6:.0f} MB")
        if not available():
            print("llama_cpp is not importable: converted only")
            return

        model = picogpt.load(folder)
        n_ctx = model.config["n_positions"]
        prompt = np.random.default_rng(0).integers(0, 50000, 16).tolist()

        expected = model.forward(prompt, **model.params, n_head=model.config["n_head"])
        for name, kv in [
            ("f16 KV cache (llama.cpp's default)", {}),
            ("f32 KV cache", dict(type_k=0, type_v=0)),
        ]:  # 0 = GGML_TYPE_F32
            diff = np.abs(prompt_logits(paths["f32"], prompt, **kv) - expected).max()
            print(f"f32 GGUF, {name}: max |logit diff| vs picogpt on the prompt = {diff:.2e}")

        greedy = lambda logits: int(np.argmax(logits))  # noqa: E731
        ours = list(decode_tokens(model.forward, model.params, model.config, prompt, args.check_tokens, greedy))
        engines = {t: llama_generate(path, args.threads, n_ctx) for t, path in paths.items()}
        theirs = engines["f32"](prompt, args.check_tokens)
        same = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
        print(
            f"greedy, {args.check_tokens} tokens after a 16-token prompt: f32 GGUF {'matches picogpt' if same is None else f'differs from picogpt from token {same}'}"
        )
        if same is not None:
            print(f"  picogpt:   {ours}\n  llama.cpp: {theirs}")

        long_prompt = np.random.default_rng(1).integers(0, 50000, min(512, n_ctx - 1)).tolist()
        del engines, model
        threads = args.threads or ""
        engines = {f"llama.cpp {t}": f"llama.cpp:{threads}:{path}" for t, path in paths.items()}
        engines["picogpt numba"] = f"picogpt:numba:{folder}"
        results = measure(engines, prompt, long_prompt, min(args.new_tokens, n_ctx - len(prompt)), args.repeats)
    print(
        f"quick speeds (best of {args.repeats}, noisy): 16-token prompt + {args.new_tokens} new; prefill {len(long_prompt)} tokens"
    )
    for engine, r in results.items():
        print(f"  {engine:14} decode {r['decode_tok_s']:7.1f} tok/s   prefill {r['prefill_tok_s']:7.0f} tok/s")


if __name__ == "__main__":
    main()
