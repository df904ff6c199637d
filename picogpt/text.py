"""Token ids to text as it is decoded: whole UTF-8 characters only, cut before any stop string."""

import codecs
import itertools


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
