"""The decode engine: continuous batching over one KV cache of n_rows rows.

A sequence is a prompt, a token picker and a budget of new tokens. `add` queues it; each `step`
admits queued sequences into free cache rows, runs one forward pass that holds the next token of
every decoding sequence and a piece of prompt for sequences still prefilling (chunked prefill, as
vLLM does: a long prompt never stalls the running streams for more than one step; a Budget, in
budget.py, sizes the pieces from the step times it measures), picks each decoding sequence's next
token and retires the finished ones, whose rows the next admissions reuse;
`cancel` retires one from outside (a stop string, a client gone). Every front end (`Model.generate`,
`generate_many`, the CLI, the server) drives this one loop through its front (front.py), which turns
a Request into the Sequence added here; `decode_rows` is the bare loop the benchmarks and warm-up use.

A sequence's tokens go through the same kernels whatever else is in the batch (each row of the
microkernel is its own sum), so its output does not depend on its neighbours. A prompt that shares
its start with a sequence already in the cache copies those keys and values instead of computing them
(the n choices of one prompt prefill once).
"""

import contextlib
import itertools
import time
from collections import deque
from typing import NamedTuple

import numpy as np

from . import model, sampling
from .log import warn


class Sequence:
    """One sequence in the engine: read `finish` (None while running; "eos", "length" or "cancelled")
    and `new_tokens`; the rest is the engine's."""

    _ids = itertools.count()

    def __init__(self, ids, max_new_tokens, pick, score=None, slide=False):
        self.id = next(self._ids)
        self.prompt, self.max_new_tokens, self.pick, self.score, self.slide = (
            list(ids),
            max_new_tokens,
            pick,
            score,
            slide,
        )
        self.context = []  # tokens whose keys and values are in the cache row, from position 0
        self.scores = []  # what `score` returned for the prompt's tokens 1, 2, ... (None: nothing to keep)
        self.todo = list(ids)  # tokens to feed: the prompt (in chunks), then each picked token
        self.row, self.finish, self.new_tokens = None, None, 0
        self.due = 0  # when its prompt is due, in prompt tokens computed by the engine (Engine.schedule)

    @property
    def prefilling(self):  # a prompt (or a slid window) to feed, rather than one picked token
        return len(self.todo) > 1 or self.new_tokens == 0

    def __repr__(self):
        state = self.finish or ("waiting" if self.row is None else "prefilling" if self.prefilling else "decoding")
        return f"<Sequence {self.id}: {len(self.prompt)} prompt tokens, {self.new_tokens}/{self.max_new_tokens} new, {state}>"


class Batch(NamedTuple):
    """What one step feeds: (sequence, how many of its tokens) in order, and whether the logits of
    every token are wanted (a prompt being scored) rather than each sequence's last."""

    fed: list
    every: bool
    decoding: int  # how many of `fed` are decoding sequences, one token each; the other tokens are prompt

    @property
    def prompt(self):
        return sum(n for _, n in self.fed) - self.decoding


