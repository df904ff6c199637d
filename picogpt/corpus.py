"""Corpora as JSON Lines: documents in (files, .gz too, or standard input), one result line out for each
input line, in input order, written as each is ready and resumable.

An output file that exists is continued: its whole lines are kept (each must carry the id of the input
line it answers), a cut-short last line is dropped, and the run goes on from the first line it lacks.
Lines are written whole, one write each, and flushed, so a run killed at any moment leaves whole lines.
"""

import collections
import gzip
import itertools
import json
import math
import os
import sys
from typing import NamedTuple

from .checkpoint.safetensors import replacing


class CorpusError(Exception):
    """A problem with the input or output files: its message is the one line the user sees."""


class Line(NamedTuple):
    """One input line: its id (the id field, else its line number), the text in the field, or an error."""

    id: object
    text: str = None
    error: str = None


def open_input(path):
    """A binary file object for `path`: - is standard input, .gz is decompressed."""
    if path == "-":
        return sys.stdin.buffer
    try:
        return gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror}") from None


def size_of(paths):
    """The input's size in bytes (compressed, for .gz), for the progress bar; None for standard input."""
    return None if "-" in paths else sum(os.path.getsize(p) for p in paths)


def read(paths, field, id_field, where=None):
    """Yield a Line for every line of the files, in order. The fallback id is the line number
    (from 1), or "file:number" with more than one file. where: a list that gets the bytes read so far
    (compressed, for .gz), for the progress bar."""
    done = 0
    for path in paths:
        f = open_input(path)
        raw = getattr(f, "fileobj", f)  # under gzip: the compressed file, whose position is the progress
        try:
            for number, data in enumerate(f, 1):
                fallback = number if len(paths) == 1 else f"{path}:{number}"
                yield parse(data, number, fallback, field, id_field)
                if where is not None:
                    where[:] = [done + (raw.tell() if raw is not sys.stdin.buffer else 0)]
        except (OSError, EOFError) as e:  # a damaged .gz, or a file that went away
            raise CorpusError(f"cannot read {path}: {e}") from None
        finally:
            if f is not sys.stdin.buffer:
                done += os.path.getsize(path)
                f.close()


def parse(data, number, fallback, field, id_field):
    try:
        obj = json.loads(data)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        reason = "not UTF-8" if isinstance(e, UnicodeDecodeError) else "not JSON"
        return Line(fallback, error=f"line {number}: {reason}")
    if not isinstance(obj, dict):
        return Line(fallback, error=f"line {number}: not a JSON object")
    id_ = obj.get(id_field, fallback)
    if field not in obj:
        return Line(id_, error=f'line {number}: no "{field}" field')
    if not isinstance(obj[field], str):
        return Line(id_, error=f'line {number}: "{field}" is not a string')
    return Line(id_, obj[field])


class Output:
    """Where result lines go: a file (continued if it exists) or standard output (None)."""

    def __init__(self, path):
        self.path, self.done, self.ids = path, 0, []
        if path is None:
            self.file = sys.stdout
            return
        try:
            with open(path, "ab+") as f:  # creates it if need be
                f.seek(0)
                whole = 0
                for line in f:
                    if not line.endswith(b"\n"):  # a line cut short by a kill: written again
                        break
                    self.ids.append(json.loads(line)["id"])
                    whole += len(line)
                f.truncate(whole)
        except (ValueError, KeyError, TypeError):
            raise CorpusError(f"{path} holds lines that are not picogpt's results: pick another -o") from None
        except OSError as e:
            raise CorpusError(f"cannot write {path}: {e.strerror}") from None
        self.done = len(self.ids)
        self.file = open(path, "a", encoding="utf-8")  # noqa: SIM115  (closed by close)

    def check(self, i, line):
        """Line i of the input is already answered in the file: it must be the same document."""
        if self.ids[i] != line.id:
            raise CorpusError(
                f"{self.path} does not continue this input: its line {i + 1} is for id {self.ids[i]!r}, "
                f"the input's is {line.id!r}; remove it or pick another -o"
            )

    def write(self, result):
        self.file.write(json.dumps(result, ensure_ascii=False) + "\n")
        self.file.flush()

    def close(self):
        if self.file is not sys.stdout:
            self.file.close()


