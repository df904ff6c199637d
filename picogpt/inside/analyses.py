"""The analyses interpretability runs every day, each one call on a Model (inside.Inside's methods):

- the logit lens: the residual stream after each layer through ln_final and the unembedding;
- direct logit attribution: how much each head, MLP and embedding writes along one token's logit
  against another's, through the final layer norm's scale of the real run;
- activation patching: one activation at a time taken from another prompt's run, over layers x
  positions (or layers x heads), the metric after each, as an array. Batched: the runs patched at
  layer L start at L from the target's own residual stream, one pass of many rows per layer.

Each returns a small object holding NumPy arrays, shown as a heat map in a notebook (pictures.py).
"""

import numpy as np

from .. import formats, model
from .. import tokenizer as tok
from . import traced
from .hooks import SHORT, Run
from .pictures import heatmap, token_label

f32 = np.float32


def token_id(m, token):
    """A token given as its id or as text that is exactly one token (with its leading space)."""
    if isinstance(token, (int, np.integer)):
        if not 0 <= token < m.tokenizer.n_vocab:
            raise ValueError(f"token id {token} is outside the vocabulary of {m.tokenizer.n_vocab}")
        return int(token)
    ids = tok.encode(m.tokenizer, token) if isinstance(token, str) else None
    if not ids or len(ids) != 1:
        raise ValueError(f"{token!r} is {len(ids or [])} tokens: give one token's text (with its leading space) or id")
    return ids[0]


def labels(m, ids):
    return [token_label(m.tokenizer.decode([int(t)])) for t in ids]


def one_prompt(m, prompt, bos):
    ids, lengths = m.tokens_of(prompt, bos)
    if len(ids) != 1:
        raise ValueError("give one prompt here (a string or one list of token ids)")
    return ids[0]


# ---- the logit lens ---------------------------------------------------------------------------------


class LogitLens:
    """What the residual stream after each layer predicts: layer 0 is the embeddings, layer L the
    output of block L-1 (the last, the model's own logits). top_ids, top_probs: [layer, pos, k];
    next_probs, next_ranks: [layer, pos - 1], of each position's actual next token (rank 0 = top)."""

    def __init__(self, m, ids, resid, top_k):
        self.m, self.ids, self.resid = m, ids, resid  # resid [n_layer + 1, pos, n_embd]
        n, pos = resid.shape[:2]
        self.top_ids, self.top_probs = np.zeros((n, pos, top_k), np.int64), np.zeros((n, pos, top_k), f32)
        self.next_probs, self.next_ranks = np.zeros((n, pos - 1), f32), np.zeros((n, pos - 1), np.int64)
        for layer in range(n):
            logp = log_softmax(self.logits(layer))  # [pos, n_vocab]
            top = np.argsort(-logp, axis=-1, kind="stable")[:, :top_k]
            self.top_ids[layer], self.top_probs[layer] = top, np.exp(np.take_along_axis(logp, top, -1))
            chosen = logp[np.arange(pos - 1), ids[1:]]
            self.next_probs[layer] = np.exp(chosen)
            self.next_ranks[layer] = (logp[:-1] > chosen[:, None]).sum(-1)

    def logits(self, layer):
        """[pos, n_vocab]: layer's residual stream through ln_final and the unembedding."""
        w, p = self.m._weights(), self.m.params
        x = model.layer_norm(self.resid[layer], **p["ln_f"], eps=self.m.config.get("layer_norm_epsilon", 1e-5))
        return w.linear(x, w.lm_head)

    def __repr__(self):
        return f"<picogpt.inside.LogitLens: {len(self.resid)} layers x {len(self.ids)} positions>"

    def _repr_html_(self):
        words = [labels(self.m, row) for row in self.top_ids[..., 0]]
        rows = ["embed"] + [f"block {i}" for i in range(len(self.resid) - 1)]
        cols = labels(self.m, self.ids)
        return heatmap(self.top_probs[..., 0], rows, cols, "top prediction after each layer (its probability)", words)


def log_softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def logit_lens(m, prompt, top_k=5, bos=False):
    ids = one_prompt(m, prompt, bos)
    n_layer = m.config["n_layer"]
    names = ["blocks.0.hook_resid_pre"] + [f"blocks.{i}.hook_resid_post" for i in range(n_layer)]
    _, cache = m.run_with_cache([ids], names=names)
    return LogitLens(m, ids, np.stack([cache[n][0] for n in names]), top_k)


