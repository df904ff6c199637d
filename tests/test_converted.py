"""Converted copies (picogpt/converted.py): `load(..., dtype=D)` converts once, keeps the copy and maps
it afterwards; checked against converting in memory (formats.convert) and model.gpt2's logits."""

import errno
import json
import os
import shutil

import numpy as np
import pytest
import torch
from conftest import random_gpt2, save_checkpoint

import picogpt
from picogpt import cli, formats, model
from picogpt.checkpoint import converted
from picogpt.checkpoint import params as weights

PACKED = ["float16", "bfloat16", "int8"]
IDS = [464, 1351, 286, 262, 2829, 13, 50256, 0, 318]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    folder = str(tmp_path / "cache")
    monkeypatch.setenv("PICOGPT_CACHE", folder)
    return os.path.join(folder, "converted")


def leaves(params, path=""):
    """{path: array} of every array in a parameter tree, packed tuples by field."""
    if isinstance(params, dict):
        return {k: v for key, value in params.items() for k, v in leaves(value, f"{path}.{key}").items()}
    if isinstance(params, list):
        return {k: v for i, value in enumerate(params) for k, v in leaves(value, f"{path}.{i}").items()}
    if isinstance(params, formats.PACKED):
        return {f"{path}.{type(params).__name__}.{field}": v for field, v in params._asdict().items()}
    return {path: params}


def assert_same_params(got, expected):
    got, expected = leaves(got), leaves(expected)
    assert got.keys() == expected.keys()
    for name in expected:
        assert got[name].dtype == expected[name].dtype and np.array_equal(got[name], expected[name]), name


def in_memory(folder, dtype):
    return formats.convert(weights.read_params(folder)[0], dtype)


def mapped(array):
    while array is not None:
        if isinstance(array, np.memmap):
            return True
        array = array.base
    return False


def logits(params, config):
    return model.gpt2(IDS, **params, n_head=config["n_head"])


@pytest.mark.parametrize("dtype", PACKED)
def test_first_load_writes_a_copy_equal_to_converting_in_memory(tiny, cache, capsys, dtype):
    folder = tiny[0]
    loaded = picogpt.load(folder, backend="numpy", dtype=dtype)
    copy = converted.folder(folder, dtype)
    assert os.path.dirname(copy) == cache and os.path.basename(copy).startswith(f"{os.path.basename(folder)}-{dtype}-")
    assert sorted(os.listdir(cache)) == [os.path.basename(copy)]  # no temporary folder left beside it
    assert sorted(os.listdir(copy)) == ["config.json", "merges.txt", "model.safetensors", "source.json", "vocab.json"]
    assert capsys.readouterr().err == f"picogpt: converted {os.path.basename(folder)} to {dtype} once, kept in {copy}\n"
    assert loaded.dtype == dtype
    assert_same_params(loaded.params, in_memory(folder, dtype))
    assert weights.read_params(copy)[2] == dtype  # an ordinary converted checkpoint folder


def test_a_second_load_maps_the_copy_and_converts_nothing(tiny, cache, capsys, monkeypatch):
    folder = tiny[0]
    picogpt.load(folder, backend="numpy", dtype="int8")
    path = os.path.join(converted.folder(folder, "int8"), "model.safetensors")
    before = os.stat(path)
    capsys.readouterr()

    def no_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(converted, "write", no_conversion)
    monkeypatch.setattr(formats, "convert", no_conversion)
    again = picogpt.load(folder, backend="numpy", dtype="int8")
    after = os.stat(path)
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert capsys.readouterr().err == ""
    for name, array in leaves(again.params).items():
        assert mapped(array), name
    monkeypatch.undo()
    expected = in_memory(folder, "int8")
    assert np.array_equal(logits(again.params, again.config), logits(expected, again.config))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_a_checkpoint_stored_in_the_format_loads_as_it_is_and_writes_nothing(tmp_path, cache, capsys, dtype):
    folder = save_checkpoint(random_gpt2(seed=8).to(getattr(torch, dtype)), str(tmp_path / dtype))
    loaded = picogpt.load(folder, backend="numpy", dtype=dtype)
    assert loaded.dtype == dtype and not os.path.exists(cache) and "converted" not in capsys.readouterr().err
    assert_same_params(loaded.params, in_memory(folder, dtype))  # exactly what a converted copy holds
    assert np.array_equal(logits(loaded.params, loaded.config), logits(in_memory(folder, dtype), loaded.config))
    other = "bfloat16" if dtype == "float16" else "float16"
    assert picogpt.load(folder, backend="numpy", dtype=other).dtype == other  # another format: converted and kept
    assert os.listdir(cache) == [os.path.basename(converted.folder(folder, other))]


