"""GPT-2's byte-level BPE as a `tiktoken.Encoding`, built from a checkpoint's own vocab.json + merges.txt.

We read the two files ourselves rather than through tiktoken's loader: that loader caches every file
it reads under the system temp folder, and drops the last line of merges.txt on the assumption that
the file ends in a newline, losing a merge when it does not.
"""

import json
import os

import tiktoken

# GPT-2's pre-tokenizer split (tiktoken's r50k/gpt2 pattern).
PAT_STR = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
ENDOFTEXT = "<|endoftext|>"


class TokenizerError(Exception):
    """vocab.json / merges.txt are unreadable or disagree: the message names the file."""


def bytes_to_unicode():
    """GPT-2's map from each byte to the printable character that stands for it in vocab.json."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{b: chr(b) for b in printable}, **{b: chr(256 + n) for n, b in enumerate(others)}}


def read_merges(path):
    """Yield the (first, second) pairs of merges.txt in order, one line at a time."""
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            line = line.rstrip("\r\n")  # a missing final newline is fine
            if (i == 0 and line.startswith("#version")) or not line.strip():
                continue
            pair = line.split(" ")
            if len(pair) != 2:
                raise TokenizerError(f"{path}: line {i + 1} must hold two tokens separated by one space")
            yield pair


def load_tokenizer(folder):
    """A tiktoken Encoding whose token ids equal the checkpoint's vocab.json ids."""
    vocab_path, merges_path = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
    try:
        with open(vocab_path, encoding="utf-8") as f:
            vocab = json.load(f)
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read the tokenizer in {folder}: {e}") from None
    byte_of = {c: b for b, c in bytes_to_unicode().items()}

    def decode(token):
        return bytes(byte_of[c] for c in token)

    # tiktoken merges by rank, so rank must be merge priority: the 256 single bytes first, then the
    # merges in file order. For GPT-2 vocabularies these ranks are exactly the vocab.json ids.
    if not isinstance(vocab, dict) or not vocab:
        raise TokenizerError(f"{vocab_path} holds no tokens: download or save the checkpoint again")
    missing = [c for c in bytes_to_unicode().values() if c not in vocab]
    if missing:
        raise TokenizerError(
            f"{vocab_path} lacks {len(missing)} of GPT-2's 256 single-byte tokens (such as {missing[0]!r}): it is not a GPT-2 byte-level vocabulary"
        )
    try:
        ranks = {decode(c): vocab[c] for c in bytes_to_unicode().values()}
        if sorted(ranks.values()) != list(range(256)):
            raise TokenizerError(f"{vocab_path}: the 256 single-byte tokens must have ids 0 to 255, as in GPT-2")
        for n, (first, second) in enumerate(read_merges(merges_path)):
            token = decode(first) + decode(second)
            if vocab.get(first + second) != 256 + n:
                raise TokenizerError(
                    f"{merges_path}: merge {n + 1} ({first} {second}) is not vocab.json id {256 + n}; "
                    "picogpt needs a GPT-2 style vocabulary whose ids follow the merge order"
                )
            ranks[token] = 256 + n
    except KeyError as e:
        raise TokenizerError(f"{vocab_path} and {merges_path} disagree: {e} is not a GPT-2 byte-level token") from None
    except (OSError, ValueError) as e:
        raise TokenizerError(f"cannot read the tokenizer in {folder}: {e}") from None
    specials = {token: i for token, i in vocab.items() if i >= len(ranks)}
    if ENDOFTEXT not in specials:
        raise TokenizerError(f"{vocab_path} has no {ENDOFTEXT} token")
    return tiktoken.Encoding(
        name=f"gpt2:{os.path.abspath(folder)}",
        pat_str=PAT_STR,
        mergeable_ranks=ranks,
        special_tokens=specials,
        explicit_n_vocab=len(vocab),
    )


def encode(tokenizer, text):
    # A literal <|endoftext|> in the text becomes the special token, as Hugging Face's tokenizer does.
    return tokenizer.encode(text, allowed_special="all")
