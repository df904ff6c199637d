"""`picogpt serve`'s engine side: one thread (the Worker) owns the model and the engine
(engine.py). Each step it takes new jobs and cancellations from its inbox, runs `Engine.step`, turns
each new token into text (text.py) and hands it to the job's asyncio queue as a Piece or a Done. The
room a request takes in the batch and the queue is a Reservation, given back by construction.
Metrics are what /metrics shows.
"""

import asyncio
import contextlib
import queue
import threading
import time
import traceback
from typing import NamedTuple

import numba
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from .. import sampling
from ..budget import Budget
from ..engine import Engine
from ..log import warn
from ..text import detokenizer
from .protocol import TOP_MOST, Logprobs, top_logprobs


class Metrics:
    """What /metrics shows, in a registry of its own (one per server)."""

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.running = Gauge("picogpt_requests_running", "Requests with a sequence being decoded", registry=r)
        self.waiting = Gauge("picogpt_requests_waiting", "Requests waiting for a free row of the batch", registry=r)
        self.sequences = Gauge(
            "picogpt_sequences_running", "Sequences in the batch (rows of the KV cache in use)", registry=r
        )
        self.reserved = Gauge(
            "picogpt_sequences_reserved",
            "Sequences admitted and not yet retired (running, waiting or being set up)",
            registry=r,
        )
        self.threads = Gauge(
            "picogpt_threads", "Kernel threads the last step ran on (adapted to the load: threads.py)", registry=r
        )
        self.prompt_tokens = Counter("picogpt_prompt_tokens", "Prompt tokens received", registry=r)
        self.cache_queries = Counter(
            "picogpt_prefix_cache_queries", "Prompt tokens looked up in the prefix cache", registry=r
        )
        self.cache_hits = Counter(
            "picogpt_prefix_cache_hits", "Prompt tokens found in the prefix cache (not computed again)", registry=r
        )
        self.cache_tokens = Gauge(
            "picogpt_prefix_cache_tokens", "Tokens whose keys and values the prefix cache holds", registry=r
        )
        self.cache_rows = Gauge(
            "picogpt_prefix_cache_rows", "Rows of the KV cache holding retired prefixes", registry=r
        )
        self.generated = Counter("picogpt_generation_tokens", "Tokens generated", registry=r)
        self.requests = Counter("picogpt_requests", "HTTP requests answered, by status code", ["status"], registry=r)
        self.ttft = Histogram(
            "picogpt_time_to_first_token_seconds",
            "From a completion request's arrival to its first new token",
            registry=r,
            buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.tbt = Histogram(
            "picogpt_time_between_tokens_seconds",
            "Between two new tokens of one sequence",
            registry=r,
            buckets=(0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56),
        )
        self.latency = Histogram(
            "picogpt_request_latency_seconds",
            "From a completion request's arrival to its last byte",
            registry=r,
            buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )


# ---- the engine thread -------------------------------------------------------------------------------


class Piece(NamedTuple):
    """New text of choice `index` (maybe "" with log-probabilities only); tokens: the choice's new tokens so far."""

    index: int
    text: str
    entries: list
    tokens: int


class Done(NamedTuple):
    """Choice `index` ended: "stop" or "length", after `tokens` new tokens."""

    index: int
    reason: str
    tokens: int


class Error(NamedTuple):
    """The engine failed the job (a 500)."""

    message: str


class Busy(Exception):
    """Every row of the batch and the queue are taken (a 429)."""


class Reservation:
    """Room for n sequences in the worker's batch and queue, taken at admission. Everything a handler
    does before the engine thread owns the job runs inside `with worker.reserve(n)`: whatever fails
    there (a bad value, an exception in a constructor, a cancelled handler), the room goes back on
    exit. `Worker.submit` hands it to the engine thread, which gives it back sequence by sequence as
    they retire."""

    def __init__(self, worker, n):
        self.worker, self.n, self.handed = worker, n, False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.handed:
            self.worker.release(self.n)


class Job:
    """One completions request in flight: its choices and the asyncio queue its events go to."""

    def __init__(self, loop, arrived):
        self.loop, self.events, self.arrived = loop, asyncio.Queue(), arrived
        self.choices, self.first = [], None

    def put(self, event):  # from the engine thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutting down): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Choice:
    """One sequence of a job: its picker, its text so far (cut at stop strings) and its log-probabilities;
    sends the job Piece and Done events."""

    def __init__(self, job, index, ids, o, tokenizer, n_vocab, seed, prompt_scores):
        self.job, self.index, self.ids, self.tokenizer = job, index, ids, tokenizer
        self.max_new_tokens, self.eot = o.params.max_new_tokens, tokenizer.eot_token
        self.prompt_scores = prompt_scores  # a Logprobs of the prompt, shared by the choices of one prompt
        if o.logprobs is None:
            self.logprobs = None
        else:  # with echo, offsets run on after the prompt
            self.logprobs = Logprobs(tokenizer, o.logprobs, tokenizer.decode_bytes(ids) if o.echo else b"")
        self.pick = sampling.picker(ids, o.params, seed, n_vocab, self.logprobs and self.logprobs.chosen)
        self.score = None
        if prompt_scores is not None and not prompt_scores.entries:  # the first choice of the prompt scores it
            prompt_scores.add(ids[0], None, None)
            self.score = self.scored
        self.push, self.sent, self.n_tokens = detokenizer(tokenizer, o.params.stop), 0, 0
        self.seq, self.reason, self.last = None, None, None

    def scored(self, logits, targets, cached=None):  # Engine's score callback: the prompt's log-probabilities
        """Each target's log-probability and the 5 most likely (the most a request asks: kept with the
        row for a later prompt, `cached`, which then comes without logits); this request's k of them."""
        entries = cached
        if entries is None:
            entries = []
            for row, target in zip(logits, targets):
                logp, best = top_logprobs(row, TOP_MOST)
                entries.append((float(logp[target]), best))
        for target, (logprob, best) in zip(targets, entries):
            self.prompt_scores.add(target, logprob, dict(best[: self.prompt_scores.k]) | {target: logprob})
        return entries

    def token(self, token, now, metrics):
        """A new token: emit its text. True if it completed a stop string (the sequence must end)."""
        if self.job.first is None:
            self.job.first = now
            metrics.ttft.observe(now - self.job.arrived)
        if self.last is not None:
            metrics.tbt.observe(now - self.last)
        self.last = now
        metrics.generated.inc()
        self.n_tokens += token != self.eot
        piece, finished = self.push(token)
        if finished:
            self.reason = "stop"  # end of text, or a stop string
            self.emit(piece, drop_last=True)
            return token != self.eot
        self.emit(piece)
        return False

    def emit(self, piece, drop_last=False):
        entries = None
        if self.logprobs is not None:
            end = len(self.logprobs.entries) - drop_last  # the token that ended the text is not in it
            entries, self.sent = self.logprobs.entries[self.sent : end], max(self.sent, end)
        if piece or entries:
            self.job.put(Piece(self.index, piece, entries or [], self.n_tokens))

    def done(self):
        if self.reason is None:  # max_tokens, the context's end, or the server stopping
            self.reason = "length"
            self.emit(self.push(None)[0])
        self.job.put(Done(self.index, self.reason, self.n_tokens))


def cache_rows(config, kv_dtype, cache_mb, most=256):
    """Rows of the KV cache that --cache-mb megabytes hold (each the model's context), at most `most`."""
    itemsize = 2 if kv_dtype == "float16" else 4
    row = config["n_layer"] * 2 * config["n_positions"] * config["n_embd"] * itemsize
    return min(int(cache_mb * 1e6 // row), most)


class Worker:
    """The one thread that owns the model: runs the engine, takes work from its inbox. chunk: the
    most prompt tokens a step takes (None: as many as the budget allows, budget.py). prefix_cache:
    keep retired sequences' keys and values for later prompts (engine.py), in the batch's free rows
    and `cache_mb` megabytes of rows beyond them."""

    def __init__(self, model, parallel, queue_size, chunk, metrics, prefix_cache=True, cache_mb=0):
        self.model, self.metrics, self.capacity = model, metrics, parallel + queue_size
        self.engine = Engine(
            model.forward_rows,
            model.params,
            model.config,
            parallel,
            budget=Budget(cap=chunk),
            eot=model.tokenizer.eot_token,
            kv_dtype=model.kv_dtype,
            prefix_cache=prefix_cache,
            cache_rows=cache_rows(model.config, model.kv_dtype, cache_mb),
        )
        for k, v in self.engine.cache:  # touch every page now: faulting them in mid-request stalled its first steps
            k.fill(0), v.fill(0)
        self.inbox, self.live, self.lock, self.outstanding = queue.SimpleQueue(), {}, threading.Lock(), 0
        self.counted = (0, 0)  # the engine's prefix cache figures already in the counters
        self.thread = threading.Thread(target=self.run, name="picogpt-engine", daemon=True)

    def reserve(self, n):
        """A Reservation of room for n more sequences (running, or waiting within --queue), or Busy."""
        with self.lock:
            if self.outstanding + n > self.capacity:
                raise Busy()
            self.outstanding += n
            self.metrics.reserved.set(self.outstanding)
        return Reservation(self, n)

    def release(self, n):
        with self.lock:
            self.outstanding -= n
            self.metrics.reserved.set(self.outstanding)

    def submit(self, job, reservation):
        """Hand the job, and the room reserved for its choices, to the engine thread."""
        assert reservation.n == len(job.choices) and not reservation.handed
        reservation.handed = True
        self.inbox.put(("add", job))

    def cancel(self, job):
        self.inbox.put(("cancel", job))

    def stop(self):
        self.inbox.put(("stop", None))

    def run(self):
        while True:
            items = [] if self.engine.busy else [self.inbox.get()]
            while True:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for op, job in items:
                if op == "stop":  # running requests end with what they have
                    for choice in list(self.live.values()):
                        self.engine.cancel(choice.seq)
                    self.retire()
                    return
                if op == "add":
                    self.add(job)
                    continue
                for choice in job.choices:  # cancel: the client is gone
                    if choice.seq is not None and choice.seq.finish is None:
                        self.engine.cancel(choice.seq)
            try:
                step = self.engine.step()
            except Exception as e:  # the requests in the batch fail; the server goes on
                warn(f"internal error in a decoding step: {type(e).__name__}: {e}")
                traceback.print_exc()
                for choice in self.live.values():
                    self.engine.cancel(choice.seq)
                    choice.job.put(Error(f"{type(e).__name__}: {e}"))
                self.retire(quiet=True)
                continue
            now = time.perf_counter()
            self.metrics.threads.set(numba.get_num_threads())  # the engine thread's own count, as the step set it
            for seq, token in step:
                if self.live[seq.id].token(token, now, self.metrics):
                    self.engine.cancel(seq)
            self.retire()

    def add(self, job):
        """Queue the job's choices in the engine; if one cannot be (a bug past protocol's checks), the
        job fails alone: the choices already queued are cancelled and the others' room goes back."""
        try:
            for choice in job.choices:
                choice.seq = self.engine.add(choice.ids, choice.max_new_tokens, choice.pick, choice.score)
                self.live[choice.seq.id] = choice
        except Exception as e:
            warn(f"internal error queueing a request: {type(e).__name__}: {e}")
            traceback.print_exc()
            for choice in job.choices:
                if choice.seq is not None:
                    del self.live[choice.seq.id]
                    self.engine.cancel(choice.seq)
            self.release(len(job.choices))
            job.put(Error(f"{type(e).__name__}: {e}"))

    def retire(self, quiet=False):
        """Hand back the choices whose sequences ended, and their rows' reservations; update the gauges."""
        for sid, choice in list(self.live.items()):
            if choice.seq.finish is not None:
                del self.live[sid]
                if not quiet:
                    choice.done()
                self.release(1)
        jobs = {c.job for c in self.live.values()}
        running = {c.job for c in self.live.values() if c.seq.row is not None}
        self.metrics.running.set(len(running))
        self.metrics.waiting.set(len(jobs - running))
        self.metrics.sequences.set(len(self.engine.running))
        e, m = self.engine, self.metrics
        m.cache_queries.inc(e.looked_up - self.counted[0])
        m.cache_hits.inc(e.found - self.counted[1])
        self.counted = (e.looked_up, e.found)
        m.cache_tokens.set(e.cached_tokens)
        m.cache_rows.set(len(e.held))
