"""Batched generation: attention over B cache rows against the NumPy reference row by row, batched logits against
transformers with a left-padded attention mask, and every row of a batch against its prompt alone."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import assert_close, normal, random_gpt2

import picogpt
from picogpt import formats, kernels, model
from picogpt.checkpoint.params import to_params
from picogpt.engine import decode_rows, decode_tokens, rows_one_by_one
from picogpt.kernels import ops

rng = np.random.default_rng(7)
randn = normal(rng)


@pytest.mark.parametrize("n_head,head_dim", [(1, 1), (3, 7), (12, 64)])
def test_attend_rows_reads_each_row_only_to_its_own_length(n_head, head_dim):
    n_rows, n_ctx = 4, 40
    k_cache = np.full((n_rows, n_head, n_ctx, head_dim), np.nan, np.float32)  # NaN beyond the valid lengths
    v_cache = np.full((n_rows, n_head, n_ctx, head_dim), np.nan, np.float32)
    rows, n_kv = np.array([2, 0, 3]), np.array([1, 17, 40])
    for r, n in zip(rows, n_kv):
        k_cache[r, :, :n], v_cache[r, :, :n] = randn(n_head, n, head_dim, scale=2.0), randn(n_head, n, head_dim)
    q = randn(len(rows), n_head, head_dim, scale=2.0)
    got = ops.attend_rows(q, k_cache, v_cache, rows, n_kv)
    for s, (r, n) in enumerate(zip(rows, n_kv)):
        expected = model.attention(q[s][:, None], k_cache[r, :, :n], v_cache[r, :, :n], past=n - 1)[:, 0]
        assert_close(got[s], expected)


@pytest.fixture(scope="module")
def hf():
    return random_gpt2(seed=3, vocab_size=1000, n_positions=64, n_layer=2, n_head=4, n_embd=64)


@pytest.fixture(scope="module")
def params(hf):
    return to_params({k: v.detach().numpy() for k, v in hf.state_dict().items()}, hf.config.to_dict())


def left_padded_logits(hf, sequences):
    """transformers on left-padded rows with an attention mask (position ids from the mask, as its
    generate does): the logits at every row's last position."""
    width = max(map(len, sequences))
    ids = torch.tensor([[0] * (width - len(s)) + list(s) for s in sequences])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in sequences])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        return hf(input_ids=ids, attention_mask=mask, position_ids=positions).logits[:, -1].numpy()


@pytest.mark.parametrize("dtype", ["float32", "int8"])
def test_batched_logits_equal_transformers_with_left_padding_and_cached_decoding(hf, params, dtype):
    """Ragged prompts of 1, 7 and 30 tokens prefilled together, then 6 cached decode steps, and a step
    where one row brings a chunk of 3 tokens while the others bring one: every step against
    transformers on the whole left-padded sequences (float32) and model.gpt2 on each row alone."""
    p = params if dtype == "float32" else formats.convert(params, dtype)
    n_head = hf.config.n_head
    sequences = [list(rng.integers(0, 1000, n)) for n in (1, 7, 30)]
    cache = model.kv_cache(2, n_head, 64, 16 * n_head, n_rows=3)
    rows, inputs, past = [0, 1, 2], sequences, [0, 0, 0]
    for step in range(8):
        got = kernels.gpt2_rows(inputs, **p, n_head=n_head, cache=cache, rows=rows, past=past)
        reference = np.stack([model.gpt2(s, **p, n_head=n_head)[-1] for s in sequences])
        assert_close(got, reference)
        if dtype == "float32":
            assert np.abs(got - left_padded_logits(hf, sequences)).max() <= 1e-4
        past = [len(s) for s in sequences]
        inputs = [[int(t)] for t in rng.integers(0, 1000, 3)]
        if step == 6:
            inputs[1] = [int(t) for t in rng.integers(0, 1000, 3)]
        for s, new in zip(sequences, inputs):
            s += new


def test_a_subset_of_rows_leaves_the_others_untouched(params):
    cache = model.kv_cache(2, 4, 64, 64, n_rows=3)
    prompts = [[5, 6, 7], [8], [9, 10]]
    kernels.gpt2_rows(prompts, **params, n_head=4, cache=cache, rows=[0, 1, 2], past=[0, 0, 0])
    before = [k[1].copy() for k, _ in cache]
    got = kernels.gpt2_rows([[11], [12]], **params, n_head=4, cache=cache, rows=[2, 0], past=[2, 3])
    assert all(np.array_equal(b, k[1]) for b, (k, _) in zip(before, cache))
    assert_close(got[0], model.gpt2([9, 10, 11], **params, n_head=4)[-1])
    assert_close(got[1], model.gpt2([5, 6, 7, 12], **params, n_head=4)[-1])


