"""Loading checkpoints: both key layouts, shards, the hub cache offline, and every way a file can be wrong."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from conftest import random_gpt2, save_checkpoint, torch_logits
from safetensors.numpy import load_file, save_file

import picogpt
from picogpt.checkpoint.params import CheckpointError, read_safetensors

IDS = [464, 2068, 7586, 21831, 18045, 625, 262, 16931, 3290, 13]


def assert_matches_torch(model, hf):
    logits = picogpt.gpt2(IDS, **model.params, n_head=model.config["n_head"])
    assert np.abs(logits - torch_logits(hf, IDS)).max() <= 1e-4


@pytest.mark.parametrize("layout", ["pretrained", "hub"])
def test_both_key_layouts_load(layout, tmp_path):
    hf = random_gpt2(seed=3)
    folder = save_checkpoint(hf, str(tmp_path), layout=layout)
    keys = read_safetensors(os.path.join(folder, "model.safetensors")).keys()
    assert any(k.startswith("transformer.") for k in keys) == (layout == "pretrained")
    assert ("h.0.attn.bias" in keys) == (layout == "hub")
    assert_matches_torch(picogpt.load(folder), hf)


def test_lm_head_weight_is_accepted_when_tied(tmp_path):
    hf = random_gpt2(seed=3)
    folder = save_checkpoint(hf, str(tmp_path), layout="hub")
    path = os.path.join(folder, "model.safetensors")
    tensors = load_file(path)
    save_file({**tensors, "lm_head.weight": tensors["wte.weight"]}, path)
    assert_matches_torch(picogpt.load(folder), hf)
    save_file({**tensors, "lm_head.weight": tensors["wte.weight"] + 1}, path)
    with pytest.raises(CheckpointError, match="lm_head.weight differs"):
        picogpt.load(folder)


def test_sharded_checkpoint_loads(tmp_path):
    hf = random_gpt2(seed=4)
    folder = save_checkpoint(hf, str(tmp_path), max_shard_size="2MB")
    assert "model.safetensors.index.json" in os.listdir(folder) and "model.safetensors" not in os.listdir(folder)
    assert_matches_torch(picogpt.load(folder), hf)


def test_float32_weights_stay_memory_mapped(tiny):
    model = picogpt.load(tiny[0])
    assert isinstance(model.params["h"][0]["mlp"]["c_fc"]["weight"].base, np.memmap) or isinstance(
        model.params["h"][0]["mlp"]["c_fc"]["weight"], np.memmap
    )


def populate_hub_cache(cache, repo_id, folder, files):
    """Lay files out as huggingface_hub's cache does: blobs, a snapshot of links, refs/main."""
    repo = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    os.makedirs(os.path.join(repo, "blobs"))
    os.makedirs(os.path.join(repo, "snapshots", commit))
    os.makedirs(os.path.join(repo, "refs"))
    with open(os.path.join(repo, "refs", "main"), "w") as f:
        f.write(commit)
    for i, name in enumerate(files):
        blob = os.path.join(repo, "blobs", f"{i:040x}")
        shutil.copyfile(os.path.join(folder, name), blob)
        os.symlink(
            os.path.relpath(blob, os.path.join(repo, "snapshots", commit)),
            os.path.join(repo, "snapshots", commit, name),
        )


def offline_env(cache):
    return {**os.environ, "HF_HUB_CACHE": cache, "HF_HUB_OFFLINE": "1"}


@pytest.mark.parametrize(
    "name,repo_id",
    [
        ("gpt2", "openai-community/gpt2"),
        ("distilgpt2", "distilbert/distilgpt2"),
        ("someone/tiny-gpt2", "someone/tiny-gpt2"),
    ],
)
def test_hub_path_offline_from_cache(tiny, tmp_path, name, repo_id):
    folder, hf = tiny
    cache = str(tmp_path / "hub")
    populate_hub_cache(cache, repo_id, folder, ["config.json", "model.safetensors", "vocab.json", "merges.txt"])
    code = f"import picogpt, numpy as np; m = picogpt.load({name!r}); np.save({str(tmp_path / 'l.npy')!r}, picogpt.gpt2({IDS}, **m.params, n_head=2))"
    subprocess.run([sys.executable, "-c", code], env=offline_env(cache), check=True)
    assert np.abs(np.load(tmp_path / "l.npy") - torch_logits(hf, IDS)).max() <= 1e-4


def test_hub_path_sharded_offline(tmp_path):
    hf = random_gpt2(seed=4)
    folder = save_checkpoint(hf, str(tmp_path / "src"), max_shard_size="2MB")
    shards = [f for f in os.listdir(folder) if f.startswith("model-")]
    cache = str(tmp_path / "hub")
    populate_hub_cache(
        cache,
        "org/sharded",
        folder,
        ["config.json", "model.safetensors.index.json", *shards, "vocab.json", "merges.txt"],
    )
    code = f"import picogpt, numpy as np; m = picogpt.load('org/sharded'); np.save({str(tmp_path / 'l.npy')!r}, picogpt.gpt2({IDS}, **m.params, n_head=2))"
    subprocess.run([sys.executable, "-c", code], env=offline_env(cache), check=True)
    assert np.abs(np.load(tmp_path / "l.npy") - torch_logits(hf, IDS)).max() <= 1e-4


