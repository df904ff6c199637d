"""Model management: what a checkpoint holds (`picogpt info`), a scan for NaN and infinite weights
(`info --check`), and fetching a model ahead of time (`picogpt download`)."""

import os

import numpy as np

from .. import formats
from .. import tokenizer as tok
from . import converted, hub
from . import params as weights


def parameter_count(config):
    """Parameters as transformers' num_parameters() counts them: the tied lm_head once, no mask buffers."""
    return sum(int(np.prod(shape)) for shape in weights.expected_shapes(config).values())


def weight_bytes(config, dtype):
    """Bytes the weights take in `dtype`: the block linears and wte packed, everything else float32."""
    packed = weights.packed_names(config)
    total = 0
    for name, shape in weights.expected_shapes(config).items():
        if name not in packed:
            total += 4 * int(np.prod(shape))
        else:  # wte is packed as wte.T
            total += formats.nbytes_of(*formats.held_shape(name, shape, dtype), dtype)
    return total


def info(name, revision=None):
    """What `picogpt info` prints, as a dict: config, parameter count, stored format, files, memory
    and the converted copies kept of it."""
    folder = hub.resolve(name, revision)
    config = weights.read_config(folder)
    files = {f: os.path.getsize(os.path.join(folder, f)) for f in hub.checkpoint_files(folder)}
    tensors, packed = weights.read_checkpoint(folder)
    stored = packed or "/".join(sorted({str(t.dtype).replace("uint16", "bfloat16") for t in tensors.values()}))
    return {
        "model": name,
        "revision": revision,
        "folder": os.path.abspath(folder),
        "n_layer": config["n_layer"],
        "n_head": config["n_head"],
        "n_embd": config["n_embd"],
        "n_positions": config["n_positions"],
        "vocab_size": config["vocab_size"],
        "parameters": parameter_count(config),
        "stored_as": stored,
        "files": files,
        "memory": {dtype: weight_bytes(config, dtype) for dtype in formats.DTYPES},
        "converted": converted.copies(folder),  # the valid copies --dtype keeps of this very folder
    }


def non_finite(array, chunk=1 << 22):
    """How many entries of a stored tensor are NaN or infinite (bfloat16 as its uint16 bits: exponent
    all ones), counted a chunk at a time so that a big memory-mapped tensor needs no big temporary."""
    flat, count = array.reshape(-1), 0
    for start in range(0, len(flat), chunk):
        part = flat[start : start + chunk]
        if part.dtype == np.uint16:
            count += int(np.count_nonzero((part & 0x7F80) == 0x7F80))
        elif part.dtype.kind == "f":
            count += int(np.count_nonzero(~np.isfinite(part)))
    return count


def check(folder, progress=None):
    """{tensor name: number of NaN or infinite entries} for every tensor that has any."""
    tensors, _ = weights.read_checkpoint(folder)
    bad = {}
    for name, array in tensors.items():
        if n := non_finite(array):
            bad[name] = n
        if progress:
            progress(array.nbytes)
    return bad


def download(name, revision=None):
    """Fetch a hub model (or refresh a cached one) and check it: every safetensors header read and
    every tensor's shape against config.json, and its tokenizer built. Returns the folder."""
    folder = hub.resolve(name, revision, refresh=True)
    weights.read_params(folder)
    tok.load_tokenizer(folder)
    return folder