def greedy(logits):
    return int(np.argmax(logits))


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_each_row_equals_its_prompt_alone_through_the_sliding_window(tiny, backend):
    """Greedy, ragged prompts of 1, 7 and 30 tokens, 80 new tokens: past the 64-token context, so each
    row slides its own window at its own step."""
    m = picogpt.load(tiny[0], backend=backend)
    prompts = [list(rng.integers(0, 50000, n)) for n in (1, 7, 30)]
    rows = [[] for _ in prompts]
    for step in decode_rows(m.forward_rows, m.params, m.config, prompts, 80, [greedy] * 3, eot=None):
        for row, token in step:
            rows[row].append(token)
    for prompt, row in zip(prompts, rows):
        assert row == list(decode_tokens(m.forward, m.params, m.config, prompt, 80, greedy))


def test_rows_that_finish_early_stop_and_the_others_go_on(tiny):
    m = picogpt.load(tiny[0])
    eot = m.tokenizer.eot_token
    prompts = [list(rng.integers(0, 50000, n)) for n in (3, 9, 4)]
    steps, calls = [], []

    def early_end(logits):  # row 1 ends its text at its 4th token
        calls.append(1)
        return eot if len(calls) == 4 else greedy(logits)

    stopped = set()
    for step in decode_rows(m.forward_rows, m.params, m.config, prompts, 12, [greedy, early_end, greedy], eot, stopped):
        steps.append(step)
        if len(steps) == 6:
            stopped.add(2)  # row 2 meets a stop string at step 6
    assert [len(s) for s in steps] == [3] * 4 + [2] * 2 + [1] * 6
    rows = {r: [t for s in steps for rr, t in s if rr == r] for r in range(3)}
    assert rows[1][-1] == eot and len(rows[1]) == 4 and len(rows[2]) == 6
    for r in (0, 2):
        alone = list(decode_tokens(m.forward, m.params, m.config, prompts[r], 12, greedy))
        assert rows[r] == alone[: len(rows[r])]


def test_generate_a_list_equals_each_prompt_alone_with_seed_plus_i(tiny):
    m = picogpt.load(tiny[0])
    prompts = ["Hello", "The quick brown fox jumps over the lazy dog, and then", ""]
    kw = dict(max_new_tokens=30, temperature=0.9, top_k=40)
    texts = m.generate(prompts, seed=11, **kw)
    assert texts == [m.generate(p, seed=11 + i, **kw) for i, p in enumerate(prompts)]
    assert texts == m.generate(prompts, seed=11, **kw)  # seeds reproduce
    assert len(set(m.generate(["Hi"] * 4, seed=0, **kw))) > 1  # same prompt, different streams
    stops = m.generate(prompts, temperature=0, max_new_tokens=30, stop=[" the", "e"])
    assert stops == [m.generate(p, temperature=0, max_new_tokens=30, stop=[" the", "e"]) for p in prompts]
    pairs = list(m.stream(prompts, seed=11, **kw))
    assert all(isinstance(r, int) and isinstance(piece, str) for r, piece in pairs)
    assert ["".join(piece for r, piece in pairs if r == i) for i in range(3)] == texts


def test_numpy_backend_batches_one_row_at_a_time(tiny):
    forward_rows = rows_one_by_one(model.gpt2)
    m = picogpt.load(tiny[0], backend="numpy")
    assert m.generate(["a", "bc"], max_new_tokens=8, seed=1) == picogpt.load(tiny[0]).generate(
        ["a", "bc"], max_new_tokens=8, seed=1
    )
    cache = model.kv_cache(2, 2, 64, 32, n_rows=2)
    got = forward_rows([[1, 2], [3]], **m.params, n_head=2, cache=cache, rows=[1, 0], past=[0, 0])
    assert_close(got[0], model.gpt2([1, 2], **m.params, n_head=2)[-1])


def test_bad_prompts_are_one_clear_error(tiny):
    m = picogpt.load(tiny[0])
    for bad in ([], ["ok", 3]):
        with pytest.raises(ValueError, match="prompt must be a string or a non-empty list of strings"):
            m.generate(bad)


def test_cli_num_samples_is_one_batch_with_the_same_text(tiny):
    args = [sys.executable, "-m", "picogpt.cli", "generate", "Hello", "--model", tiny[0], "-n", "12", "--seed", "4"]
    batch = subprocess.run(args + ["--num-samples", "3", "-v"], capture_output=True, text=True)
    assert batch.returncode == 0 and "3 rows at once" in batch.stderr, batch.stderr
    alone = [subprocess.run(args[:-1] + [str(4 + i)], capture_output=True, text=True).stdout for i in range(3)]
    assert batch.stdout == ("-" * 40 + "\n").join(alone)