@pytest.fixture
def broken(tiny, tmp_path):
    """A fresh copy of the tiny checkpoint, in the hub's layout, to damage."""
    folder = str(tmp_path / "ckpt")
    save_checkpoint(tiny[1], folder, layout="hub")
    return folder


def test_missing_tensor_is_named(broken):
    path = os.path.join(broken, "model.safetensors")
    tensors = load_file(path)
    del tensors["h.1.mlp.c_proj.bias"]
    save_file(tensors, path)
    with pytest.raises(CheckpointError, match=r"lacks tensor 'h.1.mlp.c_proj.bias'"):
        picogpt.load(broken)


def test_wrong_shape_is_named(broken):
    path = os.path.join(broken, "config.json")
    config = json.load(open(path))
    json.dump({**config, "n_inner": 64}, open(path, "w"))
    with pytest.raises(
        CheckpointError, match=r"'h.0.mlp.c_fc.weight' has shape \(32, 128\), config.json implies \(32, 64\)"
    ):
        picogpt.load(broken)


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty", "short"])
def test_corrupt_or_truncated_safetensors(broken, damage):
    path = os.path.join(broken, "model.safetensors")
    data = open(path, "rb").read()
    damaged = {"truncate": data[: len(data) // 2], "garbage": b"\xff" * 100, "empty": b"", "short": data[:100]}[damage]
    open(path, "wb").write(damaged)
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors file"):
        picogpt.load(broken)


def test_wrong_architecture(broken):
    path = os.path.join(broken, "config.json")
    json.dump({**json.load(open(path)), "model_type": "llama"}, open(path, "w"))
    with pytest.raises(CheckpointError, match="'llama' model, not a GPT-2 one"):
        picogpt.load(broken)


def test_folder_without_safetensors_names_what_is_missing(broken):
    os.remove(os.path.join(broken, "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing model.safetensors .*never pytorch_model.bin"):
        picogpt.load(broken)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_checkpoints_load_as_float32(tmp_path, dtype):
    import torch

    hf = random_gpt2(seed=6).to(getattr(torch, dtype))
    model = picogpt.load(save_checkpoint(hf, str(tmp_path)))
    assert model.params["wte"]["weight"].dtype == np.float32
    assert_matches_torch(model, hf.float())  # the same rounded weights, float32 math


def test_config_without_a_size_is_named(broken):
    path = os.path.join(broken, "config.json")
    config = json.load(open(path))
    del config["n_head"]
    json.dump(config, open(path, "w"))
    with pytest.raises(CheckpointError, match="n_head"):
        picogpt.load(broken)


def test_tokenizer_larger_than_the_model_is_refused(tmp_path):
    folder = save_checkpoint(random_gpt2(seed=7, vocab_size=1000), str(tmp_path))  # GPT-2's 50257-token files
    with pytest.raises(CheckpointError, match="tokenizer has 50257 tokens but the model only 1000"):
        picogpt.load(folder)


def test_padded_vocabulary_never_samples_a_token_without_text(tmp_path):
    folder = save_checkpoint(random_gpt2(seed=7, vocab_size=50304), str(tmp_path))  # padded to a multiple of 64
    model = picogpt.load(folder)
    model.params["wte"]["weight"] = np.array(model.params["wte"]["weight"])
    model.params["wte"]["weight"][50257:] = 100.0  # make the padding rows win every argmax
    assert model.generate("Hello", max_new_tokens=5, temperature=0)  # decodes: only real tokens were picked


def vm_rss_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads VmRSS from /proc")
def test_release_gives_a_mapped_weights_pages_back_and_keeps_its_values(tmp_path):
    """The kernels copy the weights into their own layout and release the mapped ones: the pages
    leave the resident set, and the weight still reads the same values (from the file)."""
    w = np.random.default_rng(0).standard_normal((4096, 4096)).astype(np.float32)  # 64 MB
    save_file({"w": w}, str(tmp_path / "w.safetensors"))
    mapped = read_safetensors(str(tmp_path / "w.safetensors"))["w"]
    assert isinstance(mapped.base, np.memmap) or isinstance(mapped.base.base, np.memmap)
    assert np.array_equal(mapped, w)  # every page touched: resident
    before = vm_rss_mb()
    picogpt.checkpoint.safetensors.release(mapped)
    assert before - vm_rss_mb() > 48
    assert np.array_equal(mapped, w)
    picogpt.checkpoint.safetensors.release(w)  # not mapped: nothing to do
