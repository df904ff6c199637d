"""Everything Numba compiles: the element-wise and attention kernels (ops.py), the one matmul kernel
for every weight format and row count (microkernel.py), and the forward pass on them (forward.py),
model.py's twin. `picogpt.kernels.gpt2` takes model.gpt2's arguments and returns its logits.

Compiled kernels are cached on disk (Numba's `cache=True`) in a folder named by a hash of this
folder's sources and formats.py (the table the kernels are compiled against). Numba invalidates a
cached kernel only when its own file changes, not when a kernel it calls from another file does
(Numba's docs, "Cache invalidation"): after an edit to ops.py alone, forward.py's cached block_rows
would keep the old attend_rows. A new hash is a new, empty folder, so any edit compiles every kernel
again, once, and nothing of the package is written. The folder's name also carries the shape the
microkernel is compiled for (target.py), so the shapes tested on one machine keep their own kernels.
The folders live under $NUMBA_CACHE_DIR if set, else ~/.cache/picogpt/numba; older hashes' folders
are removed when a new one is made.
"""

import hashlib
import os
import shutil

HERE = os.path.dirname(os.path.abspath(__file__))
SOURCES = sorted(os.path.join(HERE, f) for f in os.listdir(HERE) if f.endswith(".py")) + [
    os.path.join(os.path.dirname(HERE), "formats.py")
]


def cache_dir(sources=SOURCES, base=None, shape=None):
    """The folder for kernels compiled from `sources` for `shape` (target.name()):
    base/picogpt-<16 hex of their sha256>-<shape>."""
    from . import target

    digest = hashlib.sha256()
    for path in sources:
        with open(path, "rb") as f:
            digest.update(os.path.basename(path).encode() + b"\0" + f.read())
    base = (
        base or os.environ.get("NUMBA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "picogpt", "numba")
    )
    return os.path.join(base, f"picogpt-{digest.hexdigest()[:16]}-{shape or target.name()}")


def use_cache(folder):
    """Point Numba's cache at `folder` (before any kernel is compiled or loaded), removing the folders
    of other hashes beside it: kernels compiled from sources that are no longer these."""
    import numba

    if not os.path.isdir(folder):
        parent, hashed = os.path.dirname(folder), os.path.basename(folder)[: len("picogpt-") + 16]
        for entry in os.listdir(parent) if os.path.isdir(parent) else ():
            if entry.startswith("picogpt-") and not entry.startswith(hashed):
                shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)
    numba.config.CACHE_DIR = folder


use_cache(cache_dir())

from . import microkernel, ops  # noqa: E402  (after the cache folder is set)
from .forward import ROWS_MAX, Layer, block_rows, forget, gpt2, gpt2_rows, linear, prepare, rows_max  # noqa: E402
from .ops import cross_at, log_softmax_at, read_at  # noqa: E402

__all__ = [
    "gpt2",
    "gpt2_rows",
    "log_softmax_at",
    "read_at",
    "cross_at",
    "prepare",
    "forget",
    "linear",
    "block_rows",
    "Layer",
    "ROWS_MAX",
    "rows_max",
    "ops",
    "microkernel",
]
