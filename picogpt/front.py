"""The engine's front: one Request for everything asked of the engine, and the Updates it answers.

`Model.generate`, `stream`, `complete` and `generate_many`, and the server's engine thread all drive
the engine (engine.py) through a Front, as thin loops over `Front.step`: a request's picker, its
prompt scoring, its text (whole UTF-8 characters, cut before a stop string) and its
log-probabilities are set up here once, as vLLM's EngineCore and output processor do it for its
front ends, and the prefix cache serves every caller alike.

A Request is native types, parsed at the edge (the CLI and api.py, the server's protocol.py): token
ids, SamplingParams, a seed, and what to return. Each step says, of each request that got something,
its new token, its new text, the log-probabilities asked for, and when it ends, why.
"""

import itertools
from typing import NamedTuple

from . import sampling
from .options import SamplingParams
from .reading import Reader
from .text import detokenizer

TOP_MOST = 5  # the most likely tokens kept at each scored prompt token: the most a request may ask (OpenAI's)


class Request(NamedTuple):
    """What a caller asks of the engine."""

    ids: list  # the prompt's token ids, at least one
    params: SamplingParams  # how it continues: max_new_tokens, temperature, stop strings, ...
    seed: int = None  # the picker's random stream (None: fresh entropy)
    logprobs: int = None  # each new token's log-probability and the k most likely (0: its own only); None: none
    echo: bool = False  # score the prompt: each token's log-probability and the TOP_MOST most likely
    slide: bool = False  # once the context is full, slide its window (Engine.add); else end there, "length"


class Entry(NamedTuple):
    """A token's log-probability under the raw logits (None at a prompt's first token) and the most
    likely tokens there, [(token, logprob)] best first; its rank (1: the most likely) and the
    entropy of the distribution there, nats (reading.py)."""

    token: int
    logprob: float
    top: list
    rank: int = None
    entropy: float = None


def entries(records, targets):
    """The Entry of each target from its reading.py records."""
    return [
        Entry(
            int(t),
            float(r["logprob"]),
            list(zip(r["top"].tolist(), r["top_logprob"].tolist())),
            int(r["rank"]),
            float(r["entropy"]),
        )
        for t, r in zip(targets, records)
    ]


class Update(NamedTuple):
    """What one request got in a step."""

    handle: object  # the Handle `add` returned
    token: int  # the new token, or None (prompt log-probabilities only, or the end)
    text: str  # the new text, maybe ""
    logprobs: list  # [Entry] of the new token, where `logprobs` was asked
    prompt: list  # [Entry] of prompt tokens scored since the last update, where `echo` was asked
    finish: str  # None while it runs, else "eos", "stop" (a stop string), "length" or "cancelled"


class Handle:
    """A request in the front: read `finish` and `tokens` (new tokens so far); the rest is the front's."""

    _ids = itertools.count()

    def __init__(self, request, tokenizer, n_vocab, kernels=True):
        self.id, self.request, self.tokens, self.finish = next(self._ids), request, 0, None
        self.kernels = kernels  # reading.Reader's
        self.push = detokenizer(tokenizer, request.params.stop)
        self.chosen, self.prompt = [], []  # entries not yet handed out
        if request.echo:
            self.prompt.append(Entry(request.ids[0], None, None))
        told = self._chosen if request.logprobs is not None else None
        self.pick = sampling.picker(request.ids, request.params, request.seed, n_vocab, told)
        self.seq = None

    def __repr__(self):
        return f"<picogpt.front.Handle {self.id}: {self.seq}>"

    def _chosen(self, logits, token):  # the picker's: a picked token, with the raw logits it came from
        read = Reader(self.request.logprobs, self.kernels)
        self.chosen += entries(read(logits[None], [token]), [token])

    def scored(self, logits, targets, cached=None):
        """Engine's score callback: each prompt target's Entry, with the TOP_MOST most likely (kept
        with the row for a later prompt, which gets them back as `cached`, without logits)."""
        got = cached if cached is not None else entries(Reader(TOP_MOST, self.kernels)(logits, targets), targets)
        self.prompt += got
        return got


class Front:
    """`add` Requests, `step` while `busy`, `cancel` any: each step's Updates, in order of admission."""

    def __init__(self, engine, tokenizer, kernels=True):
        """kernels: the log-probabilities' figures on the kernels (reading.Reader), else in NumPy."""
        self.engine, self.tokenizer, self.eot, self.kernels = engine, tokenizer, tokenizer.eot_token, kernels
        self.live = {}  # Handle.id -> Handle, until its last update

    def __repr__(self):
        return f"<picogpt.Front: {len(self.live)} requests on {self.engine}>"

    @property
    def busy(self):
        return bool(self.live)

    def add(self, request):
        """Queue a request; its Handle names it in updates. ValueError for a prompt the engine refuses."""
        handle = Handle(request, self.tokenizer, self.tokenizer.n_vocab, self.kernels)
        score = handle.scored if request.echo else None
        handle.seq = self.engine.add(request.ids, request.params.max_new_tokens, handle.pick, score, request.slide)
        self.live[handle.id] = handle
        return handle

    def cancel(self, handle):
        """End a request now: its last update, "cancelled", comes with the next step."""
        self.engine.cancel(handle.seq)

    def step(self):
        """One engine step; [Update] of every request that got a token, log-probabilities or its end."""
        got = {seq.id: token for seq, token in self.engine.step()}
        updates = []
        for handle in list(self.live.values()):
            token, seq, text, finish = got.get(handle.seq.id), handle.seq, "", None
            if token is not None:
                handle.tokens += 1
                text, ended = handle.push(token)
                if ended:  # end of text, or a stop string: the sequence ends here
                    finish = "eos" if token == self.eot else "stop"
                    self.engine.cancel(seq)
            if finish is None and seq.finish is not None:  # max_new_tokens, the context's end, or cancelled
                finish = seq.finish
                text += handle.push(None)[0]  # the characters held back for a stop string
            if token is not None or handle.chosen or handle.prompt or finish:
                updates.append(Update(handle, token, text, handle.chosen, handle.prompt, finish))
                handle.chosen, handle.prompt = [], []
            if finish:
                handle.finish = finish
                del self.live[handle.id]
        return updates
