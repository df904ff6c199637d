"""Finding a checkpoint folder: a local folder, the tiny model inside the package, or a model on the
Hugging Face hub, used from huggingface_hub's cache when all its files are there.

Only `config.json`, `model.safetensors` (or its shards), `vocab.json` and `merges.txt` are ever
fetched: never `pytorch_model.bin`, never a pickle.
"""

import contextlib
import errno
import logging
import os
import sys

from . import CheckpointError
from .params import TOKENIZER_FILES, read_config
from .safetensors import SHARD_INDEX, SINGLE_FILE, shards

ALIASES = {
    "gpt2": "openai-community/gpt2",
    "gpt2-medium": "openai-community/gpt2-medium",
    "gpt2-large": "openai-community/gpt2-large",
    "gpt2-xl": "openai-community/gpt2-xl",
    "distilgpt2": "distilbert/distilgpt2",
}
TINY = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tiny"
)  # tools/tiny/train_tiny.py made it
LOCAL_HINT = "or give a local folder holding config.json, model.safetensors, vocab.json and merges.txt"
TINY_HINT = "use the model tiny (it ships with picogpt)"


def resolve(name_or_path, revision=None, refresh=False):
    """Return a local folder holding the checkpoint's files, downloading them from the hub if needed.

    A hub model whose files are all in huggingface_hub's cache is used from there without touching
    the network (so it loads offline with no wait); `refresh` (picogpt download) asks the hub for the
    revision's newest files all the same. `revision`: a branch, tag or commit of a hub model."""
    folder = os.path.expanduser(name_or_path)
    local = (
        os.path.isdir(folder)
        or name_or_path == "tiny"
        or name_or_path.startswith((".", "/", "~"))
        or name_or_path.count("/") > 1
    )
    if local and revision is not None:
        raise CheckpointError(
            f"--revision is for models on the Hugging Face hub, and {name_or_path} is a local folder: drop --revision"
        )
    if os.path.isdir(folder):
        return _check_folder(folder)
    if name_or_path == "tiny":  # the small GPT-2 that ships inside the package: no network needed
        return _check_folder(TINY)
    if os.path.exists(folder) and name_or_path not in ALIASES:  # a file: "no such folder" would mislead
        raise CheckpointError(
            f"{name_or_path} is a file, not a checkpoint folder: give a model name ({', '.join([*ALIASES, 'tiny'])}), "
            "a hub repo id (org/name) or a folder holding config.json, model.safetensors, vocab.json and merges.txt"
        )
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
        weights = [SHARD_INDEX, *shards(os.path.join(folder, SHARD_INDEX))]
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
    return os.path.dirname(config) if all(path(shard) for shard in shards(index)) else None


def unreachable(timeout=5.0):
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
    unknown = f"unknown model '{repo_id}': not a local folder, a known name ({', '.join([*ALIASES, 'tiny'])}) or a hub repo id like org/name"
    try:
        cached = _cached(repo_id, revision)
    except errors.HFValidationError:
        raise CheckpointError(unknown) from None
    if cached and not refresh:
        return cached
    offline = constants.HF_HUB_OFFLINE
    why = "HF_HUB_OFFLINE is set" if offline else unreachable()
    if why and cached:  # picogpt download with no network: the cached copy is what there is
        print(f"picogpt: the hub cannot be reached ({why}): using the cached {name}", file=sys.stderr, flush=True)
        return cached
    if why:
        fix = "unset HF_HUB_OFFLINE to download it" if offline else "connect to the network"
        raise CheckpointError(
            f"cannot load '{name}': the Hugging Face hub cannot be reached ({why}) and it is not in the cache "
            f"({constants.HF_HUB_CACHE}); {fix}, or {TINY_HINT}, {LOCAL_HINT}"
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
                    names = shards(fetch(SHARD_INDEX))
                except errors.RemoteEntryNotFoundError:
                    raise CheckpointError(
                        f"{repo_id} has no {SINGLE_FILE} on the hub (picogpt never loads pickled pytorch_model.bin); "
                        f"convert it to safetensors, {LOCAL_HINT}"
                    ) from None
                for shard in names:
                    fetch(shard)
            for filename in TOKENIZER_FILES:
                fetch(filename)
    except errors.HFValidationError:
        raise CheckpointError(unknown) from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(
            f"{repo_id} has no revision '{revision}' on the hub: give a branch, tag or commit that exists"
        ) from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(
            f"unknown model '{repo_id}': no such repo on the Hugging Face hub; check the name, {LOCAL_HINT}"
        ) from None
    except errors.LocalEntryNotFoundError:
        raise CheckpointError(
            f"cannot load '{name}': the download failed and it is not in the cache ({constants.HF_HUB_CACHE}); "
            f"check the network, or {TINY_HINT}, {LOCAL_HINT}"
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
