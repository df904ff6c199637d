"""OpenAI's completions request and response shapes: reading a request's JSON into checked options,
and token log-probabilities in the legacy `logprobs` shape. No HTTP here (server.py) and no model."""

import codecs
import re
import secrets
from typing import NamedTuple

from .. import tokenizer as tok
from ..front import TOP_MOST, Request
from ..options import OPENAI, BadValue, SamplingParams, number, whole


class BadRequest(ValueError):
    """A request OpenAI would refuse: the message names the field (`param`); status 400 or 404."""

    def __init__(self, message, param=None, status=400, code=None):
        super().__init__(message)
        self.param, self.status, self.code = param, status, code


def field(body, name, default, check, wants):
    """body[name] if present and not null, else default; BadRequest naming it unless check(value)."""
    value = body.get(name)
    if value is None:
        return default
    if not check(value):
        raise BadRequest(f"'{name}' must be {wants}, got {value!r}", name)
    return value


def prompts_of(body, tokenizer, n_vocab, n_ctx=None):
    """The request's prompts as token id lists: a string, a list of strings, a list of token ids, or a
    list of lists of token ids. Returns [(ids, text)]: an empty prompt is <|endoftext|> (a new text);
    BadRequest for one longer than n_ctx."""
    prompts = [(ids or [tokenizer.eot_token], text) for ids, text in _prompts(body, tokenizer, n_vocab)]
    for ids, _ in prompts:
        if n_ctx is not None and len(ids) > n_ctx:
            raise BadRequest(
                f"the prompt has {len(ids)} tokens, more than this model's context of {n_ctx}: shorten it",
                "prompt",
                code="context_length_exceeded",
            )
    return prompts


def _prompts(body, tokenizer, n_vocab):
    encode = lambda text: tok.encode(tokenizer, text)  # noqa: E731
    prompt = body.get("prompt")
    wants = "a string, a list of strings, a list of token ids or a list of lists of token ids"
    if isinstance(prompt, str):
        return [(encode(prompt), prompt)]
    if not isinstance(prompt, list) or not prompt:
        raise BadRequest(f"'prompt' must be {wants}, got {prompt!r}"[:300], "prompt")
    if all(isinstance(p, str) for p in prompt):
        return [(encode(p), p) for p in prompt]
    lists = [prompt] if all(whole(t) for t in prompt) else prompt
    if not all(isinstance(ids, list) and ids and all(whole(t) for t in ids) for ids in lists):
        raise BadRequest(f"'prompt' must be {wants} (none empty)", "prompt")
    for ids in lists:
        bad = [t for t in ids if not 0 <= t < n_vocab]
        if bad:
            raise BadRequest(
                f"'prompt' holds token id {bad[0]}, outside this model's vocabulary of {n_vocab}", "prompt"
            )
    return [(list(ids), tokenizer.decode(ids)) for ids in lists]


def requests_of(prompts, o):
    """The engine's Request of each choice, prompt by prompt. Choice i of a prompt samples with seed
    + i, as `picogpt generate --num-samples` does; with no seed, one is drawn here and used as a given
    one would be (OpenAI's response has no field to report it)."""
    seed = o.params.seed if o.params.seed is not None else secrets.randbits(32)
    scored = o.echo and o.logprobs is not None  # the prompt's log-probabilities are wanted
    return [Request(ids, o.params, seed + i, o.logprobs, scored) for ids, _ in prompts for i in range(o.n)]


class Options(NamedTuple):
    """A completions request's options: how to sample (SamplingParams, OpenAI's names and ranges) and
    what to answer."""

    params: SamplingParams
    n: int  # choices per prompt; choice i samples with seed + i
    logprobs: int  # None: none; k: each token's log-probability and the k most likely
    echo: bool  # the prompt in front of the text (and its log-probabilities)
    stream: bool
    include_usage: bool  # a last chunk with the usage (stream_options)


NAMES = {field: f"'{name}'" for field, name in OPENAI.items()}  # as errors quote them


