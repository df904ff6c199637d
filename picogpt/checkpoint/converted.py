"""Converted copies: `load(name, dtype=D)` converts a checkpoint stored in another format once,
keeps the result as an ordinary checkpoint folder and memory-maps it on every later start. An
ordinary checkpoint whose linears and wte are already float16 (or bfloat16) loads in that format as
it is, with no copy written (`as_stored`).

Copies live in $PICOGPT_CACHE (else $XDG_CACHE_HOME/picogpt, else ~/.cache/picogpt), under
converted/<model>-<dtype>-<12 hex of sha256(source folder's realpath, dtype)>/, laid out exactly as
`picogpt convert` writes a folder (config.json, model.safetensors, vocab.json, merges.txt) plus
source.json: the realpath, size and mtime of every source file picogpt reads. A copy is used only
while those all match, so a new hub revision (a new snapshot folder) or a replaced local
model.safetensors is converted again. Each time a copy is written, the copies whose source files are
gone or changed are removed (`prune`: a temporary checkpoint's would otherwise stay for good); `rm -r`
a copy's folder to delete it sooner.

The conversion streams: each tensor is read with ordinary file reads (the source's pages never join
the process's resident set), converted a few MB of rows at a time, written, and let go of, so the
peak stays near the largest packed tensor instead of float32 + packed for the whole model.
"""

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile

import numpy as np

from .. import formats
from ..log import warn
from . import hub, safetensors
from . import params as weights

CHUNK_BYTES = 4 << 20  # float32 input converted at a time: bounds pack()'s temporaries (several copies of it)


# ---- where copies live and when they are valid ---------------------------------------------------


def root():
    """The folder converted copies are kept in."""
    cache = os.environ.get("PICOGPT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "picogpt"
    )
    return os.path.join(cache, "converted")


def model_name(source):
    """A readable name for a checkpoint folder: the repo name of a hub snapshot
    (.../models--org--name/snapshots/<commit>), else the folder's own name."""
    parts = os.path.realpath(source).split(os.sep)
    name = (
        parts[-3].split("--")[-1]
        if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--")
        else parts[-1]
    )
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "model"


def folder(source, dtype):
    """Where the copy of `source` in `dtype` lives: one folder per source folder and dtype."""
    key = hashlib.sha256(f"{os.path.realpath(source)}\0{dtype}".encode()).hexdigest()[:12]
    return os.path.join(root(), f"{model_name(source)}-{dtype}-{key}")