def result(line, figures):
    """The output line of a document: its id and its figures, or its error."""
    if line.error is not None:
        return {"id": line.id, "error": line.error}
    return {"id": line.id, **figures}


def buckets(path):
    """CCNet's tags: each scored document of the file `path` is head, middle or tail by the terciles of
    this run's perplexities (lowest third head), rewritten in place, atomically. Returns the two cutoffs."""
    with open(path, encoding="utf-8") as f:
        perplexities = sorted(r["perplexity"] for r in map(json.loads, f) if r.get("perplexity") is not None)
    if not perplexities:
        return None
    low, high = (perplexities[min(len(perplexities) - 1, math.ceil(q * len(perplexities)) - 1)] for q in (1 / 3, 2 / 3))
    with open(path, encoding="utf-8") as f, replacing(path) as out:
        for line in f:
            r = json.loads(line)
            p = r.get("perplexity")
            r["bucket"] = None if p is None else "head" if p <= low else "middle" if p <= high else "tail"
            out.write((json.dumps(r, ensure_ascii=False) + "\n").encode())
    return low, high


class Job(NamedTuple):
    """A corpus run as the command line gives it."""

    paths: list  # input files; "-" is standard input
    output: str = None  # None: standard output
    field: str = "text"  # the field that holds each document (or prompt)
    id_field: str = "id"
    stride: int = None  # scoring: tokens between window starts (default half the context)
    buckets: bool = False  # scoring: tag head, middle, tail by this run's perplexity terciles
    rows: int = 8  # generation: sequences decoded together
    features: str = None  # scoring: --features, each document's figures (features.py)
    observer: str = None  # scoring: --observer, the second model of Binoculars


class Counts(dict):
    """What a run did, for its last line on stderr: documents by outcome, and tokens."""

    def add(self, line, figures):
        kind = "bad" if line.error else "short" if figures.get("reason") else "done"
        self[kind] = self.get(kind, 0) + 1
        self["tokens"] = self.get("tokens", 0) + (figures.get("scored_tokens") or figures.get("generated_tokens") or 0)


def run(job, compute, progress=None):
    """Write a result line for each input line, in input order, continuing `job.output` if it exists.
    compute(texts, done) -> the figures of each text after the first `done` (texts: every line's text,
    None for a bad line). Returns the Counts."""
    out, counts, pending = Output(job.output), Counts(), collections.deque()

    def texts():  # every line's text; the lines after those answered wait in `pending` for their figures
        n = 0
        for i, line in enumerate(read(job.paths, job.field, job.id_field, progress and progress.where)):
            n = i + 1
            if i < out.done:
                out.check(i, line)  # answered already: it must be the same input
            else:
                pending.append(line._replace(text=None))
            yield line.text
        if out.done > n:
            raise CorpusError(f"{out.path} has {out.done} lines but the input only {n}: remove it or pick another -o")

    try:
        for figures in compute(texts(), out.done):
            line = pending.popleft()
            r = result(line, figures or {})
            out.write(r)
            counts.add(line, r)
            if progress:
                progress(counts)
    finally:
        out.close()
    return counts


def score(model, job, progress=None, observer=None):
    """Score every document of the job's input on `model` (Model.score_many, the job's features with
    `observer`, a loaded Model, for Binoculars); returns the Counts."""
    # a bad line's "" costs nothing, and its error replaces the figures
    return run(
        job,
        lambda texts, done: model.score_many(
            (t or "" for t in texts), job.stride, skip=done, features=job.features, observer=observer
        ),
        progress,
    )


def generate(model, job, params, progress=None, steer=None):
    """Continue every prompt of the job's input on `model` (Model.generate_many, steered if asked);
    returns the Counts."""
    return run(
        job,
        lambda texts, done: model.generate_many(
            itertools.islice(texts, done, None), params, rows=job.rows, start=done, steer=steer
        ),
        progress,
    )
