"""Checkpoints: finding one (hub.py: local folders, the shipped tiny model, the Hugging Face hub and
its cache), reading and checking its safetensors into the parameter tree (params.py), the converted
copies `--dtype` keeps (converted.py), and `info`, `--check` and `download` (manage.py)."""
