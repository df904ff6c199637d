"""Tiny random GPT-2 checkpoints, built with transformers and saved in the real Hugging Face layouts."""

import os
import sys

import numpy as np
import pytest
import torch
import transformers

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tools"))
from checkpoints import gpt2_bpe_files, save_checkpoint  # noqa: E402, F401  (the tests import them from here)


def random_gpt2(seed=0, **config):
    """A GPT2LMHeadModel with random weights (biases and layer norms too, so nothing is trivially 0 or 1)."""
    torch.manual_seed(seed)
    config = {"vocab_size": 50257, "n_positions": 64, "n_embd": 32, "n_layer": 2, "n_head": 2, **config}
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**config, attn_implementation="eager"))
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


def normal(rng):
    """randn(*shape, scale=1.0): float32 normal samples from `rng` (a test module's own stream)."""
    return lambda *shape, scale=1.0: (scale * rng.standard_normal(shape)).astype(np.float32)


def assert_close(got, expected, rtol=1e-5):
    """float32 of the same shape, within rtol of the largest magnitude (at least 1): a kernel against its NumPy twin."""
    assert got.dtype == np.float32 and got.shape == expected.shape, (got.dtype, got.shape, expected.shape)
    assert np.abs(got - expected).max() <= rtol * max(1.0, np.abs(expected).max()), np.abs(got - expected).max()


def torch_logits(hf, ids):
    with torch.no_grad():
        return hf(torch.tensor([list(ids)])).logits[0].numpy()


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    torch.set_num_threads(1)  # tiny models: threads only add overhead


@pytest.fixture(scope="session", autouse=True)
def picogpt_cache(tmp_path_factory):
    """Converted copies (load with a dtype, see picogpt/converted.py) go to a temporary folder, never
    ~/.cache; the environment variable reaches the `picogpt` subprocesses too."""
    os.environ["PICOGPT_CACHE"] = str(tmp_path_factory.mktemp("picogpt-cache"))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """(folder, torch model): 2 layers, 2 heads, n_embd 32, GPT-2's full vocabulary, context of 64."""
    hf = random_gpt2()
    return save_checkpoint(hf, str(tmp_path_factory.mktemp("tiny"))), hf


@pytest.fixture(scope="session")
def bpe_folder(tmp_path_factory):
    return gpt2_bpe_files(str(tmp_path_factory.mktemp("bpe")))
