"""Checkpoints: finding one (hub.py: local folders, the shipped tiny model, the Hugging Face hub and
its cache), the safetensors format (safetensors.py: read memory-mapped, written through a temporary
file, shard indexes), checking a checkpoint against its config into the parameter tree (params.py),
the converted copies `--dtype` keeps (converted.py), and `info`, `--check` and `download` (manage.py)."""


class CheckpointError(Exception):
    """A user-facing problem with a checkpoint: the message is one line that names the fix."""
