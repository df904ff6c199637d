"""Inside the model (picogpt/inside): every hook point against TransformerLens's run_with_cache, hooks
against its run_with_hooks, the traced twin's logits against model.gpt2, batches against one prompt at
a time, steering in cached generation against the uncached hooked pass, and the analyses against
their definitions computed apart."""

import json

import numpy as np
import pytest
import torch
import transformers
from conftest import random_gpt2, save_checkpoint
from helpers import assert_one_line_error, run
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import picogpt
from picogpt import model
from picogpt.inside import Steer, hook_names, patch_with, zero_ablate

TL_NAMES = set(hook_names(2))  # the names the issue lists, which TransformerLens has on GPT-2


def close(got, expected, rtol=1e-4):
    """Within rtol of the largest magnitude (at least 1e-6), shapes equal."""
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape, (got.shape, expected.shape)
    scale = max(np.abs(expected).max(), 1e-6)
    err = np.abs(got - expected).max()
    assert err <= rtol * scale, (err, scale)


@pytest.fixture(scope="module")
def small(tiny):
    """The conftest tiny checkpoint on both backends."""
    folder, hf = tiny
    return folder, hf, picogpt.load(folder), picogpt.load(folder, backend="numpy")


@pytest.fixture(scope="module")
def gpt2_shaped(tmp_path_factory):
    """A random checkpoint of gpt2's shapes (12 layers, 12 heads, 768 wide), context cut to 128."""
    hf = random_gpt2(seed=1, n_positions=128, n_embd=768, n_layer=12, n_head=12)
    folder = save_checkpoint(hf, str(tmp_path_factory.mktemp("gpt2-shaped")))
    return folder, hf, picogpt.load(folder)


def bridge(folder):
    """TransformerLens 4's TransformerBridge on a local folder, legacy hook names, weights as they are."""
    from transformer_lens.model_bridge import TransformerBridge

    hf = transformers.GPT2LMHeadModel.from_pretrained(folder, dtype=torch.float32)
    tl = TransformerBridge.boot_transformers(folder, hf_model=hf, device="cpu")
    tl.enable_compatibility_mode(no_processing=True)
    return tl


def tl_cache(tl, ids):
    with torch.no_grad():
        logits, cache = tl.run_with_cache(torch.tensor(ids))
    return logits.numpy(), {k: v.numpy() for k, v in cache.items()}


def random_ids(rng, n_vocab, shape):
    return rng.integers(0, n_vocab, size=shape).tolist()


# ---- every hook point, against TransformerLens -------------------------------------------------------


@pytest.mark.parametrize("which", ["small", "shipped", "gpt2_shaped"])
def test_every_hook_point_matches_transformer_lens(which, request):
    if which == "shipped":  # the tiny model in the package: trained weights, stored in float16
        m = picogpt.load("tiny")
        folder = m.folder
    else:
        made = request.getfixturevalue(which)
        folder, m = made[0], made[2]
    tl = bridge(folder)
    ids = random_ids(np.random.default_rng(0), m.config["vocab_size"], (2, 24))
    tl_logits, theirs = tl_cache(tl, ids)
    logits, mine = m.run_with_cache(ids)
    names = hook_names(m.config["n_layer"])
    assert list(mine) == names and set(names) <= set(theirs), set(names) - set(theirs)
    close(logits, tl_logits)
    for name in names:
        got, expected = mine[name], theirs[name]
        if name.endswith("hook_attn_scores"):  # masked scores aside: compare the causal part, and that ours are -inf
            causal = np.tril(np.ones(got.shape[-2:], bool))
            assert np.isneginf(got[..., ~causal]).all()
            got, expected = got[..., causal], expected[..., causal]
        close(got, expected)


def test_twin_logits_equal_model_gpt2_on_both_backends(small):
    folder, hf, fast, slow = small
    rng = np.random.default_rng(1)
    prompts = [random_ids(rng, 50257, n) for n in (5, 17, 1)]
    for m in (fast, slow):
        logits, _ = m.run_with_cache(prompts, names=[])
        for b, ids in enumerate(prompts):
            close(logits[b, : len(ids)], model.gpt2(ids, **m.params, n_head=m.config["n_head"]), 1e-5)


