"""Weights: find a checkpoint (local folder or Hugging Face hub), read its safetensors, check it.

Only `config.json`, `model.safetensors` (or its shards), `vocab.json` and `merges.txt` are ever
fetched: never `pytorch_model.bin`, never a pickle. Tensors are memory-mapped from the file, so
float32 weights cost no second copy in memory.
"""

import contextlib
import errno
import json
import logging
import os
import shutil
import sys

import numpy as np

from . import formats

ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tiny")  # benchmarks/train_tiny.py made it
SINGLE_FILE = "model.safetensors"
SHARD_INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
LOCAL_HINT = "or pass --model a local folder holding config.json, model.safetensors, vocab.json and merges.txt"


class CheckpointError(Exception):
    """A user-facing problem with a checkpoint: the message is one line that names the fix."""


# ---- finding the files -------------------------------------------------------------------------


def resolve(name_or_path, revision=None, refresh=False):
    """Return a local folder holding the checkpoint's files, downloading them from the hub if needed.

    A hub model whose files are all in huggingface_hub's cache is used from there without touching
    the network (so it loads offline with no wait); `refresh` (picogpt download) asks the hub for the
    revision's newest files all the same. `revision`: a branch, tag or commit of a hub model."""
    folder = os.path.expanduser(name_or_path)
    local = os.path.isdir(folder) or name_or_path == "tiny" or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") > 1
    if local and revision is not None:
        raise CheckpointError(f"--revision is for models on the Hugging Face hub, and {name_or_path} is a local folder: drop --revision")
    if os.path.isdir(folder):
        return _check_folder(folder)
    if name_or_path == "tiny":  # the small GPT-2 that ships inside the package: no network needed
        return _check_folder(TINY)
    if local:
        raise CheckpointError(f"no such folder: {name_or_path}")
    return _download(ALIASES.get(name_or_path, name_or_path), revision, refresh)


def _check_folder(folder):
    has_weights = any(os.path.exists(os.path.join(folder, f)) for f in (SINGLE_FILE, SHARD_INDEX))
    missing = [f for f in ("config.json", *TOKENIZER_FILES) if not os.path.exists(os.path.join(folder, f))]
    if not has_weights:
        missing.insert(1, SINGLE_FILE)
    if missing:
        hint = " (picogpt reads only safetensors, never pytorch_model.bin)" if SINGLE_FILE in missing else ""
        raise CheckpointError(f"{folder} is missing {', '.join(missing)}{hint}")
    return folder


def checkpoint_files(folder):
    """The files of a checkpoint folder that picogpt reads, in order."""
    if os.path.exists(os.path.join(folder, SINGLE_FILE)) or not os.path.exists(os.path.join(folder, SHARD_INDEX)):
        weights = [SINGLE_FILE]
    else:
        with open(os.path.join(folder, SHARD_INDEX)) as f:
            weights = [SHARD_INDEX, *sorted(set(json.load(f)["weight_map"].values()))]
    return ["config.json", *weights, *TOKENIZER_FILES]


def _cached(repo_id, revision):
    """The snapshot folder if huggingface_hub's cache holds every file picogpt needs, else None."""
    from huggingface_hub import try_to_load_from_cache

    def path(filename):
        found = try_to_load_from_cache(repo_id, filename, revision=revision)
        return found if isinstance(found, str) else None

    if not (config := path("config.json")) or not all(path(f) for f in TOKENIZER_FILES):
        return None
    if path(SINGLE_FILE):
        return os.path.dirname(config)
    if not (index := path(SHARD_INDEX)):
        return None
    with open(index) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    return os.path.dirname(config) if all(path(shard) for shard in shards) else None


def hub_unreachable(timeout=5.0):
    """Why the hub cannot be reached (one short HEAD request, no retries), or None if it can: with no
    network, huggingface_hub itself would retry for about 24 s before giving up."""
    from huggingface_hub import constants, get_session

    try:
        get_session().head(constants.ENDPOINT, timeout=timeout)
    except Exception as e:  # the HTTP client's connection errors (DNS, refused, timeout, proxy)
        return str(e).splitlines()[0] if str(e) else type(e).__name__
    return None


