"""Weights: read a checkpoint folder's safetensors and config, check them, nest the parameter tree;
write converted checkpoints. Tensors are memory-mapped from the file, so float32 weights cost no
second copy in memory. Never a pickle. (hub.py finds the folder.)
"""

import json
import os
import shutil

import numpy as np

from .. import formats
from . import CheckpointError
from .safetensors import SHARD_INDEX, SINGLE_FILE, VIEW, read, read_safetensors, shards, write_safetensors

__all__ = [
    "CheckpointError",
    "read_safetensors",
    "write_safetensors",
]  # re-exported: the tests and tools read them here

TOKENIZER_FILES = ("vocab.json", "merges.txt")
PICOGPT_FORMAT = "picogpt"  # __metadata__ "format" of checkpoints written by `picogpt convert`


def _float32(array):
    if array.dtype == np.float32:
        return array  # still memory-mapped
    if array.dtype == np.uint16:  # bfloat16 is the top half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32) if array.dtype.kind == "f" else array


def read_checkpoint(folder):
    """All tensors of a checkpoint folder, single file or sharded, and the weight format they hold:
    None for an ordinary checkpoint (floats of any width), or the dtype `picogpt convert` packed."""
    index = os.path.join(folder, SHARD_INDEX)
    if not os.path.exists(os.path.join(folder, SINGLE_FILE)) and os.path.exists(index):
        tensors = {}
        for shard in shards(index):
            if not os.path.exists(os.path.join(folder, shard)):
                raise CheckpointError(f"{folder} is missing the shard {shard} named in {SHARD_INDEX}")
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        return tensors, None
    tensors, metadata = read(os.path.join(folder, SINGLE_FILE))
    if metadata.get("format") == PICOGPT_FORMAT:
        if metadata.get("dtype") not in formats.DTYPES:
            raise CheckpointError(
                f"{folder}: written by picogpt with weight format {metadata.get('dtype')!r}, which this version cannot read"
            )
        return tensors, metadata["dtype"]
    return tensors, None


# ---- config and the parameter tree ---------------------------------------------------------------


def read_config(folder):
    path = os.path.join(folder, "config.json")
    try:
        with open(path) as f:
            config = json.load(f)
    except ValueError:
        raise CheckpointError(f"{path} is not valid JSON: download or save the checkpoint again") from None
    if config.get("model_type") != "gpt2":
        raise CheckpointError(
            f"{folder} holds a '{config.get('model_type')}' model, not a GPT-2 one (config.json model_type must be gpt2)"
        )
    for key in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
        if not (isinstance(config.get(key), int) and config[key] > 0):
            raise CheckpointError(f"{path} needs a positive whole number for {key}, got {config.get(key)!r}")
    unsupported = {
        "activation_function": ("gelu_new", config.get("activation_function", "gelu_new")),
        "scale_attn_weights": (True, config.get("scale_attn_weights", True)),
        "scale_attn_by_inverse_layer_idx": (False, config.get("scale_attn_by_inverse_layer_idx", False)),
        "add_cross_attention": (False, config.get("add_cross_attention", False)),
        "tie_word_embeddings": (True, config.get("tie_word_embeddings", True)),
    }
    for key, (want, got) in unsupported.items():
        if want != got:
            raise CheckpointError(
                f"{folder}: config.json has {key}={got!r}; picogpt supports only GPT-2's {key}={want!r}"
            )
    if config["n_embd"] % config["n_head"]:
        raise CheckpointError(f"{folder}: n_embd={config['n_embd']} is not divisible by n_head={config['n_head']}")
    return config


def expected_shapes(config):
    """{checkpoint name: shape} for every tensor GPT-2 uses, in the hub's unprefixed names."""
    d, n_inner = config["n_embd"], config.get("n_inner") or 4 * config["n_embd"]
    shapes = {"wte.weight": (config["vocab_size"], d), "wpe.weight": (config["n_positions"], d)}
    for i in range(config["n_layer"]):
        for name, shape in {
            "ln_1.weight": (d,),
            "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d),
            "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d),
            "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,),
            "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, n_inner),
            "mlp.c_fc.bias": (n_inner,),
            "mlp.c_proj.weight": (n_inner, d),
            "mlp.c_proj.bias": (d,),
        }.items():
            shapes[f"h.{i}.{name}"] = shape
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def check_tensors(tensors, config, source="checkpoint", packed=None):
    """{name: tensor as stored, or packed tuple} for every tensor GPT-2 uses, in expected_shapes'
    order, checked against the config; nothing is converted (the tied lm_head aside, nothing is read).

    `packed` names the format of a checkpoint written by `picogpt convert` (see formats.py): its
    linears and wte are packed tuples, wte as wte.T."""
    # save_pretrained writes "transformer.h.0...", the hub's own files "h.0...": accept both.
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    packs = packed_names(config) if packed not in (None, "float32") else set()
    checked = {}
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise CheckpointError(f"{source} lacks tensor '{name}': the file is incomplete or not a GPT-2 checkpoint")
        if name in packs:
            checked[name] = _packed(tensors, name, formats.held_shape(name, shape, packed), packed, source)
        elif tuple(tensors[name].shape) != shape:
            raise CheckpointError(
                f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, config.json implies {shape}"
            )
        else:
            checked[name] = tensors[name]
    lm_head = tensors.get("lm_head.weight")
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise CheckpointError(
            f"{source}: lm_head.weight differs from wte.weight; picogpt supports only GPT-2's tied lm_head"
        )
    return checked