def common_prefix(a, b):
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class Engine:
    """Continuous batching: `add` sequences, `step` until `busy` is False, `cancel` any of them.

    forward_rows(inputs, **params, cache=, rows=, past=, last=): kernels.gpt2_rows or
    rows_one_by_one(model.gpt2). n_cache: positions per row (default the model's context); chunk: the
    most prompt tokens one step prefills (None: whole prompts at once); budget: a Budget that chooses
    them instead, from the step times it measures (its cap in place of chunk); eot: the token that
    ends a sequence (None: none does). say(message): where the notes on windows go. kv_dtype: the
    cache's, "float32" or "float16" (model.kv_cache). prefix_cache: keep retired rows' keys and values
    for later prompts that begin the same way; cache_rows: rows for them beyond the n_rows that run."""

    def __init__(
        self,
        forward_rows,
        params,
        config,
        n_rows,
        n_cache=None,
        chunk=None,
        budget=None,
        eot=None,
        say=None,
        kv_dtype="float32",
        prefix_cache=True,
        cache_rows=0,
    ):
        if chunk is not None and budget is not None:
            raise ValueError("give a chunk or a budget (Budget(cap=chunk)), not both")
        self.forward_rows, self.params, self.eot, self.chunk, self.budget = forward_rows, params, eot, chunk, budget
        self.n_ctx = config["n_positions"]
        self.n_cache = min(n_cache or self.n_ctx, self.n_ctx)
        self.hyper = dict(n_head=config["n_head"], eps=config.get("layer_norm_epsilon", 1e-5))
        self.parallel, self.prefix_cache = n_rows, prefix_cache
        n_rows += cache_rows if prefix_cache else 0
        self.cache = model.kv_cache(
            config["n_layer"], config["n_head"], self.n_cache, config["n_embd"], n_rows=n_rows, dtype=kv_dtype
        )
        self.free = list(range(n_rows))
        self.held, self.retired = {}, {}  # free row -> the tokens its keys and values are of; when it was freed
        self.scored = {}  # free row -> its prompt's score entries (for tokens 1, 2, ... of `held`)
        self.looked_up = self.found = 0  # prompt tokens looked up in the prefix cache, and found there
        self.waiting, self.running = deque(), []  # running: in order of admission
        self.say = say or (lambda message: None)
        self.slid = self.cut = False  # the notes on windows, said once
        self.prompt_tokens = 0  # prompt tokens computed (not copied from another row)

    def __repr__(self):
        return f"<picogpt.Engine: {len(self.running)} running, {len(self.waiting)} waiting, {len(self.free)} free rows of {self.n_cache} positions>"

    @property
    def busy(self):
        return bool(self.running or self.waiting)

    def add(self, ids, max_new_tokens, pick, score=None, slide=False):
        """Queue a sequence: prompt `ids` (token ids), up to max_new_tokens new tokens chosen by
        pick(logits [n_vocab]) -> token id. score(logits [m, n_vocab], targets [m], cached=None):
        called with the logits before each prompt token after the first, in order, as the prompt is
        prefilled; it may return a list of what it made of each (its entries), which the prefix cache
        keeps with the row and gives back to a later prompt's score as `cached` (logits None) for the
        tokens it shares.
        slide: once the cache row is full, drop the oldest quarter and prefill the rest again (else
        the sequence ends there, "length"). A prompt longer than the cache is an error unless slide."""
        if not len(ids):
            raise ValueError("an empty prompt: give at least one token")
        if len(ids) > self.n_cache:
            if not slide:
                raise ValueError(
                    f"the prompt has {len(ids)} tokens, more than the {self.n_cache} positions a row holds"
                )
            if not self.cut:  # once, as the sliding window's note
                self.say(
                    f"a prompt has {len(ids)} tokens, more than the model's context of {self.n_cache}: keeping the last {self.n_cache}"
                )
                self.cut = True
            ids = ids[-self.n_cache :]
        seq = Sequence(ids, max_new_tokens, pick, score, slide)
        seq.due = self.prompt_tokens + len(ids)
        self.waiting.append(seq)
        return seq

    def cancel(self, seq):
        """End a sequence now; its row is free for the next admission."""
        if seq.finish is None:
            if seq in self.waiting:
                self.waiting.remove(seq)
            self._retire(seq, "cancelled")

    def _retire(self, seq, reason):
        seq.finish = seq.finish or reason
        if seq.row is not None:
            if self.prefix_cache and seq.context:
                self.held[seq.row] = seq.context  # what its keys and values are of, from position 0
                self.scored[seq.row] = seq.scores or []
            self.retired[seq.row] = next(self._clock)
            self.free.append(seq.row)
            self.running.remove(seq)
            seq.row = None

    _clock = itertools.count()

    def _admit(self, seq):
        """A free row for seq: the one holding the longest start of its prompt (seq then feeds only
        the rest, at least its last token, for the logits), else an empty one, else the least recently
        freed (its prefix is evicted). A scored prompt reuses as much of a row as that row's scores
        cover: the logits before token i are the row's if tokens 0..i are."""
        best, row = 0, None
        if self.prefix_cache and not seq.context:
            want = len(seq.todo) - 1
            self.looked_up += want
            for r in self.free:
                n = min(common_prefix(self.held.get(r, ()), seq.todo), want)
                if seq.score is not None:
                    n = min(n - 1, len(self.scored.get(r, ())))
                if n > best:
                    best, row = n, r
        if row is None:
            row = min(self.free, key=lambda r: (r in self.held, self.retired.get(r, -1)))
        else:
            self.found += best
            if seq.score is not None:  # the prompt's first `best` scores, as computed for the row
                seq.scores = list(self.scored[row][:best])
                seq.score(None, seq.todo[1 : best + 1], cached=seq.scores)
            seq.context, seq.todo = seq.todo[:best], seq.todo[best:]
            seq.due -= best
        self.free.remove(row)
        self.held.pop(row, None)
        self.scored.pop(row, None)
        return row

    @property
    def cached_tokens(self):
        """Tokens whose keys and values free rows hold for later prompts."""
        return sum(map(len, self.held.values()))

    def _share(self, seq):
        """Copy the keys and values of seq's prompt start from a row that already holds them; return
        False if a sequence admitted earlier is still prefilling more of that start (then wait for it)."""
        if seq.context or seq.score is not None:  # prompt logprobs need the prompt's logits: compute them
            return True
        want = len(seq.todo) - 1  # the last token is fed, for its logits
        best, donor, earlier = 0, None, True
        for other in self.running:  # in order of admission
            if other is seq:
                earlier = False
                continue
            have = min(common_prefix(other.context, seq.todo), want)
            if have > best:
                best, donor = have, other
            if earlier and other.new_tokens == 0 and common_prefix(other.context + other.todo, seq.todo[:want]) > best:
                return False
        if donor is not None:
            for k, v in self.cache:
                k[seq.row, :, :best], v[seq.row, :, :best] = k[donor.row, :, :best], v[donor.row, :, :best]
            seq.context, seq.todo = seq.todo[:best], seq.todo[best:]
        return True

    def step(self):
        """One forward pass over every running sequence: schedule, run, update (as vLLM's scheduler,
        runner and update_from_output). Returns [(seq, token), ...] for the sequences that got a new
        token; sequences that end leave `running` (their `finish` says why)."""
        batch = self.schedule()
        if not batch.fed:
            return []
        timed = self.budget.step(batch.decoding, batch.prompt) if self.budget else contextlib.nullcontext()
        with timed:  # the budget learns what a step of these rows and prompt tokens costs
            return self.update(batch, self.run(batch))

    def schedule(self):
        """Which sequences get how many tokens this step: admit waiting sequences into free rows, then
        one token for every decoding sequence and prompt tokens for the ones prefilling, as many in
        all as the budget allows beside those rows (else `chunk`, else whole prompts): decoding first,
        so a long prompt never stalls the streams.

        Prompts go in order of when they are due: the prompt tokens the engine had computed when the
        prompt arrived, plus its own tokens to compute (fair queueing's virtual finish time, with
        prompt tokens as the clock). A short prompt thus goes before a long one that arrived about
        when it did, as shortest-first would have it (the median time to first token falls: the
        shortest half of a load's prompts holds about a quarter of its tokens), but never before a
        prompt that arrived more of its own length earlier, so no prompt waits for ever."""
        while self.waiting and self.free and len(self.running) < self.parallel:
            seq = self.waiting.popleft()
            seq.row = self._admit(seq)
            self.running.append(seq)
        decoding = sum(not seq.prefilling for seq in self.running)
        left = self.budget.tokens(decoding) if self.budget else (self.chunk or self.n_cache * len(self.running))
        fed = []
        for seq in sorted(self.running, key=lambda s: (s.prefilling, s.prefilling and s.due)):  # decoding first
            prefilling = seq.prefilling
            if prefilling and not self._share(seq):
                continue
            n = min(len(seq.todo), left) if prefilling else 1
            if n:
                fed.append((seq, n))
                if prefilling:
                    left -= n
                    self.prompt_tokens += n
        return Batch(fed, any(seq.score is not None for seq, _ in fed), decoding)

    def run(self, batch):
        """The forward pass: logits [rows, n_vocab], one row per sequence (its last token's), or one
        per token fed when a sequence's prompt is being scored (batch.every)."""
        fed = batch.fed
        inputs, rows, past = (
            [seq.todo[:n] for seq, n in fed],
            [seq.row for seq, _ in fed],
            [len(seq.context) for seq, _ in fed],
        )
        logits = self.forward_rows(
            inputs, **self.params, **self.hyper, cache=self.cache, rows=rows, past=past, last=not batch.every
        )
        newest = max(seq.new_tokens for seq, _ in fed)
        sampling.check_finite(
            logits, f"the step choosing new token {newest + 1}" if newest else "the prompt, choosing new token 1"
        )
        return logits

    def update(self, batch, logits):
        """What the logits mean for each sequence: prompt scores, the next token picked, and the
        sequences that end (end of text, max_new_tokens, a full context) or slide their window."""
        ends = np.cumsum([n for _, n in batch.fed]) - 1 if batch.every else np.arange(len(batch.fed))
        out = []
        for (seq, n), end in zip(batch.fed, ends):
            if seq.score is not None:
                start = len(seq.context)
                targets = seq.prompt[start + 1 : start + n + 1]
                entries = seq.score(logits[end - n + 1 : end - n + 1 + len(targets)], targets)
                seq.scores = None if entries is None or seq.scores is None else seq.scores + list(entries)
            seq.context += seq.todo[:n]
            seq.todo = seq.todo[n:]
            if seq.todo:  # more prompt to come
                continue
            seq.score = None
            if seq.new_tokens == seq.max_new_tokens:  # max_new_tokens 0: the prompt was only scored
                self._retire(seq, "length")
                continue
            token = seq.pick(logits[end])
            seq.new_tokens += 1
            out.append((seq, token))
            if token == self.eot:
                self._retire(seq, "eos")
            elif seq.new_tokens == seq.max_new_tokens:
                self._retire(seq, "length")
            elif len(seq.context) < self.n_cache:
                seq.todo = [token]
            elif seq.slide:  # GPT-2's positions are absolute: drop the oldest quarter, prefill the rest again
                drop = max(1, self.n_ctx // 4)
                if not self.slid:
                    self.say(
                        f"the context of {self.n_ctx} tokens is full: sliding the window, dropping the oldest {drop} tokens at a time"
                    )
                    self.slid = True
                seq.todo, seq.context = seq.context[drop:] + [token], []
            else:
                self._retire(seq, "length")
        return out


def decode_rows(
    forward_rows,
    params,
    config,
    prompts,
    max_new_tokens,
    picks,
    eot,
    stopped=(),
    stats=None,
    say=warn,
    kv_dtype="float32",
):
    """The bare engine loop, without the front's text and stop strings (the benchmarks, warmup.py):
    decode a fixed batch of prompts together on the engine: each step, yield [(row, token), ...]
    for every row that got a token. picks[row](logits) chooses row's next token; a row stops at
    `eot`, after max_new_tokens, or once the caller adds it to `stopped` (a stop string). A row whose
    context fills slides its window (Engine.add). say(message): where the notes go (None: nowhere).
    kv_dtype: the cache's (Engine)."""
    if max_new_tokens == 0:
        return
    # Only as many positions as the rows can reach: a fresh cache's pages are faulted in as they are
    # written, and on this VM pages freed a second before come back slowly (the full context of 1024
    # for 8 rows of gpt2, 600 MB, made an idle process's next prefill 7x slower).
    n_cache = min(config["n_positions"], max(len(ids) for ids in prompts) + max_new_tokens)
    engine = Engine(forward_rows, params, config, len(prompts), n_cache=n_cache, eot=eot, say=say, kv_dtype=kv_dtype)
    seqs = [engine.add(ids, max_new_tokens, pick, slide=True) for ids, pick in zip(prompts, picks)]
    row_of = {seq.id: row for row, seq in enumerate(seqs)}
    start, first = time.perf_counter(), True
    while engine.busy:
        for row in stopped:
            engine.cancel(seqs[row])
        step = engine.step()
        if not step:
            continue
        if stats is not None:
            now = time.perf_counter()
            if first:
                stats.update(prompt_tokens=engine.prompt_tokens, prefill_seconds=now - start, new_tokens=0)
                start, first = now, False
            stats.update(new_tokens=stats["new_tokens"] + len(step), decode_seconds=now - start)
        yield [(row_of[seq.id], token) for seq, token in step]


def decode_tokens(forward, params, config, ids, max_new_tokens, pick, stats=None):
    """Yield up to max_new_tokens token ids following `ids`, one forward step per token: decode_rows
    for one row, which leaves stopping (at end of text too) to the caller."""
    for [(_, token)] in decode_rows(
        rows_one_by_one(forward), params, config, [ids], max_new_tokens, [pick], None, stats=stats
    ):
        yield token


def rows_one_by_one(forward):
    """forward_rows for a one-sequence forward pass (model.gpt2): each row on its own, in turn."""

    def forward_rows(inputs, cache, rows, past, last=True, keep=None, **params):
        outs = [
            forward(ids, **params, cache=[(k[r], v[r]) for k, v in cache], past=p, last=last and keep is None)
            for ids, r, p in zip(inputs, rows, past)
        ]
        out = np.concatenate(outs)
        return out if keep is None else out[keep]

    return forward_rows