def _download(repo_id, revision=None, refresh=False):
    """Fetch just the needed files with huggingface_hub (its cache, HF_HUB_OFFLINE and progress bars)."""
    import huggingface_hub
    from huggingface_hub import constants, errors

    def fetch(filename):
        return huggingface_hub.hf_hub_download(repo_id, filename, revision=revision)

    name = repo_id if revision is None else f"{repo_id} at revision {revision}"
    unknown = f"unknown model '{repo_id}': not a local folder, a known name ({', '.join(ALIASES)}) or a hub repo id like org/name"
    try:
        cached = _cached(repo_id, revision)
    except errors.HFValidationError:
        raise CheckpointError(unknown) from None
    if cached and not refresh:
        return cached
    offline = constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set" if offline else hub_unreachable()
    if why and cached:  # picogpt download with no network: the cached copy is what there is
        print(f"picogpt: the hub cannot be reached ({why}): using the cached {name}", file=sys.stderr, flush=True)
        return cached
    if why:
        raise CheckpointError(
            f"cannot load '{name}': the Hugging Face hub cannot be reached ({why}) and it is not in the cache "
            f"({constants.HF_HUB_CACHE}); connect to the network, or use --model tiny (it ships with picogpt), {LOCAL_HINT}"
        )
    print(f"picogpt: fetching {name} from the Hugging Face hub", file=sys.stderr, flush=True)
    try:
        with _quiet_logger("huggingface_hub"):  # its retry warnings would bury our one-line error
            folder = os.path.dirname(fetch("config.json"))
            read_config(folder)  # not a GPT-2: say so before downloading its weights
            try:
                fetch(SINGLE_FILE)
            except errors.RemoteEntryNotFoundError:  # no single file: a sharded checkpoint, or no safetensors at all
                try:
                    with open(fetch(SHARD_INDEX)) as f:
                        shards = sorted(set(json.load(f)["weight_map"].values()))
                except errors.RemoteEntryNotFoundError:
                    raise CheckpointError(
                        f"{repo_id} has no {SINGLE_FILE} on the hub (picogpt never loads pickled pytorch_model.bin); "
                        f"convert it to safetensors, {LOCAL_HINT}"
                    ) from None
                for shard in shards:
                    fetch(shard)
            for filename in TOKENIZER_FILES:
                fetch(filename)
    except errors.HFValidationError:
        raise CheckpointError(unknown) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"{repo_id} has no revision '{revision}' on the hub: give a branch, tag or commit that exists") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"unknown model '{repo_id}': no such repo on the Hugging Face hub; check the name, {LOCAL_HINT}") from None
    except errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot load '{name}': the download failed and it is not in the cache ({constants.HF_HUB_CACHE}); "
            f"check the network, or use --model tiny (it ships with picogpt), {LOCAL_HINT}"
        ) from None
    except errors.EntryNotFoundError as e:
        raise CheckpointError(f"{repo_id} on the hub lacks a file picogpt needs ({e}); {LOCAL_HINT}") from None
    except errors.HfHubHTTPError as e:
        raise CheckpointError(f"cannot load '{name}' from the hub: {str(e).splitlines()[0]}; {LOCAL_HINT}") from None
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise CheckpointError(
                f"the disk filled up while downloading {name} into {constants.HF_HUB_CACHE}: free some space, "
                "or set HF_HUB_CACHE to a folder on a larger disk, and run the command again"
            ) from None
        raise
    return folder


@contextlib.contextmanager
def _quiet_logger(name):
    log = logging.getLogger(name)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


# ---- reading and writing safetensors ---------------------------------------------------------------

# safetensors dtype -> how its bytes are viewed: BF16 as its uint16 bits, as NumPy has no bfloat16.
DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64, "I8": np.int8, "I64": np.int64, "U8": np.uint8, "BOOL": np.bool_}
PICOGPT_FORMAT = "picogpt"  # __metadata__ "format" of checkpoints written by `picogpt convert`