def test_a_prompt_does_not_depend_on_its_batch_mates(small):
    m = small[2]
    rng = np.random.default_rng(2)
    prompts = [random_ids(rng, 50257, n) for n in (9, 3, 20)]
    _, batched = m.run_with_cache(prompts)
    assert list(batched.lengths) == [9, 3, 20] and batched.mask.sum() == 32
    for b, ids in enumerate(prompts):
        _, alone = m.run_with_cache([ids])
        n = len(ids)
        for name, a in alone.items():
            got = batched[name][b]
            got = got[:, :n, :n] if name.endswith(("hook_attn_scores", "hook_pattern")) else got[:n]
            got = np.where(np.isneginf(got), 0, got)
            close(got, np.where(np.isneginf(a[0]), 0, a[0]), 1e-5)


def test_names_keep_only_what_is_asked_and_stop_at_layer_stops(small):
    m = small[2]
    ids = [list(range(100, 110))]
    _, all_ = m.run_with_cache(ids)
    _, one = m.run_with_cache(ids, names="blocks.1")
    assert set(one) == {n for n in all_ if n.startswith("blocks.1.")}
    _, attn = m.run_with_cache(ids, names=["blocks.0.attn", "hook_embed"])
    assert set(attn) == {n for n in all_ if n.startswith("blocks.0.attn.")} | {"hook_embed"}
    _, fn = m.run_with_cache(ids, names=lambda n: n.endswith("hook_pattern"))
    assert set(fn) == {"blocks.0.attn.hook_pattern", "blocks.1.attn.hook_pattern"}
    resid, part = m.run_with_cache(ids, names="blocks.0", stop_at_layer=1)
    close(resid, all_["blocks.0.hook_resid_post"], 0)
    assert set(part) == {n for n in all_ if n.startswith("blocks.0.")}
    assert all_["pattern", 1] is all_["blocks.1.attn.hook_pattern"] and all_["embed",] is all_["hook_embed"]
    assert one.nbytes < all_.nbytes / 2
    with pytest.raises(KeyError, match="was not kept"):
        one["hook_embed"]


# ---- hooks -------------------------------------------------------------------------------------------


def test_patching_and_ablation_hooks_match_transformer_lens(small):
    folder, _, m, _ = small
    tl = bridge(folder)
    rng = np.random.default_rng(3)
    clean, corrupt = random_ids(rng, 50257, (1, 12)), random_ids(rng, 50257, (1, 12))
    _, source = m.run_with_cache(corrupt, names="blocks.1.hook_resid_pre")
    ours = m.run_with_hooks(
        clean,
        hooks=[
            ("blocks.0.attn.hook_z", zero_ablate(head=1)),
            ("blocks.1.hook_resid_pre", patch_with(source["blocks.1.hook_resid_pre"], positions=[3, 7])),
        ],
    )
    patched = torch.tensor(source["blocks.1.hook_resid_pre"])

    def zero(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    def patch(x, hook):
        x = x.clone()
        x[:, [3, 7]] = patched[:, [3, 7]]
        return x

    with torch.no_grad():
        theirs = tl.run_with_hooks(
            torch.tensor(clean), fwd_hooks=[("blocks.0.attn.hook_z", zero), ("blocks.1.hook_resid_pre", patch)]
        )
    close(ours, theirs.numpy())
    assert np.abs(ours - m.run_with_cache(clean, names=[])[0]).max() > 1e-3  # the hooks changed something


def test_a_hook_returning_the_wrong_shape_is_a_clear_error(small):
    m = small[2]
    with pytest.raises(ValueError, match="returned shape"):
        m.run_with_hooks("hello there", hooks=[("hook_embed", lambda x, name: x[:, :1])])
    with pytest.raises(ValueError, match="pairs"):
        m.run_with_hooks("hello there", hooks=["hook_embed"])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    names=st.one_of(
        st.none(),
        st.text(max_size=30),
        st.lists(st.text(max_size=20), max_size=4),
        st.integers(),
        st.lists(st.integers(), max_size=3),
    ),
    prompts=st.one_of(
        st.text(max_size=20),
        st.lists(st.integers(-5, 60000), max_size=5),
        st.lists(st.lists(st.integers(-5, 60000), max_size=4), max_size=3),
        st.floats(),
        st.none(),
    ),
    stop=st.one_of(st.none(), st.integers(-4, 4), st.floats(), st.text(max_size=3)),
)
def test_hostile_arguments_are_value_errors_or_work(small, names, prompts, stop):
    m = small[2]
    try:
        out, cache = m.run_with_cache(prompts, names=names, stop_at_layer=stop)
    except (ValueError, KeyError):
        return
    assert np.isfinite(out).all() and all(np.isfinite(v[~np.isneginf(v)]).all() for v in cache.values())


# ---- steering and hooks in generation ------------------------------------------------------------------


