"""Generation: prefill the prompt into a KV cache, decode one token at a time, stream the text."""

import codecs
import itertools
import sys
import time
from dataclasses import dataclass

import numpy as np

from . import converted, formats, hub, model, sampling, scoring, tokenizer as tok, warmup, weights


def warn(message):
    print(f"picogpt: {message}", file=sys.stderr, flush=True)


def decode_rows(forward_rows, params, config, prompts, max_new_tokens, picks, eot, stopped=(), stats=None, say=warn):
    """Decode many sequences together: each step, yield [(row, token), ...] for every row still running.

    forward_rows(inputs, **params, cache=, rows=, past=) runs the rows' new tokens through the model
    at once (kernels.gpt2_rows); picks[row](logits) chooses a row's next token. A row stops at `eot`,
    after max_new_tokens, or once the caller adds it to `stopped` (a stop string). Rows with the same
    prompt share one prefill. GPT-2's positions are absolute, so past n_positions tokens a row's cache
    cannot simply roll: that row drops the oldest quarter of its context and prefills the rest again
    (rebuilds stay rare), while the other rows go on decoding in the same step. say(message): where
    the notes on prompts and windows go (None: nowhere).
    """
    say = say or (lambda message: None)
    n_ctx, n_head, n_layer, n_embd = config["n_positions"], config["n_head"], config["n_layer"], config["n_embd"]
    run = dict(n_head=n_head, eps=config.get("layer_norm_epsilon", 1e-5))
    if max(len(ids) for ids in prompts) > n_ctx:
        say(f"a prompt has {max(len(ids) for ids in prompts)} tokens, more than the model's context of {n_ctx}: keeping the last {n_ctx}")
        prompts = [ids[-n_ctx:] for ids in prompts]
    if max_new_tokens == 0:
        return
    # Only as many positions as the rows can reach: a fresh cache's pages are faulted in as they are
    # written, and on this VM pages freed a second before come back slowly (the full context of 1024
    # for 8 rows of gpt2, 600 MB, made an idle process's next prefill 7x slower).
    n_cache = min(n_ctx, max(len(ids) for ids in prompts) + max_new_tokens)
    cache = model.kv_cache(n_layer, n_head, n_cache, n_embd // n_head, n_rows=len(prompts))
    contexts = [list(ids) for ids in prompts]  # each row's tokens whose keys and values are in the cache
    start = time.perf_counter()
    first = {}  # prompt -> the row that prefills it
    for row, ids in enumerate(prompts):
        first.setdefault(tuple(ids), row)
    prefilled = sorted(set(first.values()))
    logits = forward_rows([contexts[r] for r in prefilled], **params, **run, cache=cache, rows=prefilled, past=[0] * len(prefilled))
    for row, ids in enumerate(prompts):  # the same prompt: copy its keys and values
        source = first[tuple(ids)]
        for k, v in cache if source != row else ():
            k[row, :, : len(ids)], v[row, :, : len(ids)] = k[source, :, : len(ids)], v[source, :, : len(ids)]
    logits = logits[[prefilled.index(first[tuple(ids)]) for ids in prompts]]
    sampling.check_finite(logits, "the prompt, choosing new token 1")
    if stats is not None:
        stats.update(prompt_tokens=sum(len(contexts[r]) for r in prefilled), prefill_seconds=time.perf_counter() - start, new_tokens=0)
        start = time.perf_counter()
    running, slid = list(range(len(prompts))), False
    for i in range(max_new_tokens):
        tokens = [picks[row](logits[s]) for s, row in enumerate(running)]
        if stats is not None:
            stats.update(new_tokens=stats["new_tokens"] + len(tokens), decode_seconds=time.perf_counter() - start)
        yield list(zip(running, tokens))
        if i + 1 == max_new_tokens:
            return
        inputs, past, still = [], [], []
        for row, token in zip(running, tokens):
            if token == eot or row in stopped:
                continue
            context = contexts[row]
            if len(context) < n_ctx:  # the usual step: one token against the cache
                inputs.append([token]), past.append(len(context))
                context.append(token)
            else:  # the row's cache is full: slide its window and prefill it again
                drop = max(1, n_ctx // 4)
                if not slid:
                    say(f"the context of {n_ctx} tokens is full: sliding the window, dropping the oldest {drop} tokens at a time")
                    slid = True
                contexts[row] = context = context[drop:] + [token]
                inputs.append(context), past.append(0)
            still.append(row)
        if not still:
            return
        running = still
        logits = forward_rows(inputs, **params, **run, cache=cache, rows=running, past=past)
        sampling.check_finite(logits, f"the step choosing new token {i + 2}")  # ~10 us of a 10+ ms step


def rows_one_by_one(forward):
    """forward_rows for a one-sequence forward pass (model.gpt2): each row on its own, in turn."""

    def forward_rows(inputs, cache, rows, past, **params):
        return np.stack([forward(ids, **params, cache=[(k[r], v[r]) for k, v in cache], past=p, last=True)[-1] for ids, r, p in zip(inputs, rows, past)])

    return forward_rows


def detokenizer(tokenizer, stops=()):
    """A function taking each new token id (None: there are no more) and returning (text, finished):
    the new text, whole UTF-8 characters only, cut before any stop string; finished at end of text,
    at a stop string, or at None."""
    eot = tokenizer.eot_token
    utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text, emitted = "", 0

    def push(token):
        nonlocal text, emitted
        final = token is None or token == eot
        text += utf8.decode(b"" if final else tokenizer.decode_single_token_bytes(token), final=final)
        hits = [i for s in stops if (i := text.find(s, emitted)) >= 0]
        if hits:
            piece, emitted = text[emitted : min(hits)], len(text)
            return piece, True
        end = len(text) if final else len(text) - held_back(text, stops)
        piece, emitted = text[emitted:end], max(emitted, end)
        return piece, final

    return push


def held_back(text, stops):
    """Length of the longest end of `text` that could still grow into a stop string."""
    return max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)


def stream_text(tokens, tokenizer, stops=()):
    """Turn token ids into text pieces: whole UTF-8 characters only, cut before any stop string."""
    push = detokenizer(tokenizer, stops)
    for token in itertools.chain(tokens, [None]):
        piece, finished = push(token)
        if piece:
            yield piece
        if finished:
            return


def decode_tokens(forward, params, config, ids, max_new_tokens, pick, stats=None):
    """Yield up to max_new_tokens token ids following `ids`, one forward step per token: decode_rows
    for one row, which leaves stopping (at end of text too) to the caller."""
    for [(_, token)] in decode_rows(rows_one_by_one(forward), params, config, [ids], max_new_tokens, [pick], None, stats=stats):
        yield token


def prompt_list(prompt):
    """A prompt string or a list of them, as a list."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


@dataclass(repr=False)
class Model:
    """A loaded checkpoint: `.params` (nested HF-layout dict), `.config` (config.json), `.tokenizer` (tiktoken)."""

    params: dict
    config: dict
    tokenizer: object
    forward: object = model.gpt2
    folder: str = None  # where the checkpoint's files are
    forward_rows: object = None  # many sequences at once (kernels.gpt2_rows); None: forward on each in turn
    name: str = None  # what it was loaded as: gpt2, tiny, org/name, a folder

    def __repr__(self):  # one line: the params alone would print every weight
        c = self.config
        n = sum(int(np.prod(shape)) for shape in weights.expected_shapes(c).values())
        backend = "numpy" if self.forward is model.gpt2 else "numba"
        return (f"<picogpt.Model {self.name or self.folder}: {self.dtype}, {c['n_layer']} layers, {c['n_head']} heads, "
                f"width {c['n_embd']}, context {c['n_positions']}, {n / 1e6:.1f}M parameters, {backend} backend>")  # fmt: skip

    @property
    def dtype(self):
        """The weight format of the block linears and wte: float32, float16, bfloat16 or int8."""
        return formats.dtype_of(self.params["wte"]["weight"])

    def stream(self, prompt, max_new_tokens=50, temperature=1.0, top_k=50, top_p=1.0, seed=None, stop=None, repetition_penalty=1.0, stats=None):
        """Yield the continuation of `prompt` piece by piece as it is decoded.

        `prompt` may also be a list of prompts, decoded together as one batch: then the pieces come as
        (i, piece) pairs, i the prompt's index, and prompt i samples with its own random stream, seed + i,
        so it gets the text a single run with seed + i gives."""
        batch = not isinstance(prompt, str)
        options = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, stop=stop)
        for row, _, piece, _ in self._decode(prompt if batch else [prompt], **options, repetition_penalty=repetition_penalty, stats=stats):
            if piece:
                yield (row, piece) if batch else piece

    def generate(self, prompt, **options):
        """The continuation of `prompt` as one string, or of a list of prompts (one batch) as a list of
        strings; takes the same options as `stream`."""
        if isinstance(prompt, str):
            return "".join(self.stream(prompt, **options))
        texts = [""] * len(prompt_list(prompt))
        for row, piece in self.stream(prompt, **options):
            texts[row] += piece
        return texts

    def complete(self, prompts, logprobs=False, **options):
        """Everything about each continuation of a list of prompts (one batch; `stream`'s options): a
        list of dicts with the text, token_ids (the new tokens, without a final <|endoftext|>),
        finish_reason ("length", "eos" or "stop"), prompt_tokens, generated_tokens (counting that
        <|endoftext|>), timings for the whole batch, and with `logprobs` each token of token_ids'
        log-probability under the model (its raw logits: before penalty, temperature, top-k and top-p).
        With finish_reason "stop", token_ids run through the token that completed the stop string, so
        they decode to the text, then the stop string and whatever else that last token held. A single
        prompt string gets a list of one."""
        prompts = prompt_list(prompts)
        stats, chosen = {}, [[] for _ in prompts] if logprobs else None
        out = [dict(text="", token_ids=[], finish_reason="length", prompt_tokens=0, generated_tokens=0) for _ in prompts]
        for row, token, piece, finish in self._decode(prompts, **options, stats=stats, logprobs=chosen):
            out[row]["text"] += piece
            if token is not None:
                out[row]["generated_tokens"] += 1
                if token != self.tokenizer.eot_token:
                    out[row]["token_ids"].append(token)
            out[row]["finish_reason"] = finish or out[row]["finish_reason"]
        timings = {k: round(stats.get(k, 0.0), 4) for k in ("prefill_seconds", "decode_seconds")}
        for row, o in enumerate(out):
            o.update(prompt_tokens=stats.get("row_prompt_tokens", [0] * len(out))[row], timings=timings)
            if logprobs:
                o["logprobs"] = chosen[row][: len(o["token_ids"])]
        return out

    def _decode(self, prompts, max_new_tokens=50, temperature=1.0, top_k=50, top_p=1.0, seed=None, stop=None, repetition_penalty=1.0, stats=None, logprobs=None):
        """Decode a list of prompts as one batch. Yield (row, token, piece, finish) for every new token:
        piece the new text (maybe ""), finish None, "eos" or "stop"; then (row, None, piece, "length")
        for each row that used up max_new_tokens. logprobs: a list per row to append each chosen
        token's log-probability to."""
        prompts = prompt_list(prompts)
        sampling.check_sampling(max_new_tokens, temperature, top_k, top_p, repetition_penalty, seed)
        stops = [stop] if isinstance(stop, str) else list(stop or ())
        if not all(isinstance(s, str) and s for s in stops):
            raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")
        eot = self.tokenizer.eot_token
        ids = [tok.encode(self.tokenizer, p) or [eot] for p in prompts]  # empty prompt: start a new text
        n_vocab = self.tokenizer.n_vocab  # a padded embedding may have rows no token decodes to
        if stats is not None:
            stats["row_prompt_tokens"] = [len(i) for i in ids]

        def picker(row):
            rng, seen = np.random.default_rng(None if seed is None else seed + row), list(ids[row])

            def pick(logits):
                token = sampling.sample(sampling.penalize(logits[:n_vocab], seen, repetition_penalty), rng, temperature, top_k, top_p)
                seen.append(token)
                if logprobs is not None:
                    logprobs[row].append(float(scoring.log_softmax_at(logits[None], [token])[0]))
                return token

            return pick

        texts = [detokenizer(self.tokenizer, stops) for _ in prompts]
        stopped = set()  # rows at end of text or a stop string: decode_rows drops them
        forward_rows = self.forward_rows or rows_one_by_one(self.forward)
        if max_new_tokens:  # compile every kernel this will need now, not at the prompt and again after it
            compiled = warmup.warm_up(self, ids, max_new_tokens, say=warn)
            if stats is not None:
                stats["compile_seconds"] = compiled
        picks = [picker(row) for row in range(len(prompts))]
        for step in decode_rows(forward_rows, self.params, self.config, ids, max_new_tokens, picks, eot, stopped, stats):
            for row, token in step:
                piece, finished = texts[row](token)
                if finished:
                    stopped.add(row)
                yield row, token, piece, ("eos" if token == eot else "stop") if finished else None
        for row in range(len(prompts)):  # rows that used up max_new_tokens: any characters held back
            if row not in stopped:
                yield row, None, texts[row](None)[0], "length"

    def logprobs(self, ids, stride=None, progress=None):
        """The log-probability of each token id in `ids` given the ones before it: a float64 NumPy array
        [len(ids)] whose first entry is NaN. Texts longer than the context slide a window of n_ctx
        tokens by `stride` (default n_ctx // 2); see scoring.py. progress(n): called as tokens are scored."""
        warmup.warm_up(self, score=True, say=warn)
        return scoring.logprobs(self.forward, self.params, self.config, ids, stride, progress)

    def score(self, text, stride=None, progress=None):
        """How well the model predicts `text`: a dict of tokens, scored_tokens (all but the first), nll
        (their mean negative log-likelihood, nats), perplexity (exp nll), bits_per_byte (over the bytes
        of the scored tokens), bytes, and per token: ids, logprobs (see `logprobs`)."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {text!r}")
        ids = tok.encode(self.tokenizer, text)
        token_logprobs = self.logprobs(ids, stride, progress)
        return {**scoring.summary(self.tokenizer, ids, token_logprobs), "ids": ids, "logprobs": token_logprobs}


def forward_for(backend):
    """The forward passes, one sequence and many: "numba" (the kernels, default) or "numpy" (model.py,
    the readable reference, which runs many sequences one after another)."""
    if backend == "numba":
        from . import kernels  # imports numba: deferred so the NumPy path never pays for it

        return kernels.gpt2, kernels.gpt2_rows
    if backend == "numpy":
        return model.gpt2, rows_one_by_one(model.gpt2)
    raise ValueError(f"backend must be 'numba' or 'numpy', got {backend!r}")


def load(name_or_path="gpt2", backend="numba", dtype=None, revision=None):
    """Load a GPT-2 checkpoint by name (gpt2, gpt2-medium, ..., distilgpt2, tiny), hub repo id (at `revision`,
    a branch, tag or commit; default main) or local folder.

    dtype: the weight format to run in, "float32", "float16", "bfloat16" or "int8" (see formats.py);
    None keeps what the checkpoint holds (float32 for ordinary checkpoints, whatever their width on
    disk; the packed format of one written by `picogpt convert`). Another format than the stored one
    is converted once and kept (converted.py), so later loads map it from the file."""
    if dtype is not None and dtype not in formats.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(formats.DTYPES)}, got {dtype!r}")
    forward, forward_rows = forward_for(backend)
    folder = hub.resolve(name_or_path, revision)
    config = weights.read_config(folder)
    tokenizer = tok.load_tokenizer(folder)
    if tokenizer.n_vocab > config["vocab_size"]:  # before converting anything
        raise weights.CheckpointError(
            f"{folder}: the tokenizer has {tokenizer.n_vocab} tokens but the model only {config['vocab_size']} (vocab_size); "
            "vocab.json and merges.txt belong to another model"
        )
    params, config, _ = converted.load_params(folder, dtype)
    if backend == "numba":  # lay the weights out for the microkernel now, as part of loading
        from . import kernels

        kernels.prepare(params["wte"], params["h"], release=True)  # the panels are the weights in memory
    return Model(params, config, tokenizer, forward, folder, forward_rows, name_or_path)