def test_the_tiny_model_in_float16_writes_no_converted_copy(cache, capsys):
    """The shipped tiny model is stored as float16: --dtype float16 runs it as it is."""
    tiny = picogpt.load("tiny", dtype="float16")
    assert tiny.dtype == "float16" and not os.path.exists(cache) and "converted" not in capsys.readouterr().err
    expected = picogpt.Model(in_memory(tiny.folder, "float16"), tiny.config, tiny.tokenizer)  # the NumPy reference
    options = dict(max_new_tokens=8, temperature=0.8, seed=4)
    assert tiny.generate("The list", **options) == expected.generate("The list", **options)


@pytest.mark.parametrize("source_dtype", ["float32", "int8"])
def test_chunked_conversion_is_exact_for_odd_shapes(tmp_path, cache, monkeypatch, source_dtype):
    # n_embd 50 and n_inner 37 leave partial int8 blocks; a 1 kB chunk splits every matrix into many
    hf = random_gpt2(seed=5, vocab_size=1000, n_positions=32, n_embd=50, n_head=5, n_inner=37)
    folder = save_checkpoint(hf, str(tmp_path / "odd"))
    if source_dtype != "float32":  # a checkpoint `picogpt convert` wrote, converted to the other formats
        folder = str(tmp_path / "odd-int8")
        weights.save_params(
            in_memory(str(tmp_path / "odd"), "int8"), hf.config.to_dict(), folder, str(tmp_path / "odd")
        )
    monkeypatch.setattr(converted, "CHUNK_BYTES", 1024)
    for dtype in formats.DTYPES:
        if dtype != source_dtype:
            assert_same_params(
                converted.load_params(folder, dtype)[0], in_memory(folder, dtype)
            )  # vocab 1000: no tokenizer for it


def test_a_replaced_model_file_is_converted_again(tmp_path, cache, capsys):
    folder = save_checkpoint(random_gpt2(seed=21), str(tmp_path / "src"))
    first = picogpt.load(folder, backend="numpy", dtype="int8")
    config = first.config
    old = logits(first.params, config)
    save_checkpoint(random_gpt2(seed=22), folder)  # new weights under the same path, same size
    capsys.readouterr()
    second = picogpt.load(folder, backend="numpy", dtype="int8")
    assert "converted src to int8 once" in capsys.readouterr().err
    expected = logits(in_memory(folder, "int8"), config)
    assert np.array_equal(logits(second.params, config), expected) and not np.array_equal(expected, old)
    assert os.listdir(cache) == [os.path.basename(converted.folder(folder, "int8"))]  # the old copy replaced


def test_copies_whose_source_is_gone_are_removed_when_another_is_kept(tmp_path, cache, capsys):
    """A temporary checkpoint's copy can never be used again: the next copy written removes it, and
    leaves the copies whose source is still there."""
    gone = save_checkpoint(random_gpt2(seed=31), str(tmp_path / "gone"))
    kept = save_checkpoint(random_gpt2(seed=32), str(tmp_path / "kept"))
    picogpt.load(gone, backend="numpy", dtype="int8")
    picogpt.load(kept, backend="numpy", dtype="int8")
    shutil.rmtree(gone)
    capsys.readouterr()
    config = picogpt.load(kept, backend="numpy", dtype="float16").config
    assert "removed 1 converted copy whose source is gone or changed" in capsys.readouterr().err
    assert sorted(os.listdir(cache)) == sorted(os.path.basename(converted.folder(kept, d)) for d in ("int8", "float16"))
    again = picogpt.load(kept, backend="numpy", dtype="int8")  # still there and valid: mapped, not converted
    assert "converted" not in capsys.readouterr().err
    assert np.array_equal(logits(again.params, config), logits(in_memory(kept, "int8"), config))


