"""Heat maps as plain HTML, for a notebook's `_repr_html_`: a table of coloured cells, the figure in each
cell's tooltip. Self-contained (inline styles, no script, nothing fetched), so a notebook saved with
its outputs still shows them.

Colours: values of both signs on a diverging scale around 0 (blue below, red above), values of one
sign from white to blue; the scale's ends are the largest magnitude shown.
"""

import html

import numpy as np

CELL = "padding:2px 4px;text-align:center;min-width:1.6em;font:11px monospace;white-space:pre"
HEAD = "padding:2px 4px;font:11px monospace;white-space:pre;color:#444"


def colour(v, top, diverging):
    """An rgb() for value v on a scale reaching `top` in magnitude."""
    if not np.isfinite(v) or top == 0:
        return "rgb(255,255,255)"
    t = min(abs(float(v)) / top, 1.0)
    if diverging and v > 0:  # white -> red
        return f"rgb(255,{round(255 - 175 * t)},{round(255 - 185 * t)})"
    return f"rgb({round(255 - 200 * t)},{round(255 - 140 * t)},255)"  # white -> blue


def ink(v, top):
    return "#fff" if np.isfinite(v) and top and abs(float(v)) / top > 0.6 else "#000"


def heatmap(values, rows, cols, title="", text=None, fmt="{:.3g}"):
    """HTML of a [len(rows), len(cols)] array as coloured cells; text: what each cell shows (default
    nothing, the value in its tooltip)."""
    values = np.asarray(values, np.float64)
    finite = np.abs(values[np.isfinite(values)])
    top = float(finite.max()) if finite.size else 0.0
    diverging = bool((values[np.isfinite(values)] < 0).any() and (values[np.isfinite(values)] > 0).any())
    out = ['<div style="overflow-x:auto"><table style="border-collapse:collapse">']
    if title:
        out.append(f'<caption style="{HEAD};text-align:left">{html.escape(title)}</caption>')
    out.append("<tr><td></td>" + "".join(f'<th style="{HEAD}">{html.escape(str(c))}</th>' for c in cols) + "</tr>")
    for i, r in enumerate(rows):
        cells = []
        for j in range(len(cols)):
            v = values[i, j]
            shown = "" if text is None else html.escape(str(text[i][j]))
            tip = html.escape(f"{r}, {cols[j]}: {fmt.format(v)}" + (f" ({text[i][j]})" if text is not None else ""))
            style = f"{CELL};background:{colour(v, top, diverging)};color:{ink(v, top)}"
            cells.append(f'<td style="{style}" title="{tip}">{shown}</td>')
        out.append(f'<tr><th style="{HEAD};text-align:right">{html.escape(str(r))}</th>{"".join(cells)}</tr>')
    out.append("</table></div>")
    return "".join(out)


def token_label(text):
    """A token's text as a label: spaces and newlines made visible."""
    return text.replace(" ", "\u00b7").replace("\n", "\u21b5") or "\u2205"


class Patterns:
    """Attention patterns of one layer for one prompt, every head side by side: `.values` [head, query,
    key]; shows as heat maps in a notebook."""

    def __init__(self, values, tokens, layer):
        self.values, self.tokens, self.layer = values, tokens, layer

    def __array__(self, dtype=None, copy=None):
        return self.values if dtype is None else self.values.astype(dtype)

    def __repr__(self):
        return f"<picogpt.inside.Patterns: layer {self.layer}, {self.values.shape[0]} heads, {len(self.tokens)} tokens>"

    def _repr_html_(self):
        labels = [f"{i} {token_label(t)}" for i, t in enumerate(self.tokens)]
        maps = [
            f'<div style="margin:4px">{heatmap(v, labels, list(range(len(labels))), f"layer {self.layer}, head {h}")}</div>'
            for h, v in enumerate(self.values)
        ]
        return f'<div style="display:flex;flex-wrap:wrap">{"".join(maps)}</div>'