def greedy_hooked(m, ids, hooks, n):
    """The oracle: each new token from a full uncached hooked pass over everything so far."""
    ids = list(ids)
    for _ in range(n):
        logits = m.run_with_hooks([ids], hooks=hooks)
        ids.append(int(np.argmax(logits[0, -1])))
    return ids


def test_steered_cached_generation_equals_the_uncached_hooked_pass(small):
    _, _, m, slow = small
    rng = np.random.default_rng(4)
    steer = Steer(rng.standard_normal(m.config["n_embd"]).astype(np.float32), layer=1, scale=3.0)
    prompts = ["The cat", "Once upon a time, in a land"]
    for model_ in (m, slow):
        plain = model_.complete(prompts, max_new_tokens=12, temperature=0)
        steered = model_.complete(prompts, max_new_tokens=12, temperature=0, steer=steer)
        assert [s["token_ids"] for s in steered] != [p["token_ids"] for p in plain]  # it steers
        for prompt, out in zip(prompts, steered):
            ids = picogpt.tokenizer.encode(model_.tokenizer, prompt)
            expected = greedy_hooked(model_, ids, [steer.hook()], 12)[len(ids) :]
            got = out["token_ids"] + [model_.tokenizer.eot_token] * (out["generated_tokens"] - len(out["token_ids"]))
            assert got == expected[: len(got)]


def test_hooks_in_generation_equal_the_uncached_hooked_pass(small):
    m = small[2]
    hooks = [("blocks.0.attn.hook_z", zero_ablate(head=0)), ("blocks.1.mlp.hook_post", lambda x, name: 2 * x)]
    prompts = ["Hello", "A much longer prompt than the first one"]
    outs = m.complete(prompts, max_new_tokens=10, temperature=0, hooks=hooks)
    for prompt, out in zip(prompts, outs):
        ids = picogpt.tokenizer.encode(m.tokenizer, prompt)
        assert out["token_ids"] == greedy_hooked(m, ids, hooks, 10)[len(ids) :][: len(out["token_ids"])]


def test_steering_vectors_are_checked(small):
    m = small[2]
    for steer, words in [
        (Steer(np.zeros(5), 0), "n_embd"),
        (Steer(np.zeros(32), 7), "block index"),
        (Steer(np.full(32, np.nan), 0), "finite"),
        (Steer(np.zeros(32), 0, float("inf")), "scale"),
    ]:
        with pytest.raises(ValueError, match=words):
            m.generate("hi", max_new_tokens=2, steer=steer)


# ---- the analyses ------------------------------------------------------------------------------------


def test_logit_lens_ends_at_the_models_logits(small):
    m = small[2]
    ids = list(range(300, 312))
    lens = m.logit_lens(ids, top_k=3)
    logits = model.gpt2(ids, **m.params, n_head=m.config["n_head"])
    close(lens.logits(m.config["n_layer"]), logits, 1e-5)
    assert (lens.top_ids[-1, :, 0] == logits.argmax(-1)).all()
    logp = (
        logits
        - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True))
        - logits.max(-1, keepdims=True)
    )
    close(np.log(lens.next_probs[-1]), logp[np.arange(11), ids[1:]], 1e-4)
    ranks = (logp[:-1] > logp[np.arange(11), ids[1:]][:, None]).sum(-1)
    assert (np.abs(lens.next_ranks[-1] - ranks) <= 1).all() and (lens.next_ranks[-1] == ranks).mean() > 0.8  # near-ties
    html = lens._repr_html_()
    assert html.count("<td style") == 3 * 12 and "<script" not in html


def test_attribution_sums_to_the_logit_difference_and_each_head_is_its_own_product(small):
    m = small[2]
    ids = list(range(1000, 1016))
    good, bad = 50, 60
    a = m.attribution(ids, good, bad)
    logits = model.gpt2(ids, **m.params, n_head=m.config["n_head"])
    assert abs(a.total - (logits[-1, good] - logits[-1, bad])) < 1e-4
    assert abs(a.rest) < 1e-4
    # head 1 of layer 0, computed apart in float64 from model.py's pieces
    p = m.params
    x = model.embedding(p["wte"]["weight"], np.array(ids)) + p["wpe"]["weight"][: len(ids)]
    block = p["h"][0]
    qkv = model.linear(model.layer_norm(x, **block["ln_1"]), **block["attn"]["c_attn"]).astype(np.float64)
    q, k, v = (qkv[:, j * 32 : (j + 1) * 32].reshape(-1, 2, 16)[:, 1] for j in range(3))
    s = q @ k.T / 4.0
    s[np.triu(np.ones_like(s, bool), 1)] = -np.inf
    z = (np.exp(s - s.max(-1, keepdims=True)) / np.exp(s - s.max(-1, keepdims=True)).sum(-1, keepdims=True)) @ v
    out = z[-1] @ block["attn"]["c_proj"]["weight"][16:32].astype(np.float64)
    _, cache = m.run_with_cache([ids], names="ln_final.hook_scale")
    scale = cache["ln_final.hook_scale"][0, -1, 0]
    wu = p["wte"]["weight"].astype(np.float64)
    expected = ((out - out.mean()) / scale) @ ((wu[good] - wu[bad]) * p["ln_f"]["weight"])
    assert abs(a.heads[0, 1] - expected) < 1e-4 * max(1, abs(expected))


