"""model.py's forward pass with a hook point at each of TransformerLens's names: the same page of math,
batch first, every activation handed to `run.at(name, x)` as it is made.

Why a twin and not hooks in model.py: model.py is the page a learner reads and the oracle everything
is tested against, one sequence at a time; threading a hook and a layer's name through each of its
functions would double every line. Here each line of model.py's math is one line with its name
(tests/test_inside.py holds the twin to model.gpt2's logits and to TransformerLens's activations).

Prompts of different lengths are right-padded to the longest: a prompt's query at position t sees
keys 0..t only, so the pads after it never reach its activations, and no attention mask beyond the
causal one is needed. With a KV cache (generation with hooks), row b's new tokens sit at positions
past[b].., the hooks see only the new positions (as TransformerLens's do with its cache), and only real
tokens' keys and values are written.

The matmuls are the engine's: on the kernels' layout (kernels.prepare) when the model runs on Numba,
so every weight format multiplies as it does in generation, else model.linear.
"""

import math

import numpy as np

from .. import formats, model, threads

f32 = np.float32


class Weights:
    """A model's weights as the twin reads them: the kernels' Layer per block (c_fc without its fused
    GELU: mlp.hook_pre comes between them) and lm_head, or model.py's parameter dicts."""

    def __init__(self, params, fast):
        self.params, self.fast = params, fast
        if fast:
            from ..kernels import forward as kernels

            prepared = kernels.prepare(params["wte"], params["h"])
            self.layers = [lay._replace(c_fc=lay.c_fc._replace(gelu=False)) for lay in prepared.layers]
            self.lm_head = prepared.lm_head
        else:
            self.layers = [
                dict(
                    ln_1=b["ln_1"],
                    c_attn=b["attn"]["c_attn"],
                    attn_c_proj=b["attn"]["c_proj"],
                    ln_2=b["ln_2"],
                    c_fc=b["mlp"]["c_fc"],
                    mlp_c_proj=b["mlp"]["c_proj"],
                )
                for b in params["h"]
            ]
            self.lm_head = {"weight": formats.lm_head(params["wte"]["weight"]), "bias": 0.0}

    def part(self, i, name):
        lay = self.layers[i]
        return lay[name] if isinstance(lay, dict) else getattr(lay, name)

    def norm(self, i, name):  # (weight, bias) of a block's layer norm
        w = self.part(i, name)
        return (w["weight"], w["bias"]) if isinstance(w, dict) else tuple(w)

    def linear(self, x, w):  # [..., in] -> [..., out]
        x2 = x.reshape(-1, x.shape[-1])
        if isinstance(w, dict):
            y = model.linear(x2, **w)
        else:
            from ..kernels import forward as kernels

            y = kernels.linear(np.ascontiguousarray(x2, f32), w)
        return y.reshape(*x.shape[:-1], -1)

    def gelu(self, x):
        if not self.fast:
            return model.gelu(x)
        from ..kernels.ops import bias_gelu_

        y = np.array(x, f32, order="C").reshape(-1, x.shape[-1])
        return bias_gelu_(y, np.zeros(x.shape[-1], f32)).reshape(x.shape)


def layer_norm(x, weight, bias, eps, run, name):
    # TransformerLens's order, its scale and the normalized stream being hook points (normalized before
    # the weight and bias, as TransformerLens 4 has it, and as folded layer norms make it in 3.x)
    x = x - x.mean(axis=-1, keepdims=True)
    scale = run.at(f"{name}.hook_scale", np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps))  # [batch, pos, 1]
    return run.at(f"{name}.hook_normalized", x / scale) * weight + bias  # [batch, pos, n_embd]


def attention(q, k, v, positions, run, name):
    # q: [batch, pos, head, head_dim]; k, v: [batch, n_kv, head, head_dim], every key of each row.
    # The query at positions[b, t] sees keys 0 .. positions[b, t].
    causal = np.arange(k.shape[1])[None, None, :] <= positions[:, :, None]  # [batch, pos, n_kv]
    scores = q.transpose(0, 2, 1, 3) @ k.transpose(0, 2, 3, 1) / math.sqrt(q.shape[-1])  # [batch, head, pos, n_kv]
    scores = run.at(f"{name}.hook_attn_scores", np.where(causal[:, None], scores, f32(-np.inf)))
    pattern = run.at(f"{name}.hook_pattern", model.softmax(scores))  # [batch, head, pos, n_kv]
    return run.at(
        f"{name}.hook_z", (pattern @ v.transpose(0, 2, 1, 3)).transpose(0, 2, 1, 3)
    )  # [batch, pos, head, head_dim]


