"""The safetensors format, read memory-mapped and written through a temporary file; sharded checkpoints'
index. Never a pickle.

A file is an 8-byte little-endian header length, a JSON header of {name: {dtype, shape, data_offsets}}
(and an optional __metadata__), then the raw bytes. safetensors' own numpy loader copies every
tensor into memory; mapping the file keeps the weights at one copy (the page cache).
"""

import contextlib
import json
import mmap
import os

import numpy as np

from . import CheckpointError

SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"

# safetensors dtype -> how its bytes are viewed when read: an ordinary checkpoint's F16 as float16 (it is
# widened to float32 at load); BF16 as its uint16 bits, as NumPy has no bfloat16. (formats.HELD says how
# a packed weight's data is held: float16 as uint16 bits, for the kernels.)
VIEW = {
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "F64": np.float64,
    "I8": np.int8,
    "I64": np.int64,
    "U8": np.uint8,
    "BOOL": np.bool_,
}


def header(path):
    """(bytes before the data, {name: {dtype, shape, data_offsets}}, metadata) of a .safetensors file;
    CheckpointError if it is not one."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or (n_header := int.from_bytes(head, "little")) > size - 8:
            raise CheckpointError(corrupt(path))
        try:
            entries = json.loads(f.read(n_header))
        except ValueError:
            raise CheckpointError(corrupt(path)) from None
    metadata = entries.pop("__metadata__", None) or {}
    return 8 + n_header, entries, metadata


def corrupt(path):
    return f"corrupt or truncated safetensors file {path}: delete it and download or save it again"


def read(path):
    """(tensors, metadata) of a .safetensors file: {name: array} memory-mapped, in their stored dtypes
    (VIEW)."""
    start, entries, metadata = header(path)
    size = os.path.getsize(path)
    # Copy-on-write ("c") rather than read-only: the pages are shared with the page cache all the same,
    # and the arrays are then typed as writable like every other array, so Numba compiles each kernel
    # once rather than once for mapped and once for converted weights.
    data = np.memmap(path, dtype=np.uint8, mode="c", offset=start) if size > start else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in entries.items():
        try:
            dtype, shape, (begin, end) = np.dtype(VIEW[info["dtype"]]), info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{corrupt(path)} (tensor {name} has an unreadable entry)") from None
        if not 0 <= begin <= end <= len(data) or end - begin != dtype.itemsize * int(np.prod(shape)):
            raise CheckpointError(corrupt(path))
        tensors[name] = data[begin:end].view(dtype).reshape(shape)
    return tensors, metadata


def read_safetensors(path):
    """{name: array} memory-mapped from a .safetensors file (see read)."""
    return read(path)[0]


def shards(index):
    """The shard file names a model.safetensors.index.json names, sorted, once each."""
    with open(index) as f:
        return sorted(set(json.load(f)["weight_map"].values()))


def release(weight):
    """Give the pages of a memory-mapped weight (float32 or packed) back to the OS: they are read from
    the file again if it is used again. For weights the kernels have copied into their own layout."""
    for array in [weight] if isinstance(weight, np.ndarray) else weight:
        base = array
        while base is not None and not isinstance(base, np.memmap):
            base = getattr(base, "base", None)  # (an array made from a torch tensor ends at the tensor)
        mm = getattr(base, "_mmap", None)
        if mm is None or mm.closed:
            continue
        start = np.frombuffer(mm, np.uint8).ctypes.data  # where the mapping begins
        page, offset = mmap.PAGESIZE, array.ctypes.data - start
        lo, hi = offset // page * page, min(len(mm), -(-(offset + array.nbytes) // page) * page)
        if hi > lo:
            mm.madvise(mmap.MADV_DONTNEED, lo, hi - lo)


@contextlib.contextmanager
def replacing(path):
    """Write `path` through a temporary file beside it, put in place only when the block ends without
    an error, so a full disk or an interrupt never leaves a truncated file behind. Yields the open file."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_safetensors(path, tensors, metadata=None):
    """Write {name: (safetensors dtype, array)} to `path` (see replacing)."""
    head = safetensors_header(
        [(name, dtype, array.shape, array.nbytes) for name, (dtype, array) in tensors.items()], metadata
    )
    with replacing(path) as f:
        f.write(head)
        for _, array in tensors.values():
            f.write(np.ascontiguousarray(array).tobytes())


def safetensors_header(entries, metadata=None):
    """The bytes before a safetensors file's data, for [(name, safetensors dtype, shape, nbytes)] in
    file order: all of it follows from the shapes, so a writer can stream the data after it."""
    head, offset = {"__metadata__": metadata or {}}, 0
    for name, dtype, shape, nbytes in entries:
        head[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    data = json.dumps(head, separators=(",", ":")).encode()
    data += b" " * (-len(data) % 8)  # the format pads the header so the data starts 8-byte aligned
    return len(data).to_bytes(8, "little") + data