def fingerprint(source):
    """What a copy was made from: the source folder and each file picogpt reads (realpath, size, mtime)."""
    files = {}
    for name in hub.checkpoint_files(source):
        path = os.path.realpath(os.path.join(source, name))  # a hub snapshot's files link to its blobs
        st = os.stat(path)
        files[name] = {"path": path, "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"source": os.path.realpath(source), "files": files}


def valid(copy, source):
    try:
        with open(os.path.join(copy, "source.json")) as f:
            return json.load(f) == fingerprint(source)
    except (OSError, ValueError):  # no copy, a damaged one, or a source file gone
        return False


def prune():
    """Remove the copies that can never be used again: those whose source files are gone or changed
    (a temporary checkpoint's, a benchmark's, a replaced model.safetensors's). Folders being written
    (.name.*) and any folder without a readable source.json are left alone. Returns (copies, bytes)."""
    removed, freed = 0, 0
    for entry in os.scandir(root()) if os.path.isdir(root()) else ():
        if entry.name.startswith(".") or not entry.is_dir():
            continue
        try:
            with open(os.path.join(entry.path, "source.json")) as f:
                source = json.load(f)["source"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if not valid(entry.path, source):
            size = sum(e.stat().st_size for e in os.scandir(entry.path) if e.is_file())
            shutil.rmtree(entry.path, ignore_errors=True)
            removed, freed = removed + 1, freed + size
    return removed, freed


def copies(source):
    """{dtype: {"folder", "bytes"}} for the valid converted copies of `source` (for `picogpt info`)."""
    found = {}
    for dtype in formats.DTYPES:
        if valid(copy := folder(source, dtype), source):
            found[dtype] = {"folder": copy, "bytes": sum(e.stat().st_size for e in os.scandir(copy) if e.is_file())}
    return found


# ---- loading ---------------------------------------------------------------------------------------


def load_params(source, dtype=None):
    """(params, config, dtype) of the checkpoint folder `source` in `dtype` (None: as stored). Another
    format than the stored one comes from the converted copy, written first if there is no valid one;
    if it cannot be written, the weights are converted in memory."""
    stored = weights.read_checkpoint(source)[1] or "float32"
    if dtype is None or dtype == stored:
        return weights.read_params(source)
    held = as_stored(source, dtype)
    if held is not None:
        return held
    copy = folder(source, dtype)
    if valid(copy, source):
        with contextlib.suppress(weights.CheckpointError, OSError):  # damaged, or being replaced: written again below
            params, config, got = weights.read_params(copy)
            if got == dtype:
                return params, config, dtype
    try:
        return keep(source, dtype, copy)
    except OSError as e:
        warn(f"cannot keep a converted copy in {os.path.dirname(copy)} ({e.strerror or e}): converting in memory")
    params, config, _ = weights.read_params(source)
    try:
        return formats.convert(params, dtype), config, dtype
    except formats.FormatError as e:
        raise weights.CheckpointError(f"{source}: {e}") from None


def as_stored(source, dtype):
    """(params, config, dtype) of an ordinary checkpoint whose block linears and wte are all stored in
    `dtype` already (float16 or bfloat16: the tiny model, a checkpoint saved in half precision), packed
    from their bits as they are: nothing is rounded, so these are exactly the weights a converted copy
    would hold, and nothing is written. None for any other checkpoint."""
    if dtype not in ("float16", "bfloat16"):
        return None
    config = weights.read_config(source)
    tensors, packed = weights.read_checkpoint(source)
    if packed is not None:  # written by picogpt convert in another format
        return None
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    shapes, want = weights.expected_shapes(config), safetensors.VIEW[formats.FORMATS[dtype].tag]
    names = weights.packed_names(config)
    if not all(n in tensors and tensors[n].dtype == want and tuple(tensors[n].shape) == shapes[n] for n in names):
        return None  # not all of them in dtype (or a shape wrong: the ordinary path says which)
    for name in names:  # held as the format holds them: a packed wte as wte.T
        if formats.transposed(name, dtype):
            tensors[name] = np.ascontiguousarray(tensors[name].T)
    return weights.to_params(tensors, config, source, packed=dtype), config, dtype


def keep(source, dtype, copy):
    """Write the copy into a temporary folder beside `copy`, check it, and rename it into place, so
    an interrupt or a second process never leaves a half-written copy that looks valid."""
    parent = os.path.dirname(copy)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(copy)}.", dir=parent)
    try:
        made = fingerprint(source)  # before reading: a source replaced meanwhile makes the copy invalid, not wrong
        loaded = write(source, dtype, tmp)
        with open(os.path.join(tmp, "source.json"), "w") as f:
            json.dump(made, f, indent=2)
        try:
            os.rename(tmp, copy)
        except (
            OSError
        ):  # an old copy is in the way (invalid or damaged, or another process's just made): ours replaces it
            old = tempfile.mkdtemp(prefix=f".{os.path.basename(copy)}.old.", dir=parent)
            os.rename(copy, os.path.join(old, "copy"))
            os.rename(tmp, copy)
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    warn(f"converted {model_name(source)} to {dtype} once, kept in {copy}")  # after: a failure stays one line
    removed, freed = prune()  # the cache grows here: let go of the copies whose source is gone
    if removed:
        warn(
            f"removed {removed} converted {'copy' if removed == 1 else 'copies'} whose source is gone or changed ({freed / 1e6:.0f} MB)"
        )
    return loaded  # memory-mapped from the files, which keep their identity through the rename


# ---- the streaming converter -----------------------------------------------------------------------


def write(source, dtype, out):
    """Convert the checkpoint folder `source` to `dtype` tensor by tensor into the folder `out` (made if
    needed), as `picogpt convert` lays it out; returns (params, config, dtype) loaded back from it."""
    config = weights.read_config(source)
    tensors, stored = weights.read_checkpoint(source)
    stored = stored or "float32"
    leaves = weights.check_tensors(tensors, config, source, stored)  # every shape checked before a byte is written
    where, packed, shapes = locations(source), weights.packed_names(config), weights.expected_shapes(config)
    # The order save_params writes (the parameter tree's: blocks first), so that the file is byte for
    # byte what converting in memory and saving wrote.
    names = sorted(leaves, key=lambda name: not name.startswith("h."))
    plan = []
    for name in names:
        fmt = dtype if name in packed else "float32"
        plan.append((name, fmt, layout(name, shapes[name], fmt)))
    os.makedirs(out, exist_ok=True)
    with safetensors.replacing(os.path.join(out, safetensors.SINGLE_FILE)) as f:
        f.write(
            safetensors.safetensors_header(
                [entry for _, _, entries in plan for entry in entries], weights.metadata_for(dtype)
            )
        )
        for name, fmt, entries in plan:  # one tensor in memory at a time
            for array in convert_tensor(leaves[name], where, name, stored, fmt, entries, source):
                f.write(array.data)  # C-contiguous: its bytes as they are, no copy
    weights.write_side_files(config, source, out)
    return weights.read_params(out)


def layout(name, shape, fmt):
    """[(name, safetensors dtype, shape, nbytes)] a tensor is stored as in format `fmt`: float32 as it
    is; packed as [in, out] (wte as wte.T), int8 with its scales in NAME.scales."""
    if fmt == "float32":
        return [(name, "F32", shape, 4 * int(np.prod(shape)))]
    n_in, n_out = formats.held_shape(name, shape, fmt)
    return [
        (name + suffix, tag, size, np.dtype(formats.HELD[tag]).itemsize * size[0] * size[1])
        for suffix, tag, size in formats.arrays(n_in, n_out, fmt)
    ]


def convert_tensor(leaf, where, name, stored, fmt, entries, source):
    """One tensor in format `fmt`, as the arrays of `entries`, converted a chunk of stored rows at a time.

    The stored rows are [in, out] rows for block linears and packed wte, but [n_vocab, n_embd] rows for
    an ordinary wte: those are columns of the wte.T a packed wte holds (and the other way round when a
    packed wte becomes float32). int8 scales are per column, so a chunk of columns packs exactly."""
    outs = [np.empty(shape, formats.HELD[tag]) for _, tag, shape, _ in entries]
    transposed = formats.transposed(name, stored) != formats.transposed(name, fmt)  # a wte between float32 and packed
    n_rows, row_bytes = formats.shape(leaf)[0], 4 * int(np.prod(formats.shape(leaf)[1:]))
    step = max(formats.BLOCK, CHUNK_BYTES // row_bytes // formats.BLOCK * formats.BLOCK)  # whole int8 blocks
    for r0 in range(0, n_rows, step):
        r1 = min(n_rows, r0 + step)
        x = read_rows(leaf, where, name, r0, r1)
        if stored == fmt:  # a packed checkpoint into its own format: copied, nothing rounded again
            parts = x
        else:
            w = formats.dequantize(x)  # float32 rows either way
            try:
                parts = formats.pack(w.T if transposed else w, fmt)
            except formats.FormatError as e:
                raise weights.CheckpointError(f"{source}: cannot store tensor '{name}' in {fmt}: {e}") from None
        parts = (parts,) if isinstance(parts, np.ndarray) else tuple(parts)
        for out, part, blocks in zip(outs, parts, (1, formats.BLOCK)):  # data rows, then int8 scale rows
            if transposed:
                out[:, r0:r1] = part
            else:
                out[r0 // blocks : r0 // blocks + len(part)] = part
    return outs


def read_rows(leaf, where, name, r0, r1):
    """Rows r0:r1 of a stored tensor, read from its file into fresh arrays: float32 for an ordinary
    tensor, or the packed tuple's rows (r0 a whole number of int8 blocks)."""
    if isinstance(leaf, np.ndarray):
        return weights._float32(read(where[name], leaf.dtype, leaf.shape, r0, r1))
    data = read(where[name], leaf.data.dtype, leaf.data.shape, r0, r1)
    if formats.FORMATS[formats.dtype_of(leaf)].scales:
        b = formats.BLOCK
        return type(leaf)(
            data, read(where[f"{name}.scales"], np.float32, leaf.scales.shape, r0 // b, formats.n_blocks(r1))
        )
    return type(leaf)(data)


def read(where, dtype, shape, r0, r1):
    """Rows r0:r1 of the tensor at (file, byte offset), with ordinary reads into a new array: mapping
    the source would make its pages part of this process's resident set."""
    path, offset = where
    array = np.empty((r1 - r0, *shape[1:]), dtype)
    view, row_bytes = memoryview(array).cast("B"), array.itemsize * int(np.prod(shape[1:]))
    with open(path, "rb") as f:
        f.seek(offset + r0 * row_bytes)
        if f.readinto(view) != len(view):  # buffered: loops until full or at the end of the file
            raise weights.CheckpointError(
                f"corrupt or truncated safetensors file {path}: delete it and download or save it again"
            )
    return array


def locations(source):
    """{tensor name: (file, byte offset of its data)} across the checkpoint's safetensors files, names
    without save_pretrained's "transformer." prefix. read_checkpoint has checked the headers."""
    found = {}
    for name in hub.checkpoint_files(source):
        if name.endswith(".safetensors"):
            path = os.path.join(source, name)
            start, entries, _ = safetensors.header(path)
            for tensor, info in entries.items():
                found[tensor.removeprefix("transformer.")] = (path, start + info["data_offsets"][0])
    return found