def to_params(tensors, config, source="checkpoint", packed=None):
    """Check tensors against the config (check_tensors) and nest them: params["h"][i]["attn"]["c_attn"]["weight"].
    Ordinary checkpoints become float32; packed weights stay packed tuples."""
    params = {"h": [{} for _ in range(config["n_layer"])]}
    for name, leaf in check_tensors(tensors, config, source, packed).items():
        *path, key = name.split(".")
        node = params
        for part in path:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[key] = leaf if isinstance(leaf, formats.PACKED) else _float32(leaf)
    return params


def packed_names(config):
    """The tensors a converted checkpoint packs: every block linear's weight and wte."""
    return {"wte.weight"} | {
        f"h.{i}.{part}.{name}.weight" for i in range(config["n_layer"]) for part, name in formats.LINEARS
    }


def _packed(tensors, name, shape, dtype, source):
    """The packed tuple stored under `name` (and `name.scales` for int8), checked against its [in, out] shape."""
    fmt, found = formats.FORMATS[dtype], []
    for suffix, tag, want in formats.arrays(*shape, dtype):  # data, then int8's scales
        stored = VIEW[tag]  # as read_safetensors views it
        array = tensors.get(name + suffix)
        if array is None or array.dtype != stored or tuple(array.shape) != want:
            got = "missing" if array is None else f"{array.dtype} {tuple(array.shape)}"
            raise CheckpointError(
                f"{source}: tensor '{name}{suffix}' is {got}, a {dtype} checkpoint needs {np.dtype(stored)} {want}"
            )
        found.append(array.view(fmt.array) if suffix == "" else array)
    return fmt.cls(*found)


def read_params(folder):
    """(params, config, dtype) for a checkpoint folder, validated; dtype is the format it holds."""
    config = read_config(folder)
    tensors, packed = read_checkpoint(folder)
    return to_params(tensors, config, source=folder, packed=packed), config, packed or "float32"


def save_params(params, config, out_folder, tokenizer_folder):
    """Write a loadable checkpoint folder: config.json, vocab.json, merges.txt and model.safetensors
    holding the parameter tree as it is, packed weights as they are (wte of a packed tree as wte.T,
    int8 scales as NAME.scales), so that loading it again converts nothing."""
    dtype = formats.dtype_of(params["h"][0]["attn"]["c_attn"]["weight"]) if params["h"] else "float32"
    tensors = {}

    def add(name, leaf):
        if isinstance(leaf, dict):
            for key, value in leaf.items():
                add(f"{name}.{key}" if name else key, value)
        elif isinstance(leaf, list):
            for i, value in enumerate(leaf):
                add(f"{name}.{i}", value)
        elif isinstance(leaf, formats.PACKED):
            for (suffix, tag, _), array in zip(formats.arrays(*formats.shape(leaf), formats.dtype_of(leaf)), leaf):
                tensors[name + suffix] = (tag, array)
        else:
            tensors[name] = ("F32", np.asarray(leaf, np.float32))

    add("", params)
    os.makedirs(out_folder, exist_ok=True)
    write_safetensors(os.path.join(out_folder, SINGLE_FILE), tensors, metadata_for(dtype))
    write_side_files(config, tokenizer_folder, out_folder)


def metadata_for(dtype):
    """The safetensors __metadata__ of a checkpoint whose weights are in `dtype`."""
    return {"format": "pt"} if dtype == "float32" else {"format": PICOGPT_FORMAT, "dtype": dtype}


def write_side_files(config, tokenizer_folder, out_folder):
    """config.json, and the tokenizer's files copied from tokenizer_folder: what a checkpoint folder
    holds beside its weights."""
    with open(os.path.join(out_folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.abspath(tokenizer_folder) != os.path.abspath(out_folder):
            shutil.copyfile(os.path.join(tokenizer_folder, name), os.path.join(out_folder, name))