def read_safetensors(path):
    """{name: array} memory-mapped from a .safetensors file, in their stored dtypes (BF16 as uint16).

    The format is an 8-byte little-endian header length, a JSON header of
    {name: {dtype, shape, data_offsets}}, then the raw bytes. safetensors' own numpy loader copies
    every tensor into memory; mapping the file keeps the weights at one copy (page cache).
    """
    return _read_safetensors(path)[0]


def _read_safetensors(path):
    """(tensors, metadata) of a .safetensors file; see read_safetensors."""
    size = os.path.getsize(path)
    bad = f"corrupt or truncated safetensors file {path}: delete it and download or save it again"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8 or (n_header := int.from_bytes(head, "little")) > size - 8:
            raise CheckpointError(bad)
        try:
            header = json.loads(f.read(n_header))
        except ValueError:
            raise CheckpointError(bad) from None
    metadata = header.pop("__metadata__", None) or {}
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n_header) if size > 8 + n_header else np.zeros(0, np.uint8)
    tensors = {}
    for name, info in header.items():
        try:
            dtype, shape, (start, end) = np.dtype(DTYPES[info["dtype"]]), info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{bad} (tensor {name} has an unreadable entry)") from None
        if not 0 <= start <= end <= len(data) or end - start != dtype.itemsize * int(np.prod(shape)):
            raise CheckpointError(bad)
        tensors[name] = data[start:end].view(dtype).reshape(shape)
    return tensors, metadata


