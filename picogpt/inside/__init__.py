"""Inside the model: every activation by TransformerLens's hook names, hooks that patch, ablate and
steer, the analyses interpretability runs every day, and pictures of them, with NumPy alone.

    logits, cache = model.run_with_cache("The cat sat on the mat")
    cache["blocks.0.attn.hook_pattern"]          # [batch, head, query, key], as TransformerLens's
    logits = model.run_with_hooks(prompt, hooks=[("blocks.3.attn.hook_z", zero_head(7))])
    model.generate(prompt, steer=Steer(vector, layer=6, scale=4.0))

The forward pass with hook points is traced.py (model.py's twin); what a pass keeps and calls is
hooks.py; logit lens, attribution and patching sweeps are analyses.py; heat maps are pictures.py.
docs/inside.md walks through them.
"""

import functools
from typing import NamedTuple

import numpy as np

from . import analyses, traced
from .hooks import Cache, Run, act_name, hook_names, matcher


class Steer(NamedTuple):
    """Add scale * vector ([n_embd]) to the residual stream before block `layer` (its hook_resid_pre),
    at every position, prompt and new tokens alike: ActAdd's and llama.cpp's control vectors' idea."""

    vector: np.ndarray
    layer: int
    scale: float = 1.0

    def hook(self):
        added = np.asarray(self.vector, np.float32) * np.float32(self.scale)
        return (f"blocks.{self.layer}.hook_resid_pre", lambda x, name: x + added)

    def checked(self, config):
        v = np.asarray(self.vector)
        if v.shape != (config["n_embd"],) or v.dtype.kind not in "fiu" or not np.isfinite(v).all():
            raise ValueError(
                f"the steering vector must be {config['n_embd']} finite numbers (n_embd), got shape {v.shape}"
            )
        if not (isinstance(self.layer, (int, np.integer)) and 0 <= self.layer < config["n_layer"]):
            raise ValueError(f"the steering layer must be a block index 0..{config['n_layer'] - 1}, got {self.layer!r}")
        if not (isinstance(self.scale, (int, float, np.floating)) and np.isfinite(self.scale)):
            raise ValueError(f"the steering scale must be a finite number, got {self.scale!r}")
        return self


def zero_ablate(head=None):
    """A hook that zeroes an activation, or one head of a [batch, pos, head, ...] one (hook_z, hook_q, ...)."""

    def hook(x, name):
        x = x.copy()
        if head is None:
            x[...] = 0
        else:
            x[:, :, head] = 0
        return x

    return hook


def patch_with(source, positions=None, head=None):
    """A hook that replaces an activation with `source`'s (an array of its shape, for instance another
    run's cache entry), at the given positions and head only if asked."""
    source = np.asarray(source, np.float32)

    def hook(x, name):
        x = x.copy()
        where = (slice(None), slice(None) if positions is None else positions)
        if head is not None:
            where = (*where, head)
        x[where] = source[where]
        return x

    return hook