def mha(x, w, i, n_head, run, positions, kv=None, rows=None, lengths=None):
    batch, n_pos, n_embd = x.shape
    p = f"blocks.{i}.attn"
    qkv = w.linear(x, w.part(i, "c_attn")).reshape(batch, n_pos, 3, n_head, n_embd // n_head)
    q, k, v = (run.at(f"{p}.hook_{n}", qkv[:, :, j]) for j, n in enumerate("qkv"))  # [batch, pos, head, head_dim]
    if kv is not None:  # write the real tokens' keys and values into their rows, attend over all of each row
        k_cache, v_cache = kv  # [n_rows, n_head, n_ctx, head_dim]
        for b, (row, n) in enumerate(zip(rows, lengths)):
            start = positions[b, 0]
            k_cache[row, :, start : start + n] = k[b, :n].transpose(1, 0, 2)
            v_cache[row, :, start : start + n] = v[b, :n].transpose(1, 0, 2)
        n_kv = min(int(positions.max()) + 1, k_cache.shape[2])
        k, v = (c[rows, :, :n_kv].astype(f32).transpose(0, 2, 1, 3) for c in kv)  # [batch, n_kv, head, head_dim]
    z = attention(q, k, v, positions, run, p)
    return run.at(f"blocks.{i}.hook_attn_out", w.linear(z.reshape(batch, n_pos, n_embd), w.part(i, "attn_c_proj")))


def ffn(x, w, i, run):
    p = f"blocks.{i}.mlp"
    pre = run.at(f"{p}.hook_pre", w.linear(x, w.part(i, "c_fc")))  # [batch, pos, n_inner]
    post = run.at(f"{p}.hook_post", w.gelu(pre))
    return run.at(f"blocks.{i}.hook_mlp_out", w.linear(post, w.part(i, "mlp_c_proj")))  # [batch, pos, n_embd]


def transformer_block(x, w, i, n_head, eps, run, positions, **cached):
    x = run.at(f"blocks.{i}.hook_resid_pre", x)
    a = layer_norm(x, *w.norm(i, "ln_1"), eps, run, f"blocks.{i}.ln1")
    x = run.at(f"blocks.{i}.hook_resid_mid", x + mha(a, w, i, n_head, run, positions, **cached))
    a = layer_norm(x, *w.norm(i, "ln_2"), eps, run, f"blocks.{i}.ln2")
    return run.at(f"blocks.{i}.hook_resid_post", x + ffn(a, w, i, run))  # [batch, pos, n_embd]


def gpt2(ids, lengths, w, n_head, run, eps=1e-5, past=None, cache=None, rows=None, start=0, stop=None, x=None, at=None):
    """Logits [batch, pos, n_vocab] of right-padded token ids [batch, pos] with each prompt's `lengths`,
    every activation through `run`. Blocks start .. stop-1 only: from `x` (the residual stream before
    block `start`) when start > 0, and with stop the residual stream after block stop-1 is returned
    instead of logits. at: (batch indices, positions) of the only logits wanted, [len, n_vocab].
    With a batch KV cache, row b of the batch continues cache row rows[b], past[b] tokens in."""
    params = w.params
    batch, n_pos = ids.shape
    past = np.zeros(batch, np.int64) if past is None else np.asarray(past, np.int64)
    real = np.arange(n_pos)[None, :] < np.asarray(lengths)[:, None]
    positions = np.where(real, past[:, None] + np.arange(n_pos)[None, :], 0)  # a pad sits at 0: in range
    if start == 0:
        embed = run.at("hook_embed", formats.embedding(params["wte"]["weight"], ids.ravel()).reshape(batch, n_pos, -1))
        pos_embed = run.at("hook_pos_embed", params["wpe"]["weight"][positions])  # [batch, pos, n_embd]
        x = embed + pos_embed
    stop = len(params["h"]) if stop is None else stop
    for i in range(start, stop):
        cached = {} if cache is None else dict(kv=cache[i], rows=rows, lengths=lengths)
        x = transformer_block(x, w, i, n_head, eps, run, positions, **cached)
    if stop < len(params["h"]):
        return x
    x = layer_norm(x, params["ln_f"]["weight"], params["ln_f"]["bias"], eps, run, "ln_final")
    if at is not None:
        x = x[at]  # [n, n_embd]
    return w.linear(x, w.lm_head)  # [batch, pos, n_vocab], or [n, n_vocab]


def adapted(w, n_tokens):
    """The thread count for a traced pass of n_tokens, as the engine's passes choose theirs."""
    return threads.step((id(w.params["h"]), "traced", int(n_tokens).bit_length()))


def padded(inputs, pad):
    """Ragged token id lists -> right-padded [batch, pos] int64 and the lengths."""
    lengths = np.array([len(ids) for ids in inputs], np.int64)
    ids = np.full((len(inputs), int(lengths.max())), pad, np.int64)
    for b, seq in enumerate(inputs):
        ids[b, : len(seq)] = seq
    return ids, lengths


def rows_with(run_of, w):
    """The engine's forward_rows (kernels.gpt2_rows' arguments) on the twin with the model's Weights w,
    each step's hook points through run_of(): generation and batches with hooks, KV cache and all."""

    def forward_rows(inputs, wte, wpe, h, ln_f, n_head, cache, rows, past, eps=1e-5, last=True, keep=None):
        inputs = [model.token_ids(ids, wte["weight"], wpe["weight"], p) for ids, p in zip(inputs, past)]
        ids, lengths = padded(inputs, 0)
        n_pos = ids.shape[1]
        if keep is None and last:
            at = (np.arange(len(inputs)), lengths - 1)
        else:
            real = np.nonzero(np.arange(n_pos)[None, :] < lengths[:, None])  # every real token, in order
            at = real if keep is None else (real[0][keep], real[1][keep])
        with adapted(w, lengths.sum()):
            return gpt2(ids, lengths, w, n_head, run_of(), eps, past=past, cache=cache, rows=list(rows), at=at)

    return forward_rows
