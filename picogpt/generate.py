"""Generation: prefill the prompt into a KV cache, decode one token at a time, stream the text."""

import codecs
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import formats, model, sampling, tokenizer as tok, weights


def warn(message):
    print(f"picogpt: {message}", file=sys.stderr, flush=True)


def decode_tokens(forward, params, config, ids, max_new_tokens, pick, stats=None):
    """Yield up to max_new_tokens token ids following `ids`, one forward step per token.

    GPT-2's positions are absolute, so past n_positions tokens the cache cannot simply roll: we drop
    the oldest quarter of the context and prefill the rest again, which keeps rebuilds rare.
    """
    n_ctx, n_head, n_layer, n_embd = config["n_positions"], config["n_head"], config["n_layer"], config["n_embd"]
    run = dict(n_head=n_head, eps=config.get("layer_norm_epsilon", 1e-5), last=True)  # logits for the next token only
    if len(ids) > n_ctx:
        warn(f"the prompt has {len(ids)} tokens, more than the model's context of {n_ctx}: keeping the last {n_ctx}")
        ids = ids[-n_ctx:]
    if max_new_tokens == 0:
        return
    cache = model.kv_cache(n_layer, n_head, n_ctx, n_embd // n_head)
    context = list(ids)  # the tokens whose keys and values are in the cache
    start = time.perf_counter()
    logits = forward(context, **params, **run, cache=cache, past=0)
    if stats is not None:
        stats.update(prompt_tokens=len(context), prefill_seconds=time.perf_counter() - start, new_tokens=0)
        start = time.perf_counter()
    slid = False
    for i in range(max_new_tokens):
        if i and len(context) < n_ctx:  # the usual step: one token against the cache
            logits = forward([token], **params, **run, cache=cache, past=len(context))
            context.append(token)
        elif i:  # the cache is full: slide the window and prefill it again
            drop = max(1, n_ctx // 4)
            if not slid:
                warn(f"the context of {n_ctx} tokens is full: sliding the window, dropping the oldest {drop} tokens at a time")
                slid = True
            context = context[drop:] + [token]
            logits = forward(context, **params, **run, cache=cache, past=0)
        token = pick(logits[-1])
        if stats is not None:
            stats.update(new_tokens=i + 1, decode_seconds=time.perf_counter() - start)
        yield token


def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream_text(tokens, tokenizer, stops=()):
    """Turn token ids into text pieces: whole UTF-8 characters only, cut before any stop string."""
    eot = tokenizer.eot_token
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted = "", 0
    for token in tokens:
        final = token == eot
        text += utf8.decode(b"" if final else tokenizer.decode_single_token_bytes(token), final=final)
        hits = [i for s in stops if (i := text.find(s, emitted)) >= 0]
        if hits:
            yield text[emitted : min(hits)]
            return
        end = len(text) if final else len(text) - held_back(text, stops)
        if end > emitted:
            yield text[emitted:end]
            emitted = end
        if final:
            return
    text += utf8.decode(b"", final=True)
    if len(text) > emitted:
        yield text[emitted:]


@dataclass
class Model:
    """A loaded checkpoint: `.params` (nested HF-layout dict), `.config` (config.json), `.tokenizer` (tiktoken)."""

    params: dict
    config: dict
    tokenizer: object
    forward: object = model.gpt2
    folder: str = None  # where the checkpoint's files are

    @property
    def dtype(self):
        """The weight format of the block linears and wte: float32, float16, bfloat16 or int8."""
        return formats.dtype_of(self.params["wte"]["weight"])

    def stream(self, prompt, max_new_tokens=50, temperature=1.0, top_k=50, top_p=1.0, seed=None, stop=None, stats=None):
        """Yield the continuation of `prompt` piece by piece as it is decoded."""
        sampling.check_sampling(max_new_tokens, temperature, top_k, top_p)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        ids = tok.encode(self.tokenizer, prompt) or [self.tokenizer.eot_token]  # empty prompt: start a new text
        rng = np.random.default_rng(seed)

        n_vocab = self.tokenizer.n_vocab  # a padded embedding may have rows no token decodes to

        def pick(logits):
            return sampling.sample(logits[:n_vocab], rng, temperature, top_k, top_p)

        tokens = decode_tokens(self.forward, self.params, self.config, ids, max_new_tokens, pick, stats)
        yield from stream_text(tokens, self.tokenizer, stops)

    def generate(self, prompt, **kwargs):
        """The continuation of `prompt` as one string; takes the same options as `stream`."""
        return "".join(self.stream(prompt, **kwargs))


def forward_for(backend):
    """The forward pass: "numba" (the kernels, default) or "numpy" (model.py, the readable reference)."""
    if backend == "numba":
        from . import kernels  # imports numba: deferred so the NumPy path never pays for it

        return kernels.gpt2
    if backend == "numpy":
        return model.gpt2
    raise ValueError(f"backend must be 'numba' or 'numpy', got {backend!r}")


def load(name_or_path="gpt2", backend="numba", dtype=None):
    """Load a GPT-2 checkpoint by name (gpt2, gpt2-medium, ..., distilgpt2, tiny), hub repo id or local folder.

    dtype: the weight format to run in, "float32", "float16", "bfloat16" or "int8" (see formats.py);
    None keeps what the checkpoint holds (float32 for ordinary checkpoints, whatever their width on
    disk; the packed format of one written by `picogpt convert`). Conversion happens once, here."""
    if dtype is not None and dtype not in formats.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(formats.DTYPES)}, got {dtype!r}")
    forward = forward_for(backend)
    folder = weights.resolve(name_or_path)
    params, config, stored = weights.load_params(folder)
    tokenizer = tok.load_tokenizer(folder)
    if tokenizer.n_vocab > config["vocab_size"]:
        raise weights.CheckpointError(
            f"{folder}: the tokenizer has {tokenizer.n_vocab} tokens but the model only {config['vocab_size']} (vocab_size); "
            "vocab.json and merges.txt belong to another model"
        )
    if dtype is not None and dtype != stored:
        try:
            params = formats.convert(params, dtype)
        except formats.FormatError as e:
            raise weights.CheckpointError(f"{folder}: {e}") from None
    return Model(params, config, tokenizer, forward, folder)
