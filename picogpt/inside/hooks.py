"""Hook points by TransformerLens's names: which activations a pass keeps, and which functions it calls.

The traced forward pass (traced.py) hands every activation it makes to `Run.at(name, x)` once, in the
order the model computes them. A `Run` keeps what its names filter asks for (`Cache`) and calls the
hook functions whose filter matches, each as `fn(activation, name)`: a function that returns an array
replaces the activation from there on (patching, ablation, steering), one that returns None leaves it
(or changed it in place), as TransformerLens's forward hooks do.

A filter is what TransformerLens's `names_filter` takes, and a little more: None (everything), a name,
a prefix ending at a dot boundary ("blocks.3" is all of block 3, "blocks.3.attn" its attention), a
list of those, or a function of the name returning True or False.
"""

import numpy as np

BLOCK = (  # per block, in the order the model computes them
    "hook_resid_pre",
    "ln1.hook_scale",
    "ln1.hook_normalized",
    "attn.hook_q",
    "attn.hook_k",
    "attn.hook_v",
    "attn.hook_attn_scores",
    "attn.hook_pattern",
    "attn.hook_z",
    "hook_attn_out",
    "hook_resid_mid",
    "ln2.hook_scale",
    "ln2.hook_normalized",
    "mlp.hook_pre",
    "mlp.hook_post",
    "hook_mlp_out",
    "hook_resid_post",
)
SHORT = {name.split(".")[-1].removeprefix("hook_"): name for name in BLOCK}  # "pattern" -> "attn.hook_pattern"
SHORT |= {"scale1": "ln1.hook_scale", "normalized1": "ln1.hook_normalized"}
SHORT |= {"scale2": "ln2.hook_scale", "normalized2": "ln2.hook_normalized"}
del SHORT["scale"], SHORT["normalized"]  # ambiguous: ln1 or ln2


def hook_names(n_layer):
    """Every hook point of an n_layer GPT-2, in the order the model computes them."""
    blocks = [f"blocks.{i}.{name}" for i in range(n_layer) for name in BLOCK]
    return ["hook_embed", "hook_pos_embed", *blocks, "ln_final.hook_scale", "ln_final.hook_normalized"]


def act_name(short, layer=None):
    """TransformerLens's `utils.get_act_name`: ("pattern", 3) -> "blocks.3.attn.hook_pattern";
    ("embed",) -> "hook_embed"; a full name stays as it is."""
    if short in ("embed", "pos_embed"):
        return f"hook_{short}"
    if short in ("scale_final", "normalized_final"):
        return f"ln_final.hook_{short.removesuffix('_final')}"
    if layer is None:
        return short
    if short not in SHORT:
        raise KeyError(f"no hook point {short!r}: one of {', '.join(SHORT)}")
    return f"blocks.{layer}.{SHORT[short]}"


def matcher(names):
    """A function name -> bool from a filter (see the module's docstring)."""
    if names is None:
        return lambda name: True
    if callable(names):
        return names
    if isinstance(names, str):
        names = [names]
    if not isinstance(names, (list, tuple, set)) or not all(isinstance(n, str) for n in names):
        raise ValueError(f"names must be None, a name, a list of names or a function of a name, got {names!r}")
    wanted = tuple(names)
    return lambda name: any(name == w or name.startswith(w + ".") for w in wanted)


class Cache(dict):
    """The activations a pass kept, by hook name: NumPy arrays, batch first. `lengths`: each prompt's
    number of tokens (the batch is right-padded to the longest: the positions past a prompt's length
    hold a pad token's activations, which never reach the prompt's own); `tokens`: the token ids, [batch,
    pos] with the pads. `cache["pattern", 3]` is `cache["blocks.3.attn.hook_pattern"]`."""

    def __init__(self, items=(), lengths=None, tokens=None):
        super().__init__(items)
        self.lengths, self.tokens = lengths, tokens

    def __getitem__(self, key):
        if isinstance(key, tuple):
            key = act_name(*key)
        try:
            return super().__getitem__(key)
        except KeyError:
            raise KeyError(f"{key!r} was not kept: pass names= to keep it (see picogpt.inside.hook_names)") from None

    @property
    def mask(self):
        """[batch, pos] bool: True where a prompt has a token, False at the pads."""
        return np.arange(self.tokens.shape[1])[None, :] < np.asarray(self.lengths)[:, None]

    @property
    def nbytes(self):
        return sum(a.nbytes for a in self.values())

    def __repr__(self):
        return f"<picogpt.inside.Cache: {len(self)} activations, {self.nbytes / 1e6:.1f} MB, lengths {self.lengths}>"


class Run:
    """One forward pass's hook points: keep (a filter) what goes into `cache`; hooks [(filter, fn)]."""

    def __init__(self, keep=(), hooks=()):
        self.keep = matcher(keep) if keep != () else (lambda name: False)
        self.hooks = [(matcher(f), fn) for f, fn in _pairs(hooks)]
        self.cache = Cache()
        self._plan = {}  # name -> (keep it?, [fn]): each name's filters are asked once

    def wants(self, name):
        """Whether anything happens at `name` (so a pass may skip making an activation no one reads)."""
        keep, fns = self._of(name)
        return keep or bool(fns)

    def _of(self, name):
        if name not in self._plan:
            self._plan[name] = (bool(self.keep(name)), [fn for match, fn in self.hooks if match(name)])
        return self._plan[name]

    def at(self, name, x):
        keep, fns = self._of(name)
        for fn in fns:
            out = fn(x, name)
            if out is not None:
                out = np.asarray(out, dtype=np.float32)
                if out.shape != x.shape:
                    raise ValueError(f"the hook on {name} returned shape {out.shape}; the activation is {x.shape}")
                x = out
        if keep:
            self.cache[name] = x
        return x


def _pairs(hooks):
    hooks = list(hooks or ())
    for h in hooks:
        if not (isinstance(h, tuple) and len(h) == 2 and callable(h[1])):
            raise ValueError(f"hooks must be a list of (name or filter, function) pairs, got {h!r}")
    return hooks