def options_of(body, n_vocab, served):
    """The sampling and output options of a completions request, checked: Options, or BadRequest
    naming the field."""
    if not isinstance(body, dict):
        raise BadRequest("the request body must be a JSON object")
    model = body.get("model")
    if model is not None and model != served:
        raise BadRequest(
            f"the model {repr(model)[:100]} does not exist here: this server has {served!r}",  # repr: one line
            "model",
            404,
            "model_not_found",
        )
    stop = field(
        body,
        "stop",
        [],
        lambda v: isinstance(v, str) or (isinstance(v, list) and len(v) <= 4 and all(isinstance(s, str) for s in v)),
        "a string or a list of up to 4 strings",
    )
    bias = {}
    for key, value in field(
        body, "logit_bias", {}, lambda v: isinstance(v, dict), "an object of token ids to biases from -100 to 100"
    ).items():
        token = (
            int(key) if isinstance(key, str) and re.fullmatch(r"-?[0-9]{1,9}", key) else None
        )  # ASCII digits: "²".isdigit()
        if token is None or not 0 <= token < n_vocab or not (number(value) and -100 <= value <= 100):
            raise BadRequest(
                f"'logit_bias' must map token ids (0 to {n_vocab - 1}) to biases from -100 to 100, got {key!r}: {value!r}",
                "logit_bias",
            )
        bias[token] = float(value)
    sampling = {
        f: body[name] for f, name in OPENAI.items() if body.get(name) is not None and f not in ("stop", "logit_bias")
    }
    try:
        params = SamplingParams.named(
            NAMES,
            openai=True,
            **sampling,
            stop=[s for s in ([stop] if isinstance(stop, str) else stop) if s],
            logit_bias=bias,
        )
    except BadValue as e:
        raise BadRequest(str(e), OPENAI[e.field]) from None
    o = Options(
        params=params,
        n=field(body, "n", 1, lambda v: whole(v) and 1 <= v <= 128, "a whole number from 1 to 128"),
        logprobs=field(
            body, "logprobs", None, lambda v: whole(v) and 0 <= v <= TOP_MOST, f"a whole number from 0 to {TOP_MOST}"
        ),
        echo=field(body, "echo", False, lambda v: isinstance(v, bool), "true or false"),
        stream=field(body, "stream", False, lambda v: isinstance(v, bool), "true or false"),
        include_usage=field(body, "stream_options", {}, lambda v: isinstance(v, dict), "an object").get(
            "include_usage", False
        ),
    )
    if params.max_new_tokens == 0 and not o.echo:
        raise BadRequest("'max_tokens' must be >= 1 (0 only with echo, to score the prompt)", "max_tokens")
    if not isinstance(o.include_usage, bool):
        raise BadRequest("'stream_options.include_usage' must be true or false", "stream_options")
    if body.get("best_of") not in (None, o.n):
        raise BadRequest("'best_of' is not supported: leave it out or equal to n", "best_of")
    if body.get("suffix"):
        raise BadRequest("'suffix' is not supported by GPT-2 models", "suffix")
    return o


# ---- log-probabilities in OpenAI's legacy shape -------------------------------------------------------


def token_text(tokenizer, token):
    """A token's text as OpenAI shows it: its bytes as UTF-8, or "bytes:\\xNN..." for a part of a character."""
    data = tokenizer.decode_single_token_bytes(token)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


class Logprobs:
    """The legacy `logprobs` object of one choice, from the engine's entries (front.Entry: token,
    logprob or None, the most likely [(token, logprob)] or None, rank, entropy): the k most likely of
    each and the token itself, and text_offset, the characters of the text before each token; and
    picogpt's token_ranks (1: the most likely) and token_entropies (nats), None at a prompt's first
    token, in fields OpenAI's clients ignore (docs/reading.md)."""

    def __init__(self, tokenizer, k, after=b""):
        """after: the bytes of the text before the first token (an echoed prompt), for text_offset."""
        self.tokenizer, self.k = tokenizer, k
        self.utf8 = codecs.getincrementaldecoder("utf-8")(errors="ignore")  # the characters so far, a token at a time
        self.chars = len(self.utf8.decode(after))

    def shape(self, entries):
        """The object for these entries, the ones after those shaped before (offsets run on)."""
        name = lambda t: token_text(self.tokenizer, t)  # noqa: E731
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        out |= {"token_ranks": [], "token_entropies": []}  # picogpt's own, which OpenAI's clients ignore
        for token, logprob, top, rank, entropy in entries:
            out["token_ranks"].append(rank)
            out["token_entropies"].append(entropy)
            out["tokens"].append(name(token))
            out["token_logprobs"].append(logprob)
            out["top_logprobs"].append(
                None if top is None else {name(t): lp for t, lp in [*top[: self.k], (token, logprob)]}
            )
            out["text_offset"].append(self.chars)
            self.chars += len(self.utf8.decode(self.tokenizer.decode_single_token_bytes(token)))
        return out


REASON = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "length"}  # OpenAI's finish_reason


class Choice:
    """One choice of a response, built from the engine's Pieces (worker.py): the echoed prompt in
    front, then the new text, log-probabilities in the legacy shape, the finish reason, and the
    completion tokens (an <|endoftext|> that ends the text is not one, nor in the log-probabilities,
    nor is the token that completes a stop string)."""

    def __init__(self, tokenizer, index, o, prompt):
        self.index, self.echo = index, prompt if o.echo else ""
        self.logprobs = None if o.logprobs is None else Logprobs(tokenizer, o.logprobs)
        self.held, self.started, self.finish, self.tokens = [], False, None, 0  # held: the prompt's entries

    def take(self, piece):
        """(text, logprobs or None, finish_reason or None) of a Piece, the echoed prompt and its
        log-probabilities in front of the first; None while the prompt is being scored."""
        self.held += piece.prompt
        self.tokens = piece.tokens - (piece.finish == "eos")
        if not (piece.tokens or piece.finish):
            return None
        entries = piece.logprobs[:-1] if piece.finish in ("eos", "stop") else piece.logprobs
        text = piece.text
        if not self.started:
            self.started, text, entries = True, self.echo + text, self.held + entries
        self.finish = REASON.get(piece.finish)
        return text, None if self.logprobs is None else self.logprobs.shape(entries), self.finish