def test_a_damaged_copy_is_written_again(tiny, cache, capsys):
    folder = tiny[0]
    picogpt.load(folder, backend="numpy", dtype="float16")
    path = os.path.join(converted.folder(folder, "float16"), "model.safetensors")
    os.truncate(path, os.path.getsize(path) // 2)
    capsys.readouterr()
    loaded = picogpt.load(folder, backend="numpy", dtype="float16")
    assert capsys.readouterr().err.startswith(f"picogpt: converted {os.path.basename(folder)} to float16 once")
    assert_same_params(loaded.params, in_memory(folder, "float16"))


def test_a_weight_float16_cannot_hold_is_one_error_and_leaves_no_copy(tmp_path, cache, capsys):
    hf = random_gpt2(seed=24)
    with torch.no_grad():
        hf.transformer.h[1].mlp.c_proj.weight[3, 4] = -7e4  # beyond float16's +-65504
    folder = save_checkpoint(hf, str(tmp_path / "big"))
    capsys.readouterr()
    with pytest.raises(weights.CheckpointError, match=r"h\.1\.mlp\.c_proj\.weight.*bfloat16"):
        picogpt.load(folder, backend="numpy", dtype="float16")
    assert capsys.readouterr().err == "" and os.listdir(cache) == []


def test_a_cache_that_cannot_be_written_falls_back_to_converting_in_memory(tiny, tmp_path, monkeypatch, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")  # a folder cannot be made under a file, even by root
    monkeypatch.setenv("PICOGPT_CACHE", str(blocker / "cache"))
    loaded = picogpt.load(tiny[0], backend="numpy", dtype="int8")
    where = os.path.join(str(blocker), "cache", "converted")
    assert (
        capsys.readouterr().err
        == f"picogpt: cannot keep a converted copy in {where} (Not a directory): converting in memory\n"
    )
    assert_same_params(loaded.params, in_memory(tiny[0], "int8"))


@pytest.mark.parametrize("error", [OSError(errno.ENOSPC, "No space left on device"), KeyboardInterrupt()])
def test_a_copy_interrupted_halfway_leaves_nothing_behind(tiny, cache, monkeypatch, capsys, error):
    calls, convert_tensor = [], converted.convert_tensor

    def fail_at_the_fifth_tensor(*args):
        calls.append(1)
        if len(calls) == 5:
            raise error
        return convert_tensor(*args)

    monkeypatch.setattr(converted, "convert_tensor", fail_at_the_fifth_tensor)
    if isinstance(error, OSError):  # a full disk: the copy is given up, the weights converted in memory
        loaded = picogpt.load(tiny[0], backend="numpy", dtype="int8")
        assert (
            capsys.readouterr().err.splitlines()[-1]
            == f"picogpt: cannot keep a converted copy in {cache} (No space left on device): converting in memory"
        )
        assert_same_params(loaded.params, in_memory(tiny[0], "int8"))
    else:
        with pytest.raises(KeyboardInterrupt):
            picogpt.load(tiny[0], backend="numpy", dtype="int8")
    assert len(calls) == 5 and os.listdir(cache) == []


def info(folder, capsys):
    capsys.readouterr()
    assert cli.main(["info", "--model", folder, "--json"]) == 0
    return json.loads(capsys.readouterr().out)["converted"]


def test_info_lists_the_valid_copies(tmp_path, cache, capsys):
    folder = save_checkpoint(random_gpt2(seed=23), str(tmp_path / "src"))
    assert info(folder, capsys) == {}
    for dtype in ("int8", "float16"):
        picogpt.load(folder, backend="numpy", dtype=dtype)
    copies = info(folder, capsys)
    assert sorted(copies) == ["float16", "int8"]
    for dtype, copy in copies.items():
        assert copy["folder"] == converted.folder(folder, dtype)
        assert copy["bytes"] == sum(
            os.path.getsize(os.path.join(copy["folder"], f)) for f in os.listdir(copy["folder"])
        )
    assert cli.main(["info", "--model", folder]) == 0
    text = capsys.readouterr().out
    assert converted.folder(folder, "int8") in text and converted.folder(folder, "float16") in text
    path = os.path.join(folder, "model.safetensors")
    os.utime(
        path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 1)
    )  # the source changed: no copy is valid
    assert info(folder, capsys) == {}


@pytest.mark.parametrize("dtype", PACKED)
def test_convert_writes_what_converting_in_memory_and_saving_wrote(tiny, tmp_path, cache, dtype):
    folder, out, before = tiny[0], str(tmp_path / "out"), str(tmp_path / "before")
    assert cli.main(["convert", folder, out, "--dtype", dtype]) == 0
    weights.save_params(
        in_memory(folder, dtype), weights.read_config(folder), before, folder
    )  # how convert wrote it before
    assert (
        sorted(os.listdir(out))
        == sorted(os.listdir(before))
        == ["config.json", "merges.txt", "model.safetensors", "vocab.json"]
    )
    for name in os.listdir(before):
        with open(os.path.join(out, name), "rb") as a, open(os.path.join(before, name), "rb") as b:
            assert a.read() == b.read(), name
    assert weights.read_params(out)[2] == dtype
    assert not os.path.exists(cache)  # convert writes where it is told, keeps no copy of its own