class Inside:
    """The Model's methods for looking inside (api.Model inherits them)."""

    def tokens_of(self, prompts, bos=False):
        """Prompts as right-padded token ids [batch, pos] and each one's length: a string, a list of
        strings, a list of token ids, or a list of such lists (or a 2-D array). bos: start each with
        <|endoftext|>, as TransformerLens's to_tokens does by default."""
        from .. import model
        from .. import tokenizer as tok

        if isinstance(prompts, str) or (
            isinstance(prompts, (list, tuple, np.ndarray))
            and len(prompts)
            and isinstance(prompts[0], (int, np.integer))
        ):
            prompts = [prompts]
        if isinstance(prompts, np.ndarray):
            prompts = list(prompts)
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise ValueError(f"prompts must be a string, token ids, or a non-empty list of them, got {prompts!r}")
        eot, wte, wpe = self.tokenizer.eot_token, self.params["wte"]["weight"], self.params["wpe"]["weight"]
        ids = []
        for p in prompts:
            seq = tok.encode(self.tokenizer, p) if isinstance(p, str) else list(np.asarray(p).ravel())
            seq = [eot] * bool(bos) + seq
            if not seq:
                raise ValueError("a prompt has no tokens: give it some text, or bos=True")
            ids.append(model.token_ids(seq, wte, wpe))
        return traced.padded(ids, eot)

    def _fast(self):  # on the kernels (the numba backend), not model.py
        return getattr(self.forward_rows, "__module__", "").startswith("picogpt.kernels")

    def _weights(self):
        w = getattr(self, "_traced", None)
        if w is None or w.params is not self.params:
            w = self._traced = traced.Weights(self.params, self._fast())
        return w

    def rows_with(self, hooks=(), steer=None):
        """The engine's forward_rows with hook functions and a Steer (the model's own without either):
        steering alone stays on the kernels, which add the vector between blocks; hooks run the traced
        twin, KV cache and all."""
        from ..engine import rows_one_by_one

        plain = self.forward_rows or rows_one_by_one(self.forward)
        Run((), hooks)  # the pairs checked now, not at the first step
        hooks = list(hooks or ())
        if steer is not None:
            steer = (steer if isinstance(steer, Steer) else Steer(*steer)).checked(self.config)
        if not hooks and steer is None:
            return plain
        if not hooks and self._fast():
            added = {int(steer.layer): np.asarray(steer.vector, np.float32) * np.float32(steer.scale)}
            return functools.partial(plain, steer=added)
        hooks = hooks + ([steer.hook()] if steer is not None else [])
        return traced.rows_with(lambda: Run((), hooks), self._weights())

    def _traced_pass(self, prompts, run, bos=False, stop_at_layer=None, **kwargs):
        ids, lengths = self.tokens_of(prompts, bos)
        n_layer = self.config["n_layer"]
        stop = None
        if stop_at_layer is not None:
            if not isinstance(stop_at_layer, (int, np.integer)) or not -n_layer <= stop_at_layer <= n_layer:
                raise ValueError(
                    f"stop_at_layer must be a whole number in -{n_layer}..{n_layer}, got {stop_at_layer!r}"
                )
            stop = stop_at_layer % n_layer if stop_at_layer < 0 else stop_at_layer
            stop = None if stop == n_layer else stop
        w = self._weights()
        with traced.adapted(w, lengths.sum()):
            out = traced.gpt2(
                ids,
                lengths,
                w,
                self.config["n_head"],
                run,
                self.config.get("layer_norm_epsilon", 1e-5),
                stop=stop,
                **kwargs,
            )
        run.cache.lengths, run.cache.tokens = lengths, ids
        return out

    def run_with_cache(self, prompts, names=None, stop_at_layer=None, hooks=(), bos=False):
        """(logits [batch, pos, n_vocab], Cache) for one prompt or many (see tokens_of): the cache holds
        each activation whose name `names` matches (None: every hook point; a name, a prefix such as
        "blocks.3" or "blocks.3.attn", a list of them, or a function of the name), batch first, with
        TransformerLens's names and shapes. stop_at_layer=n: run blocks 0..n-1 only and return the
        residual stream after them instead of logits. hooks: as run_with_hooks', applied before caching.
        Prompts are right-padded to the longest (Cache.lengths, Cache.mask)."""
        run = Run(names, hooks)
        return self._traced_pass(prompts, run, bos, stop_at_layer), run.cache

    def run_with_hooks(self, prompts, hooks=(), stop_at_layer=None, bos=False):
        """Logits [batch, pos, n_vocab] with hook functions at hook points: hooks is a list of (name or
        filter, fn), fn(activation, name) returning a replacement (or None to leave it), as
        TransformerLens's forward hooks."""
        return self._traced_pass(prompts, Run((), hooks), bos, stop_at_layer)

    def logit_lens(self, prompt, top_k=5, bos=False):
        """The residual stream after each layer through ln_final and the unembedding, for one prompt:
        a LogitLens (top predictions and the next token's probability and rank at every layer and
        position; a table in a notebook)."""
        return analyses.logit_lens(self, prompt, top_k, bos)

    def attribution(self, prompt, good, bad, position=-1, bos=False):
        """Direct logit attribution of logit(good) - logit(bad) at `position` (tokens as text of one
        token or ids): an Attribution with each head's, MLP's and embedding's share."""
        return analyses.attribution(self, prompt, good, bad, position, bos)

    def patching(self, target, source, metric, what="resid_pre", bos=False):
        """Activation patching: run `target` with one activation at a time taken from the run of
        `source` (same number of tokens), `what` one of resid_pre, resid_mid, resid_post, attn_out,
        mlp_out (over layers x positions) or heads (each head's hook_z at every position: layers x
        heads). metric: a function of the last position's logits [rows, n_vocab] -> [rows], or a pair
        of tokens (good, bad) for their logit difference. A Sweep (its .values, a heat map)."""
        return analyses.patching(self, target, source, metric, what, bos)

    def direction(self, plus, minus, layer, bos=False):
        """A steering vector for Steer: the mean residual stream before block `layer` over `plus`
        less that over `minus`."""
        return analyses.direction(self, plus, minus, layer, bos)

    def attention_patterns(self, prompt, layer, bos=False):
        """Every head's attention pattern at `layer` for one prompt ([head, query, key]; heat maps in a notebook)."""
        return analyses.patterns(self, prompt, layer, bos)

    def hook_names(self):
        """Every hook point's name, in the order the model computes them."""
        return hook_names(self.config["n_layer"])


__all__ = [
    "Cache",
    "Inside",
    "Run",
    "Steer",
    "act_name",
    "hook_names",
    "matcher",
    "patch_with",
    "traced",
    "zero_ablate",
]