def test_patching_sweep_equals_one_hooked_run_per_cell(small):
    m = small[2]
    rng = np.random.default_rng(5)
    target, source = random_ids(rng, 50257, 8), random_ids(rng, 50257, 8)
    good, bad = 11, 12
    sweep = m.patching(target, source, (good, bad))
    assert sweep.values.shape == (2, 8)
    _, theirs = m.run_with_cache([source])
    for layer in range(2):
        for pos in range(8):
            name = f"blocks.{layer}.hook_resid_pre"
            logits = m.run_with_hooks([target], hooks=[(name, patch_with(theirs[name], positions=[pos]))])
            assert abs(sweep.values[layer, pos] - (logits[0, -1, good] - logits[0, -1, bad])) < 1e-4
    heads = m.patching(target, source, (good, bad), what="heads")
    assert heads.values.shape == (2, 2)
    name = "blocks.1.attn.hook_z"
    logits = m.run_with_hooks([target], hooks=[(name, patch_with(theirs[name], head=0))])
    assert abs(heads.values[1, 0] - (logits[0, -1, good] - logits[0, -1, bad])) < 1e-4
    assert np.isfinite(sweep.values).all() and "<table" in sweep._repr_html_()
    with pytest.raises(ValueError, match="same number"):
        m.patching(target, source[:5], (good, bad))


def test_tokens_given_as_text_must_be_one_token(small):
    m = small[2]
    with pytest.raises(ValueError, match="one token"):
        m.attribution("The cat sat", " xylophonist", " cat")


# ---- the command line ------------------------------------------------------------------------------


@pytest.mark.slow
def test_generate_steers_from_a_npy_file_as_the_python_api_does(tmp_path):
    m = picogpt.load("tiny")
    vector = m.direction(" love and joy", " hate and anger", layer=2)
    path = str(tmp_path / "love.npy")
    np.save(path, vector)
    steer = Steer(vector, 2, 4.0)
    expected = m.generate("I think that you are", max_new_tokens=12, temperature=0, steer=steer)
    assert expected != m.generate("I think that you are", max_new_tokens=12, temperature=0)
    args = ["generate", "I think that you are", "--model", "tiny", "-n", "12", "-t", "0", "--steer", path]
    r = run(*args, "--steer-layer", "2", "--steer-scale", "4")
    assert r.returncode == 0, r.stderr
    assert r.stdout == expected + "\n"
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "I think that you are"}\n')
    r = run(
        "generate",
        "--jsonl",
        str(jsonl),
        "--model",
        "tiny",
        "-n",
        "12",
        "-t",
        "0",
        "--steer",
        path,
        "--steer-layer",
        "2",
        "--steer-scale",
        "4",
    )
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["text"] == expected


@pytest.mark.slow
def test_bad_steering_options_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_text("not numpy")
    wide = tmp_path / "wide.npy"
    np.save(wide, np.zeros(7, np.float32))
    two = tmp_path / "two.npy"
    np.save(two, np.zeros((2, 256), np.float32))
    base = ["generate", "hi", "--model", "tiny", "-n", "2"]
    for extra, words in [
        (["--steer", str(bad)], ["not a NumPy .npy file"]),
        (["--steer", str(tmp_path / "missing.npy")], ["--steer"]),
        (["--steer", str(two)], ["one row"]),
        (["--steer", str(wide)], ["256", "n_embd"]),
        (["--steer", str(wide.with_name("x.npy")), "--steer-layer", "1"], ["--steer"]),
        (["--steer-layer", "1"], ["go with --steer"]),
    ]:
        r = run(*base, *extra)
        assert_one_line_error(r, *words)
        assert r.returncode == 2
    np.save(tmp_path / "ok.npy", np.zeros(256, np.float32))
    r = run(*base, "--steer", str(tmp_path / "ok.npy"), "--steer-layer", "9")
    assert_one_line_error(r, "block index")
    assert r.returncode == 2
