"""The `picogpt` command end to end, in a subprocess, against local fixture folders."""

import json
import os
import signal
import subprocess
import time

import pytest
from conftest import save_checkpoint
from helpers import PICOGPT, assert_one_line_error, run

import picogpt


def test_generate_streams_the_same_text_as_the_library(tiny):
    folder = tiny[0]
    result = run("generate", "Hello world", "--model", folder, "--max-new-tokens", "12", "--seed", "3")
    assert result.returncode == 0, result.stderr
    expected = picogpt.load(folder).generate("Hello world", max_new_tokens=12, seed=3)
    assert result.stdout == expected + "\n" and expected
    assert run("generate", "Hello world", "--model", folder, "-n", "12", "--seed", "3").stdout == result.stdout


def test_greedy_stop_and_samples(tiny):
    folder = tiny[0]
    greedy = picogpt.load(folder).generate("The", max_new_tokens=8, temperature=0)
    stop = greedy[len(greedy) // 2 :][:3]
    result = run("generate", "The", "--model", folder, "-n", "8", "-t", "0", "--stop", stop, "--num-samples", "2")
    assert result.returncode == 0, result.stderr
    cut = greedy[: greedy.index(stop)]
    assert result.stdout == f"{cut}\n{'-' * 40}\n{cut}\n"


def test_prompt_from_stdin(tiny):
    args = [PICOGPT, "generate", "-", "--model", tiny[0], "-n", "6", "--seed", "2"]
    from_stdin = subprocess.run(args, input="Once upon a time\n", capture_output=True, text=True, timeout=300)
    assert from_stdin.returncode == 0, from_stdin.stderr
    assert (
        from_stdin.stdout == run("generate", "Once upon a time\n", "--model", tiny[0], "-n", "6", "--seed", "2").stdout
    )


def test_json_without_a_seed_reports_the_one_it_drew():
    args = ["generate", "The list", "--model", "tiny", "--json", "-n", "8", "-t", "1.0", "--num-samples", "2"]
    first = run(*args)
    assert first.returncode == 0, first.stderr
    samples = [json.loads(line) for line in first.stdout.splitlines()]
    seed = samples[0]["seed"]
    assert isinstance(seed, int) and [s["seed"] for s in samples] == [seed, seed + 1]  # sample i: seed + i
    again = [json.loads(line) for line in run(*args, "--seed", str(seed)).stdout.splitlines()]
    assert [s["text"] for s in again] == [s["text"] for s in samples] and [s["seed"] for s in again] == [seed, seed + 1]
    plain = run("generate", "The list", "--model", "tiny", "-n", "8", "-t", "1.0", "--seed", str(seed))
    assert plain.stdout == samples[0]["text"] + "\n"


def test_verbose_reports_speed_on_stderr(tiny):
    result = run("generate", "Hello", "--model", tiny[0], "-n", "5", "--verbose")
    assert result.returncode == 0 and "tokens/s" in result.stderr and "tokens/s" not in result.stdout


def test_long_prompt_is_cut_with_a_note(tiny):
    result = run("generate", "word " * 100, "--model", tiny[0], "-n", "3")
    assert result.returncode == 0 and "keeping the last 64" in result.stderr


def test_help_documents_every_option():
    out = run("generate", "--help").stdout
    for option in [
        "--model",
        "--max-new-tokens",
        "--temperature",
        "--top-k",
        "--top-p",
        "--seed",
        "--stop",
        "--num-samples",
        "--verbose",
    ]:
        assert option in out
    assert "default: 50" in out and run("--help").returncode == 0


@pytest.mark.parametrize(
    "option,value,name",
    [
        ("--temperature", "-1", "--temperature"),
        ("--top-p", "1.5", "--top-p"),
        ("--top-k", "0", "--top-k"),
        ("--max-new-tokens", "-3", "--max-new-tokens"),
        ("--num-samples", "0", "--num-samples"),
        ("--repetition-penalty", "0", "--repetition-penalty"),
    ],
)
def test_bad_sampling_values(tiny, option, value, name):
    assert_one_line_error(run("generate", "hi", "--model", tiny[0], option, value), name)


def test_unknown_model_without_network(tmp_path):
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path), "HF_HUB_OFFLINE": "1"}
    assert_one_line_error(
        run("generate", "hi", "--model", "gpt2-medium", env=env),
        "openai-community/gpt2-medium",
        "HF_HUB_OFFLINE",
        "tiny",
        "local folder",
    )
    assert_one_line_error(
        run("generate", "hi", "--model", "nobody/nothing", env=env), "nobody/nothing", "the model tiny"
    )
    assert_one_line_error(run("generate", "hi", "--model", "not a valid/repo id!", env=env), "unknown model")
    assert_one_line_error(run("generate", "hi", "--model", "./no-such-folder", env=env), "no such folder")


