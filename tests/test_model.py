"""The NumPy math against transformers' GPT2LMHeadModel on the same random weights."""

import numpy as np
import pytest
import torch
from conftest import random_gpt2, save_checkpoint, torch_logits

import picogpt
from picogpt.engine import decode_tokens

SHAPES = [  # (n_layer, n_head, n_embd): a non-power-of-two head count, one head, several layers
    dict(n_layer=2, n_head=2, n_embd=32),
    dict(n_layer=3, n_head=3, n_embd=48),
    dict(n_layer=1, n_head=1, n_embd=16),
    dict(n_layer=4, n_head=5, n_embd=40, n_inner=72),
]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "L{n_layer}H{n_head}E{n_embd}".format(**s))
def checkpoint(request, tmp_path_factory):
    hf = random_gpt2(seed=1, vocab_size=50257, **request.param)
    model = picogpt.load(save_checkpoint(hf, str(tmp_path_factory.mktemp("ckpt"))))
    return model, hf


@pytest.mark.parametrize("n_seq", [1, 7, 64])
def test_logits_match_torch(checkpoint, n_seq):
    model, hf = checkpoint
    ids = np.random.default_rng(n_seq).integers(0, 50257, n_seq)
    logits = picogpt.gpt2(ids, **model.params, n_head=model.config["n_head"])
    assert logits.dtype == np.float32 and logits.shape == (n_seq, 50257)
    assert np.abs(logits - torch_logits(hf, ids)).max() <= 1e-4


def test_list_input_and_float32_throughout(checkpoint):
    model, _ = checkpoint
    params, n_head = model.params, model.config["n_head"]
    x = np.random.default_rng(0).standard_normal((5, model.config["n_embd"])).astype(np.float32)
    block = params["h"][0]
    assert picogpt.gelu(x).dtype == np.float32
    assert picogpt.softmax(x).dtype == np.float32
    assert picogpt.layer_norm(x, **block["ln_1"]).dtype == np.float32
    assert picogpt.mha(x, **block["attn"], n_head=n_head).dtype == np.float32
    assert picogpt.transformer_block(x, **block, n_head=n_head).dtype == np.float32
    assert picogpt.gpt2([1, 2, 3], **params, n_head=n_head).dtype == np.float32


def test_gelu_is_gpt2_tanh_gelu():
    x = np.linspace(-6, 6, 101, dtype=np.float32)
    expected = torch.nn.functional.gelu(torch.from_numpy(x), approximate="tanh").numpy()
    np.testing.assert_allclose(picogpt.gelu(x), expected, rtol=1e-6, atol=1e-6)


def test_cached_decoding_equals_full_forward(checkpoint):
    model, _ = checkpoint
    params, c = model.params, model.config
    ids = list(np.random.default_rng(2).integers(0, 50257, 40))
    cache = picogpt.kv_cache(
        **{k: c[k] for k in ("n_layer", "n_head", "n_positions", "n_embd")}
    )  # named as config.json's keys
    cached = [picogpt.gpt2(ids[:5], **params, n_head=c["n_head"], cache=cache, past=0)]  # prefill 5
    cached += [picogpt.gpt2([t], **params, n_head=c["n_head"], cache=cache, past=i) for i, t in enumerate(ids[5:], 5)]
    full = picogpt.gpt2(ids, **params, n_head=c["n_head"])
    assert np.abs(np.concatenate(cached) - full).max() <= 1e-4


@pytest.mark.parametrize("backend", ["numpy", "numba"])
def test_a_cache_of_the_wrong_shape_is_one_value_error_naming_kv_cache(tiny, backend):
    """kv_cache's last argument is n_embd: a cache made with head_dim there (as it once took) is told at
    the edge, in one line, not deep in a kernel."""
    model = picogpt.load(tiny[0], backend=backend)
    c, ids = model.config, [464, 1351, 286]
    n_layer, n_head, n_embd = c["n_layer"], c["n_head"], c["n_embd"]
    head_dim = n_embd // n_head
    wrong = picogpt.kv_cache(n_layer, n_head, c["n_positions"], head_dim)
    with pytest.raises(ValueError) as e:
        model.forward(ids, **model.params, n_head=n_head, cache=wrong)
    message = str(e.value)
    assert (
        "\n" not in message and f"kv_cache(n_layer={n_layer}, n_head={n_head}, n_positions, n_embd={n_embd})" in message
    )
    assert f"not ({n_head}, n_positions, {head_dim})" in message and str(wrong[0][0].shape) in message
    short = picogpt.kv_cache(n_layer, n_head, 2, n_embd)  # too few positions: told too, not written past its end
    with pytest.raises(ValueError, match="holds 2 positions and the inputs run to position 3"):
        model.forward(ids, **model.params, n_head=n_head, cache=short)
    right = picogpt.kv_cache(n_layer, n_head, c["n_positions"], n_embd)
    expected = model.forward(ids, **model.params, n_head=n_head)
    assert np.abs(model.forward(ids, **model.params, n_head=n_head, cache=right) - expected).max() <= 1e-5


def test_cached_decoding_across_the_sliding_window(tiny, capfd):
    """Every step's logits equal a full forward pass over the tokens in the window, through 3 slides."""
    folder, _ = tiny
    model = picogpt.load(folder)
    n_ctx = model.config["n_positions"]  # 64
    prompt = list(np.random.default_rng(3).integers(0, 50000, 50))
    seen = []

    def pick(logits):
        seen.append(logits)
        return int(np.argmax(logits))

    new = list(decode_tokens(picogpt.gpt2, model.params, model.config, prompt, 120, pick))
    assert len(new) == 120
    # the window: all tokens until n_ctx, then the oldest quarter dropped each time it fills up
    window, tokens = list(prompt), list(prompt)
    for step, token in enumerate(new):
        full = picogpt.gpt2(window, **model.params, n_head=model.config["n_head"])[-1]
        assert np.abs(seen[step] - full).max() <= 1e-4, step
        tokens.append(token)
        window = window[n_ctx // 4 :] + [token] if len(window) == n_ctx else window + [token]
    err = capfd.readouterr().err
    assert err.count("sliding the window") == 1


def test_long_prompt_keeps_its_last_tokens(tiny, capfd):
    folder, _ = tiny
    model = picogpt.load(folder)
    prompt = list(np.random.default_rng(4).integers(0, 50000, 100))
    seen = []
    greedy = lambda logits: seen.append(logits) or int(np.argmax(logits))  # noqa: E731
    next(decode_tokens(picogpt.gpt2, model.params, model.config, prompt, 1, greedy))
    expected = picogpt.gpt2(prompt[-64:], **model.params, n_head=2)[-1]
    assert np.abs(seen[0] - expected).max() <= 1e-4
    assert "keeping the last 64" in capfd.readouterr().err


def test_greedy_tokens_equal_transformers_generate():
    hf = random_gpt2(seed=5, vocab_size=1000, n_positions=128, n_layer=3, n_head=4, n_embd=64)
    params = picogpt.checkpoint.params.to_params(
        {k: v.detach().numpy() for k, v in hf.state_dict().items()}, hf.config.to_dict()
    )
    prompt = [17, 42, 7, 300, 999]
    ours = list(
        decode_tokens(picogpt.gpt2, params, hf.config.to_dict(), prompt, 32, lambda logits: int(np.argmax(logits)))
    )
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False, pad_token_id=0)
    assert ours == out[0, len(prompt) :].tolist()
