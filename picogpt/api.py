"""The user's side: `load` a checkpoint into a `Model`, whose generate, stream and complete drive the
engine (engine.py) and whose logprobs and score run scoring.py."""

import contextlib
import itertools
import time
from dataclasses import dataclass, field

import numpy as np

from . import features as feature_table
from . import formats, model, reading, scoring, warmup
from . import tokenizer as tok
from .checkpoint import converted, hub
from .checkpoint import params as weights
from .engine import Engine, rows_one_by_one
from .front import Front, Request
from .inside import Inside
from .log import warn
from .options import SamplingParams


def prompt_list(prompt):
    """A prompt string or a list of them, as a list."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not (isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts)):
        raise ValueError(f"prompt must be a string or a non-empty list of strings, got {prompt!r}")
    return list(prompts)


def sampling_params(params, options):
    """`params` (a SamplingParams), or one made of keyword options: ValueError naming a bad one."""
    if params is not None:
        if options:
            raise ValueError(f"give sampling options either as params or as keywords, not both: {', '.join(options)}")
        return params
    return SamplingParams.named({}, **options)


@dataclass(repr=False)
class Model(Inside):
    """A loaded checkpoint: `.params` (nested HF-layout dict), `.config` (config.json), `.tokenizer` (tiktoken)."""

    params: dict
    config: dict
    tokenizer: object
    forward: object = model.gpt2
    folder: str = None  # where the checkpoint's files are
    forward_rows: object = None  # many sequences at once (kernels.gpt2_rows); None: forward on each in turn
    name: str = None  # what it was loaded as: gpt2, tiny, org/name, a folder
    kv_dtype: str = "float32"  # the KV cache's: "float32", or "float16" (half the memory; see model.kv_cache)
    _front: Front = field(default=None, init=False, compare=False)  # the engine's, kept between calls (front())
    _front_of: tuple = field(default=None, init=False, compare=False)  # the params and forwards it runs

    def __repr__(self):  # one line: the params alone would print every weight
        c = self.config
        n = sum(int(np.prod(shape)) for shape in weights.expected_shapes(c).values())
        backend = "numpy" if self.forward is model.gpt2 else "numba"
        cache = "" if self.kv_dtype == "float32" else f", {self.kv_dtype} KV cache"
        return (
            f"<picogpt.Model {self.name or self.folder}: {self.dtype}, {c['n_layer']} layers, {c['n_head']} heads, "
            f"width {c['n_embd']}, context {c['n_positions']}, {n / 1e6:.1f}M parameters, {backend} backend{cache}>"
        )

    @property
    def dtype(self):
        """The weight format of the block linears and wte: float32, float16, bfloat16 or int8."""
        return formats.dtype_of(self.params["wte"]["weight"])

    def stream(self, prompt, params=None, stats=None, hooks=(), steer=None, **options):
        """Yield the continuation of `prompt` piece by piece as it is decoded, sampled as `params` (a
        SamplingParams) or the keyword `options` (its fields: max_new_tokens=50, temperature=1.0,
        top_k=50, top_p=1.0, seed=None, stop=None, repetition_penalty=1.0, ...) say.

        `prompt` may also be a list of prompts, decoded together as one batch: then the pieces come as
        (i, piece) pairs, i the prompt's index, and prompt i samples with its own random stream, seed + i,
        so it gets the text a single run with seed + i gives.

        hooks: [(name or filter, fn)] at TransformerLens's hook points on every step, as run_with_hooks
        takes them (the hooks see each step's new positions only); steer: a picogpt.inside.Steer, a
        vector added to the residual stream (docs/inside.md)."""
        batch = not isinstance(prompt, str)
        for row, _, piece, _ in self._decode(
            prompt if batch else [prompt], sampling_params(params, options), stats=stats, hooks=hooks, steer=steer
        ):
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

    def complete(self, prompts, logprobs=False, params=None, hooks=(), steer=None, **options):
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
        out = [
            dict(text="", token_ids=[], finish_reason="length", prompt_tokens=0, generated_tokens=0) for _ in prompts
        ]
        for row, token, piece, finish in self._decode(
            prompts, sampling_params(params, options), stats=stats, logprobs=chosen, hooks=hooks, steer=steer
        ):
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

    def _decode(self, prompts, params, stats=None, logprobs=None, hooks=(), steer=None):
        """Decode a list of prompts as one batch, as `params` says. Yield (row, token, piece, finish) for
        every new token: piece the new text (maybe ""), finish None, "eos", "stop" or "length" (the
        last with the characters held back for a stop string; token None if it came without one).
        logprobs: a list per row to append each chosen token's log-probability to."""
        prompts = prompt_list(prompts)
        eot = self.tokenizer.eot_token
        ids = [tok.encode(self.tokenizer, p) or [eot] for p in prompts]  # empty prompt: start a new text
        if stats is not None:
            stats["row_prompt_tokens"] = [len(i) for i in ids]
        if params.max_new_tokens == 0:
            yield from ((row, None, "", "length") for row in range(len(ids)))
            return
        compiled = warmup.warm_up(self, ids, params.max_new_tokens, say=warn)  # every kernel this needs, now
        if stats is not None:
            stats["compile_seconds"] = compiled
        n_cache = max(map(len, ids)) + params.max_new_tokens
        with self.front(len(ids), n_cache, hooks, steer) as front:
            seed = lambda row: None if params.seed is None else params.seed + row  # noqa: E731
            want = None if logprobs is None else 0
            rows = {front.add(Request(i, params, seed(row), want, slide=True)).id: row for row, i in enumerate(ids)}
            computed, start, first = front.engine.prompt_tokens, time.perf_counter(), True
            while front.busy:
                updates = front.step()
                if stats is not None and any(u.token is not None for u in updates):
                    now = time.perf_counter()
                    if first:  # the prompts' step(s): prefill, then decoding is timed from here
                        stats.update(
                            prompt_tokens=front.engine.prompt_tokens - computed,
                            prefill_seconds=now - start,
                            new_tokens=0,
                        )
                        start, first = now, False
                    n = sum(u.token is not None for u in updates)
                    stats.update(new_tokens=stats["new_tokens"] + n, decode_seconds=now - start)
                for u in updates:
                    row = rows[u.handle.id]
                    if logprobs is not None:
                        logprobs[row] += [e.logprob for e in u.logprobs]
                    if u.token is not None or u.text or u.finish:
                        yield row, u.token, u.text, u.finish

    @contextlib.contextmanager
    def front(self, rows, n_cache=None, hooks=(), steer=None):
        """The engine's front for a call that decodes up to `rows` sequences at once, each up to
        `n_cache` positions: the model's own, kept between calls with rows of the whole context, so
        that its prefix cache serves a prompt that begins as an earlier one did (made again, with
        more rows, when a call needs more; a row's memory is taken as its positions are written). A
        call with hooks or steering, whose keys and values are not the model's own, or one made while
        the model's front is busy (a stream not yet read to its end), gets one of its own, of
        `n_cache` positions; so does the model once its params, forward or forward_rows are replaced
        (weights changed in place are not seen: the kernels run on panels laid out at load).
        Requests the call leaves unfinished (a stream closed early) are cancelled."""
        own, made_of = self._front, (self.params, self.forward, self.forward_rows)
        shared = not hooks and steer is None and not (own is not None and own.busy)
        if own is not None and any(a is not b for a, b in zip(self._front_of, made_of)):
            own = self._front = None  # new weights or kernels (a Model's fields replaced): its cache is not theirs
        if not shared or own is None or own.engine.parallel < rows:
            if shared:
                n_cache, self._front = None, None  # the whole context; the old rows' memory goes first
            engine = Engine(
                self.rows_with(hooks, steer),
                self.params,
                self.config,
                rows,
                n_cache=n_cache,
                eot=self.tokenizer.eot_token,
                say=warn,
                kv_dtype=self.kv_dtype,
                prefix_cache=shared,
            )
            own = Front(engine, self.tokenizer, self.reader().kernels)
            if shared:
                self._front, self._front_of = own, made_of
        try:
            yield own
        finally:
            for handle in list(own.live.values()):
                own.cancel(handle)
            own.step()  # the cancelled requests leave; nothing is fed

    def generate_many(self, prompts, params=None, rows=8, start=0, hooks=(), steer=None, **options):
        """Model.generate over any number of prompts (an iterable of strings), decoded `rows` at a time
        with continuous batching: a row that finishes takes the next prompt at once. Yields a dict for
        each prompt, in order: text, finish_reason ("length", "eos" or "stop"), prompt_tokens,
        generated_tokens, seed. Prompt i samples with seed + i, so its text is the one
        `generate(prompt, seed=seed + i)` gives, whatever the batching. Memory stays bounded: finished
        texts wait for the ones before them, and no more than 64 per row are held. start: the number
        of the first prompt (a run resumed after `start` prompts). A prompt None gets None. hooks,
        steer: as `stream`'s."""
        params = sampling_params(params, options)
        eot, prompts, end = self.tokenizer.eot_token, iter(prompts), object()
        running, done, first, next_i = {}, {}, start, start  # running: Handle.id -> (prompt's number, its dict)
        with self.front(rows, hooks=hooks, steer=steer) as front:
            while True:
                while len(running) < rows and next_i - first < 64 * rows:  # admit: a free row takes the next prompt
                    prompt = next(prompts, end)
                    if prompt is end:
                        break
                    if prompt is None:
                        done[next_i] = None
                        next_i += 1
                        continue
                    if not isinstance(prompt, str):
                        raise ValueError(f"prompt {next_i} must be a string, got {prompt!r}")
                    ids = tok.encode(self.tokenizer, prompt) or [eot]  # empty prompt: start a new text
                    seed = None if params.seed is None else params.seed + next_i
                    out = dict(text="", finish_reason="length", prompt_tokens=len(ids), generated_tokens=0, seed=seed)
                    if params.max_new_tokens == 0:
                        done[next_i] = out
                    else:
                        warmup.warm_up(self, [ids], params.max_new_tokens, say=warn)
                        running[front.add(Request(ids, params, seed, slide=True)).id] = (next_i, out)
                    next_i += 1
                while first in done:  # in order, as soon as each is ready
                    yield done.pop(first)
                    first += 1
                if not running:
                    if next_i == first:
                        return
                    continue
                for u in front.step():
                    i, out = running[u.handle.id]
                    out["text"] += u.text
                    out["generated_tokens"] += u.token is not None
                    if u.finish:
                        out["finish_reason"] = u.finish
                        done[i] = out
                        del running[u.handle.id]

    def score_many(self, texts, stride=None, budget=None, skip=0, features=None, observer=None):
        """score() of any number of texts (an iterable of strings), the windows of many texts in each
        forward pass (scoring.logprobs_many: budget, the most tokens a pass holds). Yields score's
        totals for each text, in order, without the per-token lists; a text under 2 tokens gets
        tokens, scored_tokens 0, bytes 0, None for the figures and a `reason`. Memory stays bounded.
        skip: leave out the first `skip` texts, which are only tokenized (resuming a run: the figures
        after them are exactly those of a run over all the texts). features: a `--features` string or
        list ("min-k=20,gltr", features.py): each text's totals then hold "features", {name: value};
        observer: the second Model of Binoculars (the same tokenizer), run on the same windows."""
        wanted = parse_features(features, observer)
        warmup.warm_up(self, score=True, say=warn)
        texts, ids = itertools.tee(text_of(i, t) for i, t in enumerate(texts))
        ids, scored = itertools.tee(tok.encode(self.tokenizer, t) for t in ids)
        at = self.reader() if wanted else self.log_softmax_at
        many = scoring.logprobs_many(
            *self.rows(),
            scored,
            stride,
            budget,
            at=at,
            skip=skip,
            kv_dtype=self.kv_dtype,
            observer=self.observer_rows(observer),
        )
        for text, ids_, lp in itertools.islice(zip(texts, ids, many), skip, None):
            if wanted is None:
                yield scoring.summary(self.tokenizer, ids_, lp)
            else:
                yield {
                    **scoring.summary(self.tokenizer, ids_, lp["logprob"]),
                    "features": feature_table.of(lp, text.encode("utf-8"), wanted),
                }

    def read(self, text, top=5, stride=None, observer=None, progress=None):
        """How the model reads `text`, token by token (reading.py): a reading.Reading of each token's
        id, text, logprob, rank, entropy, the variance of log p, and the `top` most likely tokens with
        their logprobs, arrays over the tokens (the first's figures NaN: nothing comes before it).
        Windows as in `score`; observer: a second Model, whose cross term goes to the records (see
        `records`). progress(n): called as tokens are scored."""
        ids = tok.encode(self.tokenizer, text_of(0, text))
        return reading.Reading.of(self.tokenizer, ids, self.records(ids, top, stride, observer, progress))

    def records(self, ids, top=0, stride=None, observer=None, progress=None):
        """The reading.py records of token ids `ids` (a structured array [len(ids)]), observer's cross
        term included when one is given."""
        warmup.warm_up(self, score=True, say=warn)
        if len(ids) < 2:
            raise ValueError(f"reading needs a text of at least 2 tokens, got {len(ids)}")
        [out] = scoring.logprobs_many(
            *self.rows(),
            [ids],
            stride,
            at=self.reader(top),
            kv_dtype=self.kv_dtype,
            observer=self.observer_rows(observer),
            progress=progress,
        )
        return out

    def rows(self):
        """(forward_rows, params, config): what the batched scorer runs."""
        return self.forward_rows or rows_one_by_one(self.forward), self.params, self.config

    def reader(self, top=0):
        """reading.Reader, on the kernels unless the model runs on NumPy."""
        return reading.Reader(top, kernels=self.forward is not model.gpt2)

    def observer_rows(self, other):
        """A second model's rows() for Binoculars (None without one), checked to share this model's tokenizer."""
        if other is None:
            return None
        probe = "The observer reads 12 tokens, même en français."
        if other.tokenizer.n_vocab != self.tokenizer.n_vocab or other.tokenizer.encode(probe) != self.tokenizer.encode(
            probe
        ):
            raise ValueError(
                "the observer must have this model's tokenizer: another GPT-2 checkpoint beside a GPT-2, the tiny model itself beside tiny"
            )
        warmup.warm_up(other, score=True, say=warn)
        return other.rows()

    @property
    def log_softmax_at(self):
        """scoring.log_softmax_at, on the kernels unless the model runs on NumPy."""
        if self.forward is model.gpt2:
            return scoring.log_softmax_at
        from . import kernels

        return kernels.log_softmax_at

    def logprobs(self, ids, stride=None, progress=None):
        """The log-probability of each token id in `ids` given the ones before it: a float64 NumPy array
        [len(ids)] whose first entry is NaN. Texts longer than the context slide a window of n_ctx
        tokens by `stride` (default n_ctx // 2); see scoring.py. progress(n): called as tokens are scored."""
        warmup.warm_up(self, score=True, say=warn)
        return scoring.logprobs(self.forward, self.params, self.config, ids, stride, progress, self.kv_dtype)

    def score(self, text, stride=None, progress=None, features=None, observer=None):
        """How well the model predicts `text`: a dict of tokens, scored_tokens (all but the first), nll
        (their mean negative log-likelihood, nats), perplexity (exp nll), bits_per_byte (over the bytes
        of the scored tokens), bytes, and per token: ids, logprobs (see `logprobs`). features,
        observer: as score_many's, and the figures go to "features"."""
        if not isinstance(text, str):
            raise ValueError(f"text must be a string, got {text!r}")
        wanted = parse_features(features, observer)
        ids = tok.encode(self.tokenizer, text)
        if wanted is None:
            token_logprobs = self.logprobs(ids, stride, progress)
            return {**scoring.summary(self.tokenizer, ids, token_logprobs), "ids": ids, "logprobs": token_logprobs}
        records = self.records(ids, 0, stride, observer, progress) if len(ids) >= 2 else reading.blank(len(ids), 0)
        return {
            **scoring.summary(self.tokenizer, ids, records["logprob"]),
            "ids": ids,
            "logprobs": records["logprob"],
            "features": feature_table.of(records, text.encode("utf-8"), wanted),
        }


def parse_features(features, observer):
    """features.parse of `features` (None: None); ValueError if Binoculars is asked without an observer."""
    if features is None:
        return None
    wanted = feature_table.parse(features)
    if feature_table.needs_observer(wanted) and observer is None:
        raise ValueError("the feature 'binoculars' needs a second model: give an observer (--observer MODEL)")
    return wanted


def text_of(i, text):
    if not isinstance(text, str):
        raise ValueError(f"text {i} must be a string, got {text!r}")
    return text


def forward_for(backend):
    """The forward passes, one sequence and many: "numba" (the kernels, default) or "numpy" (model.py,
    the readable reference, which runs many sequences one after another)."""
    if backend == "numba":
        from . import kernels  # imports numba: deferred so the NumPy path never pays for it

        return kernels.gpt2, kernels.gpt2_rows
    if backend == "numpy":
        return model.gpt2, rows_one_by_one(model.gpt2)
    raise ValueError(f"backend must be 'numba' or 'numpy', got {backend!r}")


def load(name_or_path="gpt2", backend="numba", dtype=None, revision=None, kv_dtype="float32"):
    """Load a GPT-2 checkpoint by name (gpt2, gpt2-medium, ..., distilgpt2, tiny), hub repo id (at `revision`,
    a branch, tag or commit; default main) or local folder.

    dtype: the weight format to run in, "float32", "float16", "bfloat16" or "int8" (see formats.py);
    None keeps what the checkpoint holds (float32 for ordinary checkpoints, whatever their width on
    disk; the packed format of one written by `picogpt convert`). Another format than the stored one
    is converted once and kept (converted.py), so later loads map it from the file; float16 or
    bfloat16 asked of an ordinary checkpoint that stores its weights so already loads them as they are.

    kv_dtype: the KV cache's, for everything the model runs (generate, score, the server): "float32"
    (the default: logits as torch's), or "float16", half the cache's memory per sequence and the
    bytes attention reads per token, with keys and values rounded to float16 (see docs/speed.md)."""
    if dtype is not None and dtype not in formats.DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(formats.DTYPES)}, got {dtype!r}")
    if kv_dtype not in model.KV_DTYPES:
        raise ValueError(f"kv_dtype must be 'float32' or 'float16', got {kv_dtype!r}")
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
    return Model(params, config, tokenizer, forward, folder, forward_rows, name_or_path, kv_dtype)