def test_a_file_given_as_model_or_output_folder(tiny, tmp_path):
    weights = os.path.join(tiny[0], "model.safetensors")  # a file that exists: the likeliest mistake
    for model in (weights, os.path.relpath(weights)):
        result = run("generate", "hi", "--model", model)
        assert_one_line_error(result, "is a file, not a checkpoint folder", "config.json", "tiny")
        assert result.returncode == 1 and "no such folder" not in result.stderr
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    result = run("convert", "tiny", str(taken), "--dtype", "int8")
    assert_one_line_error(result, str(taken), "is a file, not a folder")
    assert result.returncode == 2 and "Errno" not in result.stderr
    assert taken.read_text() == "not a folder"


@pytest.fixture
def broken(tiny, tmp_path):
    return save_checkpoint(tiny[1], str(tmp_path / "ckpt"), layout="hub")


def test_checkpoint_errors(broken):
    weights = os.path.join(broken, "model.safetensors")
    config = os.path.join(broken, "config.json")
    good_weights, good_config = open(weights, "rb").read(), open(config).read()

    open(weights, "wb").write(good_weights[: len(good_weights) // 3])
    assert_one_line_error(run("generate", "hi", "--model", broken), "corrupt or truncated")

    from safetensors.numpy import load_file, save_file

    open(weights, "wb").write(good_weights)
    tensors = load_file(weights)
    del tensors["ln_f.weight"]
    save_file(tensors, weights)
    assert_one_line_error(run("generate", "hi", "--model", broken), "ln_f.weight")

    json.dump({**json.loads(good_config), "model_type": "bert"}, open(config, "w"))
    assert_one_line_error(run("generate", "hi", "--model", broken), "model_type")

    os.remove(os.path.join(broken, "merges.txt"))
    assert_one_line_error(run("generate", "hi", "--model", broken), "merges.txt")


def test_ctrl_c_keeps_what_was_printed(tiny):
    proc = subprocess.Popen(
        [PICOGPT, "generate", "Hello", "--model", tiny[0], "-n", "100000", "--seed", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # a shell starting pytest in the background ignores SIGINT in its children: as at a terminal
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    first = os.read(proc.stdout.fileno(), 100)  # unbuffered: wait until text is streaming
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130
    assert first and b"Traceback" not in err and b"interrupted" in err
    printed = (first + out).decode()
    printed = printed.rstrip("\n")
    expected = ""
    for piece in picogpt.load(tiny[0]).stream("Hello", max_new_tokens=100000, seed=1):
        expected += piece
        if len(expected) >= len(printed):
            break
    assert len(printed) > len(first) and expected.startswith(printed)


def test_threads_and_backends_give_the_same_text(tiny):
    args = ["generate", "Hello", "--model", tiny[0], "-n", "16", "--seed", "5", "-v"]
    one = run(*args, "--threads", "1")
    assert one.returncode == 0 and "numba backend, float32 weights, 1 thread (--threads)\n" in one.stderr
    two = run(*args, "--threads", "2")
    assert "numba backend, float32 weights, 2 threads" in two.stderr
    reference = run(*args, "--backend", "numpy")
    assert one.stdout == two.stdout == reference.stdout and one.stdout.strip()
    assert_one_line_error(run(*args, "--threads", "0"), "--threads")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "int8"])
def test_dtype_and_convert(tiny, tmp_path, dtype):
    out = str(tmp_path / dtype)
    converted = run("convert", tiny[0], out, "--dtype", dtype)
    assert converted.returncode == 0 and "wrote" in converted.stderr, converted.stderr
    expected = picogpt.load(tiny[0], dtype=dtype).generate("Hello world", max_new_tokens=12, seed=3)
    on_the_fly = run("generate", "Hello world", "--model", tiny[0], "--dtype", dtype, "-n", "12", "--seed", "3", "-v")
    from_folder = run("generate", "Hello world", "--model", out, "-n", "12", "--seed", "3", "-v")
    assert on_the_fly.stdout == from_folder.stdout == expected + "\n"
    assert f"{dtype} weights" in from_folder.stderr
    assert_one_line_error(run("convert", tiny[0], out, "--dtype", dtype), "already holds", "another folder")


def test_bad_dtype_values(tiny, tmp_path):
    assert_one_line_error(run("generate", "hi", "--model", tiny[0], "--dtype", "int4"), "--dtype", "int8")
    assert_one_line_error(run("convert", tiny[0], str(tmp_path / "x")), "--dtype")
    import torch
    from conftest import random_gpt2

    hf = random_gpt2(seed=5)
    with torch.no_grad():
        hf.transformer.h[0].attn.c_attn.weight[1, 2] = -7e4  # beyond float16
    folder = save_checkpoint(hf, str(tmp_path / "big"))
    assert_one_line_error(
        run("generate", "hi", "--model", folder, "--dtype", "float16"), "h.0.attn.c_attn.weight", "bfloat16"
    )
    assert_one_line_error(run("convert", folder, str(tmp_path / "y"), "--dtype", "float16"), "bfloat16")


@pytest.mark.parametrize(
    "args, flag",
    [
        (["generate", "hi", "--seed", "-1"], "--seed"),
        (["generate", "hi", "--seed", str(2**64)], "--seed"),
        (["generate", "hi", "-n", "-1"], "--max-new-tokens"),
        (["generate", "hi", "--temperature", "-0.5"], "--temperature"),
        (["generate", "hi", "--top-k", "0"], "--top-k"),
        (["generate", "hi", "--top-p", "0"], "--top-p"),
        (["generate", "hi", "--repetition-penalty", "0"], "--repetition-penalty"),
        (["generate", "hi", "--num-samples", "0"], "--num-samples"),
        (["generate", "hi", "--dtype", "int4"], "--dtype"),
        (["generate", "hi", "--threads", "0"], "--threads"),
        (["generate", "hi", "--seed", "x"], "--seed"),
        (["score", "-", "--stride", "0"], "--stride"),
        (["score", "-", "--stride", "1000"], "--stride"),  # past the tiny model's context: known once it is loaded
        (["serve", "--port", "70000"], "--port"),
        (["serve", "--chunk", "0"], "--chunk"),  # a cap on the budget: 1 to 256, or none
        (["serve", "--chunk", "257"], "--chunk"),
    ],
)
def test_every_bad_option_value_exits_2_with_one_line_naming_it(args, flag):
    result = subprocess.run(
        [PICOGPT, *args, "--model", "tiny"], input="some text to score", capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 2, result.stderr
    assert_one_line_error(result, flag)


def test_check_leaves_the_options_as_parsed_and_returns_the_plan(tmp_path, capsys):
    """check reads args and returns what it makes of them (threads, SamplingParams, seed, steer vector):
    the namespace comes out as argparse made it."""
    import numpy as np

    from picogpt import cli

    steer = str(tmp_path / "steer.npy")
    np.save(steer, np.ones(8, dtype=np.float32))
    many = str(cli.cores() + 5)
    lines = [
        ["generate", "hi"],
        ["generate", "hi", "--seed", "7", "-t", "0", "--stop", "x", "--threads", many, "--steer", steer],
        ["generate", "--jsonl", str(tmp_path / "in.jsonl"), "-o", str(tmp_path / "out.jsonl"), "--threads", "1"],
        ["score", "-", "--stride", "3", "--threads", many],
        ["serve", "--port", "8080", "--threads", "1"],
        ["info", "--check"],
        ["convert", "tiny", str(tmp_path / "out"), "--dtype", "int8"],
    ]
    plans = []
    for line in lines:
        args = cli.parser().parse_args(line)
        before = dict(vars(args))
        plans.append(cli.check(args))
        assert vars(args) == before, line
    assert isinstance(plans[0].params.seed, int) and plans[0].steer_vector is None  # a seed drawn
    assert (plans[1].params.seed, plans[1].params.temperature, plans[1].params.stop) == (7, 0.0, ("x",))
    assert plans[1].threads == cli.cores() and list(plans[1].steer_vector) == [1.0] * 8
    assert plans[2].threads == 1 and plans[2].params.seed is not None
    assert plans[3] == cli.Plan(threads=cli.cores()) and plans[4] == cli.Plan(threads=1)
    assert plans[5] == plans[6] == cli.Plan()
    assert capsys.readouterr().err.count("is more than the") == 2


def test_interrupt_poll_raises_only_after_a_ctrl_c():
    from picogpt import cli

    interrupt = cli.Interrupt()
    interrupt.poll()
    interrupt.stopped.append(2)
    with pytest.raises(KeyboardInterrupt):
        interrupt.poll()
