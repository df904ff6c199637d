"""`picogpt serve`'s engine side: one thread (the Worker) owns the model and the engine's front
(front.py). Each step it takes new jobs and cancellations from its inbox, runs `Front.step` and hands
each update to its job's asyncio queue as a Piece, which the HTTP side shapes. The room a request
takes in the batch and the queue is a Reservation, given back by construction. Metrics are what
/metrics shows.
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

from ..budget import Budget, most_for
from ..engine import Engine
from ..front import Front
from ..kernels.forward import rows_max
from ..log import warn


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
    """What choice `index` got in a step (front.Update, for the HTTP side to shape): new text (maybe
    ""), the front.Entry of its new token and of prompt tokens scored, its new tokens so far, and
    when it ends, why ("eos", "stop", "length" or "cancelled")."""

    index: int
    text: str
    logprobs: list
    prompt: list
    tokens: int
    finish: str


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
    """One completions request in flight: its front.Requests (one per choice, made at the edge) and
    the asyncio queue the engine thread puts their Pieces on."""

    def __init__(self, loop, arrived, requests):
        self.loop, self.events, self.arrived, self.requests = loop, asyncio.Queue(), arrived, requests

    def put(self, event):  # from the engine thread
        with contextlib.suppress(RuntimeError):  # the event loop is gone (shutting down): nobody is listening
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


def cache_rows(config, kv_dtype, cache_mb, most=256):
    """Rows of the KV cache that --cache-mb megabytes hold (each the model's context), at most `most`."""
    itemsize = 2 if kv_dtype == "float16" else 4
    row = config["n_layer"] * 2 * config["n_positions"] * config["n_embd"] * itemsize
    return min(int(cache_mb * 1e6 // row), most)


class Worker:
    """The one thread that owns the model: drives the engine's front, takes work from its inbox. chunk:
    the most prompt tokens a step takes (None: as many as the budget allows, budget.py). prefix_cache:
    keep retired sequences' keys and values for later prompts (engine.py), in the batch's free rows
    and `cache_mb` megabytes of rows beyond them."""

    def __init__(self, model, parallel, queue_size, chunk, metrics, prefix_cache=True, cache_mb=0):
        self.model, self.metrics, self.capacity = model, metrics, parallel + queue_size
        self.engine = Engine(
            model.forward_rows,
            model.params,
            model.config,
            parallel,
            budget=Budget(cap=chunk, most=most_for(rows_max(model.params["wte"]["weight"]))),
            eot=model.tokenizer.eot_token,
            kv_dtype=model.kv_dtype,
            prefix_cache=prefix_cache,
            cache_rows=cache_rows(model.config, model.kv_dtype, cache_mb),
        )
        for k, v in self.engine.cache:  # touch every page now: faulting them in mid-request stalled its first steps
            k.fill(0), v.fill(0)
        self.front = Front(self.engine, model.tokenizer, model.reader().kernels)
        self.inbox, self.lock, self.outstanding = queue.SimpleQueue(), threading.Lock(), 0
        self.jobs = {}  # Handle.id -> (job, choice index) while it runs
        self.first, self.last = {}, {}  # job -> its first token's time; Handle.id -> its last token's
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
        assert reservation.n == len(job.requests) and not reservation.handed
        reservation.handed = True
        self.inbox.put(("add", job))

    def cancel(self, job):
        self.inbox.put(("cancel", job))

    def stop(self):
        self.inbox.put(("stop", None))

    def run(self):
        while True:
            items = [] if self.front.busy else [self.inbox.get()]
            while True:
                try:
                    items.append(self.inbox.get_nowait())
                except queue.Empty:
                    break
            for op, job in items:
                if op == "stop":  # running requests end with what they have
                    for handle in list(self.front.live.values()):
                        self.front.cancel(handle)
                    self.tell(self.front.step(), stopping=True)
                    return
                if op == "add":
                    self.add(job)
                    continue
                for handle in list(self.front.live.values()):  # cancel: the client is gone
                    if self.jobs[handle.id][0] is job:
                        self.front.cancel(handle)
            try:
                updates = self.front.step()
            except Exception as e:  # the requests in the batch fail; the server goes on
                warn(f"internal error in a decoding step: {type(e).__name__}: {e}")
                traceback.print_exc()
                for job in {self.jobs[h.id][0] for h in self.front.live.values()}:
                    job.put(Error(f"{type(e).__name__}: {e}"))
                for handle in list(self.front.live.values()):
                    self.front.cancel(handle)
                self.tell(self.front.step(), send=False)
                continue
            self.metrics.threads.set(numba.get_num_threads())  # the engine thread's own count, as the step set it
            self.tell(updates)

    def add(self, job):
        """Queue the job's requests in the front; if one cannot be (a bug past protocol's checks), the
        job fails alone: the ones already queued are cancelled and the others' room goes back."""
        handles = []
        try:
            for index, request in enumerate(job.requests):
                handles.append(self.front.add(request))
                self.jobs[handles[-1].id] = (job, index)
        except Exception as e:
            warn(f"internal error queueing a request: {type(e).__name__}: {e}")
            traceback.print_exc()
            job.put(Error(f"{type(e).__name__}: {e}"))
            for handle in handles:  # their room goes back as they leave, at the next step
                self.front.cancel(handle)
            self.release(len(job.requests) - len(handles))

    def tell(self, updates, stopping=False, send=True):
        """Send each update to its job as a Piece; give back the room of the choices that ended;
        update the metrics. stopping: the server stops, and what was cancelled ends as "length";
        send False: the jobs failed (they were sent an Error), only give the room back."""
        now, m = time.perf_counter(), self.metrics
        for u in updates:
            job, index = self.jobs[u.handle.id]
            if u.token is not None:
                if job not in self.first:
                    self.first[job] = now
                    m.ttft.observe(now - job.arrived)
                if u.handle.id in self.last:
                    m.tbt.observe(now - self.last[u.handle.id])
                self.last[u.handle.id] = now
                m.generated.inc()
            finish = "length" if stopping and u.finish == "cancelled" else u.finish
            if finish:  # its room goes back before the client can hear of the end, and ask again
                del self.jobs[u.handle.id]
                self.last.pop(u.handle.id, None)
                self.release(1)
            if send:
                job.put(Piece(index, u.text, u.logprobs, u.prompt, u.handle.tokens, finish))
        running = {job for job, _ in self.jobs.values()}
        for job in set(self.first) - running:
            del self.first[job]
        e = self.engine
        decoding = {self.jobs[h.id][0] for h in self.front.live.values() if h.seq.row is not None}
        m.running.set(len(decoding))
        m.waiting.set(len(running - decoding))
        m.sequences.set(len(e.running))
        m.cache_queries.inc(e.looked_up - self.counted[0])
        m.cache_hits.inc(e.found - self.counted[1])
        self.counted = (e.looked_up, e.found)
        m.cache_tokens.set(e.cached_tokens)
        m.cache_rows.set(len(e.held))
