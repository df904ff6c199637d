"""An English corpus every Python installation has offline: the help topics and stdlib docstrings.

    from tiny_corpus import corpus, heldout_text
    train_docs, heldout_docs = corpus()

A document is one help topic (`pydoc_data.topics.topics`, values in key order) or one docstring
(module, public class, public function or public method) of a standard-library module. The order is
fixed: topics first, then modules in `sorted(sys.stdlib_module_names)` order, and within a module its
docstring, then its public names sorted, each class followed by its own public methods sorted. Only
objects defined in the module count, only docstrings of 40 characters or more, and a text seen
before is dropped. Every document in position i with i % 10 == 9 is held out.

The documents depend only on the Python build (its version and which optional C modules it has), so
the corpus is the same run to run: they are collected in a fresh `python -I -S`, so neither what the
calling process imported nor site-packages (setuptools' distutils shim) can change them.

`heldout_text()` is the held-out documents, each preceded by `<|endoftext|>` and nothing else: with
a GPT-2 tokenizer that treats `<|endoftext|>` as the special token (picogpt.tokenizer.encode), it
becomes exactly the held-out token stream that train_tiny.py reports perplexity on.
"""

import contextlib
import functools
import importlib
import inspect
import io
import json
import os
import subprocess
import sys
import tempfile
import warnings

ENDOFTEXT = "<|endoftext|>"
MIN_CHARS = 40
# Modules whose import does something (opens a browser, prints, starts Tk), is slow, or that install
# or generate rather than document.
SKIP = {
    "antigravity",
    "this",
    "idlelib",
    "tkinter",
    "turtle",
    "turtledemo",
    "lib2to3",
    "ensurepip",
    "venv",
    "pydoc_data",
    "__phello__",
}


@contextlib.contextmanager
def silenced():
    """Swallow warnings and whatever is written to stdout/stderr, from Python or from C (fds 1 and 2).

    Yields a StringIO that holds all of it on exit, so a module that prints can be told apart.
    """
    captured = io.StringIO()
    with tempfile.TemporaryFile() as sink, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        streams = [s for s in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__) if s is not None]
        for stream in streams:
            stream.flush()  # so none of the caller's earlier output lands in the sink
        saved = [os.dup(1), os.dup(2)]
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
                yield captured
        finally:
            for stream in streams:
                stream.flush()  # anything written to the real sys.__stdout__ goes to the sink too
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            sink.seek(0)
            captured.write(sink.read().decode(errors="replace"))


def quiet_import(name):
    """The module `name`, or None if importing it raises anything or prints anything."""
    with silenced() as output:
        try:
            module = importlib.import_module(name)
        except (Exception, SystemExit):  # a module that exits on import is no use here either
            return None
    return None if output.getvalue() else module


def own_doc(obj):
    """obj's own cleaned docstring, or "": unlike inspect.getdoc we never borrow a base class's text."""
    doc = getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if isinstance(doc, str) else ""


def module_docs(module):
    """Docstrings of the module and of the public classes, functions and methods defined in it, in a fixed order."""
    name = module.__name__
    docs = [own_doc(module)]
    for attr, obj in sorted(vars(module).items()):
        if attr.startswith("_") or getattr(obj, "__module__", None) != name:
            continue  # private, or imported from another module
        if inspect.isclass(obj):
            docs.append(own_doc(obj))
            for method_name, method in sorted(vars(obj).items()):
                method = getattr(method, "__func__", method)  # unwrap classmethod / staticmethod
                if (
                    not method_name.startswith("_")
                    and inspect.isroutine(method)
                    and getattr(method, "__module__", name) == name
                ):
                    docs.append(own_doc(method))
        elif inspect.isroutine(obj):
            docs.append(own_doc(obj))
    return docs


def collect_docs():
    """Every document in its fixed order, de-duplicated (first occurrence kept), each at least MIN_CHARS long."""
    from pydoc_data.topics import topics

    docs = [topics[key].strip() for key in sorted(topics)]
    with warnings.catch_warnings():  # reading some attributes warns too (typing.io is deprecated)
        warnings.simplefilter("ignore")
        for name in sorted(sys.stdlib_module_names):
            if name.startswith("_") or name in SKIP or (module := quiet_import(name)) is None:
                continue
            docs += module_docs(module)
    seen = set()
    return [d for d in docs if len(d) >= MIN_CHARS and not (d in seen or seen.add(d))]


@functools.cache
def all_docs():
    """collect_docs() run in a fresh `python -I -S`: the standard library as shipped, whatever this process
    has imported (torch, for one, replaces inspect.getfile), and none of those imports left behind here."""
    child = subprocess.run(
        [sys.executable, "-I", "-S", os.path.abspath(__file__), "--json"], capture_output=True, check=True
    )
    return tuple(json.loads(child.stdout))


def corpus():
    """(train_docs, heldout_docs): lists of strings; documents at index i % 10 == 9 are held out."""
    docs = all_docs()
    return [d for i, d in enumerate(docs) if i % 10 != 9], [d for i, d in enumerate(docs) if i % 10 == 9]


def heldout_text():
    """The held-out documents as one string, each preceded by <|endoftext|> (no other separator)."""
    return "".join(ENDOFTEXT + d for d in corpus()[1])


if __name__ == "__main__":
    if sys.argv[1:] == ["--json"]:  # all_docs() asks a child process for the documents this way
        print(json.dumps(collect_docs()))
    else:
        train, heldout = corpus()
        for label, docs in (("train", train), ("held-out", heldout)):
            print(f"{label}: {len(docs)} documents, {sum(map(len, docs)):,} characters")