def write_safetensors(path, tensors, metadata=None):
    """Write {name: (safetensors dtype, array)} to `path`, through a temporary file so that a full disk
    or an interrupt never leaves a truncated checkpoint behind."""
    header, offset = {"__metadata__": metadata or {}}, 0
    for name, (dtype, array) in tensors.items():
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + array.nbytes]}
        offset += array.nbytes
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the format pads the header so the data starts 8-byte aligned
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(len(head).to_bytes(8, "little") + head)
            for _, array in tensors.values():
                f.write(np.ascontiguousarray(array).tobytes())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


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
        with open(index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        tensors = {}
        for shard in shards:
            if not os.path.exists(os.path.join(folder, shard)):
                raise CheckpointError(f"{folder} is missing the shard {shard} named in {SHARD_INDEX}")
            tensors.update(read_safetensors(os.path.join(folder, shard)))
        return tensors, None
    tensors, metadata = _read_safetensors(os.path.join(folder, SINGLE_FILE))
    if metadata.get("format") == PICOGPT_FORMAT:
        if metadata.get("dtype") not in formats.DTYPES:
            raise CheckpointError(f"{folder}: written by picogpt with weight format {metadata.get('dtype')!r}, which this version cannot read")
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
            raise CheckpointError(f"{folder}: config.json has {key}={got!r}; picogpt supports only GPT-2's {key}={want!r}")
    if config["n_embd"] % config["n_head"]:
        raise CheckpointError(f"{folder}: n_embd={config['n_embd']} is not divisible by n_head={config['n_head']}")
    return config


def expected_shapes(config):
    """{checkpoint name: shape} for every tensor GPT-2 uses, in the hub's unprefixed names."""
    d, n_inner = config["n_embd"], config.get("n_inner") or 4 * config["n_embd"]
    shapes = {"wte.weight": (config["vocab_size"], d), "wpe.weight": (config["n_positions"], d)}
    for i in range(config["n_layer"]):
        for name, shape in {
            "ln_1.weight": (d,), "ln_1.bias": (d,),
            "attn.c_attn.weight": (d, 3 * d), "attn.c_attn.bias": (3 * d,),
            "attn.c_proj.weight": (d, d), "attn.c_proj.bias": (d,),
            "ln_2.weight": (d,), "ln_2.bias": (d,),
            "mlp.c_fc.weight": (d, n_inner), "mlp.c_fc.bias": (n_inner,),
            "mlp.c_proj.weight": (n_inner, d), "mlp.c_proj.bias": (d,),
        }.items():  # fmt: skip
            shapes[f"h.{i}.{name}"] = shape
    shapes.update({"ln_f.weight": (d,), "ln_f.bias": (d,)})
    return shapes


def to_params(tensors, config, source="checkpoint", packed=None):
    """Check tensors against the config and nest them: params["h"][i]["attn"]["c_attn"]["weight"].

    Ordinary checkpoints become float32. `packed` names the format of a checkpoint written by
    `picogpt convert` (see formats.py): its linears and wte are packed tuples, wte as wte.T."""
    # save_pretrained writes "transformer.h.0...", the hub's own files "h.0...": accept both.
    tensors = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    lm_head = tensors.pop("lm_head.weight", None)
    params = {"h": [{} for _ in range(config["n_layer"])]}
    for name, shape in expected_shapes(config).items():
        if name not in tensors:
            raise CheckpointError(f"{source} lacks tensor '{name}': the file is incomplete or not a GPT-2 checkpoint")
        if packed not in (None, "float32") and name in packed_names(config):
            leaf = _packed(tensors, name, shape[::-1] if name == "wte.weight" else shape, packed, source)
        elif tuple(tensors[name].shape) != shape:
            raise CheckpointError(f"{source}: tensor '{name}' has shape {tuple(tensors[name].shape)}, config.json implies {shape}")
        else:
            leaf = _float32(tensors[name])
        *path, key = name.split(".")
        node = params
        for part in path:
            node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
        node[key] = leaf
    if lm_head is not None and not np.array_equal(lm_head, tensors["wte.weight"]):
        raise CheckpointError(f"{source}: lm_head.weight differs from wte.weight; picogpt supports only GPT-2's tied lm_head")
    return params


def packed_names(config):
    """The tensors a converted checkpoint packs: every block linear's weight and wte."""
    return {"wte.weight"} | {f"h.{i}.{part}.{name}.weight" for i in range(config["n_layer"]) for part, name in formats.LINEARS}


def _packed(tensors, name, shape, dtype, source):
    """The packed tuple stored under `name` (and `name.scales` for int8), checked against its [in, out] shape."""
    data, want = tensors[name], {"float16": np.float16, "bfloat16": np.uint16, "int8": np.int8}[dtype]
    scales = tensors.get(f"{name}.scales")
    n_blocks = -(-shape[0] // formats.BLOCK)
    if data.dtype != want or tuple(data.shape) != shape:
        raise CheckpointError(f"{source}: tensor '{name}' is {data.dtype} {tuple(data.shape)}, a {dtype} checkpoint needs {np.dtype(want)} {shape}")
    if dtype == "int8":
        if scales is None or scales.dtype != np.float32 or tuple(scales.shape) != (n_blocks, shape[1]):
            raise CheckpointError(f"{source}: tensor '{name}.scales' is missing or not float32 {(n_blocks, shape[1])}")
        return formats.Q8(data, scales)
    return formats.F16(data.view(np.uint16)) if dtype == "float16" else formats.BF16(data)


def load_params(folder):
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
        elif isinstance(leaf, formats.Q8):
            tensors[name], tensors[f"{name}.scales"] = ("I8", leaf.data), ("F32", leaf.scales)
        elif isinstance(leaf, (formats.F16, formats.BF16)):
            tensors[name] = ("F16" if isinstance(leaf, formats.F16) else "BF16", leaf.data)
        else:
            tensors[name] = ("F32", np.asarray(leaf, np.float32))

    add("", params)
    os.makedirs(out_folder, exist_ok=True)
    metadata = {"format": "pt"} if dtype == "float32" else {"format": PICOGPT_FORMAT, "dtype": dtype}
    write_safetensors(os.path.join(out_folder, SINGLE_FILE), tensors, metadata)
    with open(os.path.join(out_folder, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    for name in TOKENIZER_FILES:
        if os.path.abspath(tokenizer_folder) != os.path.abspath(out_folder):
            shutil.copyfile(os.path.join(tokenizer_folder, name), os.path.join(out_folder, name))