# ---- direct logit attribution -----------------------------------------------------------------------


class Attribution:
    """logit(good) - logit(bad) at one position, split into what each part of the model wrote there,
    each part read through the final layer norm of the real run (its centring and scale, then its
    weight): heads [n_layer, n_head], mlps [n_layer] (bias included), attn_biases [n_layer] (c_proj's
    bias, shared by the heads), embed, pos_embed, ln_final_bias. Their sum is `total`, the model's own
    logit difference, up to float32 rounding (`rest`; with int8 weights also the activations'
    quantization, which per-head products in floats do not have)."""

    def __init__(self, heads, mlps, attn_biases, embed, pos_embed, ln_final_bias, total):
        self.heads, self.mlps, self.attn_biases = heads, mlps, attn_biases
        self.embed, self.pos_embed, self.ln_final_bias, self.total = embed, pos_embed, ln_final_bias, total
        parts = heads.sum() + mlps.sum() + attn_biases.sum() + embed + pos_embed + ln_final_bias
        self.rest = float(total - parts)

    def __repr__(self):
        return f"<picogpt.inside.Attribution: total {self.total:.4g}, top head {self.top()}>"

    def top(self, k=1):
        """The k heads writing most along the difference, [(layer, head, value)], largest |value| first."""
        order = np.argsort(-np.abs(self.heads), axis=None)[:k]
        out = [(int(i // self.heads.shape[1]), int(i % self.heads.shape[1]), float(self.heads.flat[i])) for i in order]
        return out[0] if k == 1 else out

    def _repr_html_(self):
        values = np.concatenate([self.heads, self.mlps[:, None]], axis=1)
        cols = [f"H{h}" for h in range(self.heads.shape[1])] + ["MLP"]
        title = f"direct logit attribution (total {self.total:.3g}; embeddings {self.embed + self.pos_embed:.3g})"
        return heatmap(values, [f"L{i}" for i in range(len(values))], cols, title)


def attribution(m, prompt, good, bad, position=-1, bos=False):
    good, bad = token_id(m, good), token_id(m, bad)
    ids = one_prompt(m, prompt, bos)
    n_layer, n_head, n_embd = m.config["n_layer"], m.config["n_head"], m.config["n_embd"]
    head_dim = n_embd // n_head
    keep = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    keep += [f"blocks.{i}.{n}" for i in range(n_layer) for n in ("attn.hook_z", "hook_mlp_out")]
    logits, cache = m.run_with_cache([ids], names=keep)
    pos = position % len(ids)
    p = m.params
    w_u = formats.embedding(p["wte"]["weight"], np.array([good, bad]))  # [2, n_embd]: rows of the unembedding
    direction = (w_u[0] - w_u[1]) * p["ln_f"]["weight"]  # what a normalized residual writes along the difference
    scale = cache["ln_final.hook_scale"][0, pos, 0]

    def read(x):  # [..., n_embd] -> [...]: through ln_final's centring and this run's scale, then the direction
        return ((x - x.mean(axis=-1, keepdims=True)) / scale) @ direction

    heads, mlps, biases = np.zeros((n_layer, n_head)), np.zeros(n_layer), np.zeros(n_layer)
    for i, block in enumerate(p["h"]):
        w_o = formats.dequantize(block["attn"]["c_proj"]["weight"]).reshape(n_head, head_dim, n_embd)
        z = cache[f"blocks.{i}.attn.hook_z"][0, pos]  # [n_head, head_dim]
        heads[i] = read(np.einsum("hd,hde->he", z, w_o))
        biases[i] = read(block["attn"]["c_proj"]["bias"])
        mlps[i] = read(cache[f"blocks.{i}.hook_mlp_out"][0, pos])
    return Attribution(
        heads,
        mlps,
        biases,
        float(read(cache["hook_embed"][0, pos])),
        float(read(cache["hook_pos_embed"][0, pos])),
        float(p["ln_f"]["bias"] @ (w_u[0] - w_u[1])),
        float(logits[0, pos, good] - logits[0, pos, bad]),
    )


# ---- activation patching ----------------------------------------------------------------------------

POSITIONAL = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


class Sweep:
    """A patching sweep: values [n_layer, pos] (or [n_layer, n_head] for heads), the metric of the
    target's run with one activation taken from the source's; target and source: the metric of each
    run unpatched."""

    def __init__(self, values, what, cols, target, source):
        self.values, self.what, self.cols, self.target, self.source = values, what, cols, target, source

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __repr__(self):
        return (
            f"<picogpt.inside.Sweep of {self.what}: {self.values.shape[0]} layers x {self.values.shape[1]}, "
            f"metric {self.target:.4g} unpatched, {self.source:.4g} on the source>"
        )

    def _repr_html_(self):
        title = f"patching {self.what}: the metric (unpatched {self.target:.3g}, source {self.source:.3g})"
        return heatmap(self.values, [f"L{i}" for i in range(len(self.values))], self.cols, title)


def metric_of(m, metric):
    """A function of last-position logits [rows, n_vocab] -> [rows]: metric itself, or for a pair of
    tokens (good, bad) their logit difference."""
    if callable(metric):
        return metric
    if isinstance(metric, (tuple, list)) and len(metric) == 2:
        good, bad = token_id(m, metric[0]), token_id(m, metric[1])
        return lambda logits: logits[:, good] - logits[:, bad]
    raise ValueError(f"metric must be a function of the last position's logits or a pair of tokens, got {metric!r}")


def patching(m, target, source, metric, what="resid_pre", bos=False):
    metric = metric_of(m, metric)
    if what not in (*POSITIONAL, "heads"):
        raise ValueError(f"what must be one of {', '.join((*POSITIONAL, 'heads'))}, got {what!r}")
    ids, src = one_prompt(m, target, bos), one_prompt(m, source, bos)
    if len(ids) != len(src):
        raise ValueError(f"the target has {len(ids)} tokens and the source {len(src)}: patching needs the same number")
    n_layer, n_head, n = m.config["n_layer"], m.config["n_head"], len(ids)
    name = "attn.hook_z" if what == "heads" else SHORT[what]
    per_layer = [f"blocks.{i}.{name}" for i in range(n_layer)]
    starts = [f"blocks.{i}.hook_resid_pre" for i in range(n_layer)]
    logits, mine = m.run_with_cache([ids], names=starts)
    theirs_logits, theirs = m.run_with_cache([src], names=per_layer)
    w, eps = m._weights(), m.config.get("layer_norm_epsilon", 1e-5)
    rows = n_head if what == "heads" else n  # one patched run per row
    values = np.zeros((n_layer, rows))
    batch_ids, lengths = np.tile(ids, (rows, 1)), np.full(rows, n)
    at = (np.arange(rows), np.full(rows, n - 1))  # each row's last position

    for i in range(n_layer):
        source = theirs[per_layer[i]][0]  # [pos, ...]

        def patch(x, name, source=source):
            x = x.copy()
            r = np.arange(rows)
            if what == "heads":
                x[r, :, r] = source[:, r].transpose(1, 0, 2)  # row h: head h at every position
            else:
                x[r, r] = source[r]  # row p: position p
            return x

        run = Run((), [(per_layer[i], patch)])
        x = np.repeat(mine[starts[i]], rows, axis=0)  # [rows, pos, n_embd]: the target's own stream at block i
        with traced.adapted(w, rows * n):
            out = traced.gpt2(batch_ids, lengths, w, n_head, run, eps, start=i, x=x, at=at)
        values[i] = metric(out)
    cols = [f"H{h}" for h in range(n_head)] if what == "heads" else [f"{p} {t}" for p, t in enumerate(labels(m, ids))]
    return Sweep(values, what, cols, float(metric(logits[:, -1])[0]), float(metric(theirs_logits[:, -1])[0]))


def direction(m, plus, minus, layer, bos=False):
    """A steering vector: the mean residual stream before block `layer` over `plus`'s positions less
    the same over `minus`'s ([n_embd], for inside.Steer)."""
    name = f"blocks.{layer}.hook_resid_pre"
    means = []
    for prompt in (plus, minus):
        ids = one_prompt(m, prompt, bos)
        _, cache = m.run_with_cache([ids], names=[name], stop_at_layer=layer + 1)
        means.append(cache[name][0].mean(axis=0))
    return means[0] - means[1]


def patterns(m, prompt, layer, bos=False):
    from .pictures import Patterns

    ids = one_prompt(m, prompt, bos)
    name = f"blocks.{layer}.attn.hook_pattern"
    _, cache = m.run_with_cache([ids], names=[name], stop_at_layer=layer + 1)
    return Patterns(cache[name][0], [m.tokenizer.decode([int(t)]) for t in ids], layer)
