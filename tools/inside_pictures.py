"""The pictures of docs/inside.md: what a notebook shows for the tiny model's patching sweep, logit
lens, attribution and attention patterns (their `_repr_html_`), screenshot by headless Chromium.

    python tools/inside_pictures.py [docs/images]

Needs Debian's `chromium` (apt-get install -y chromium); nothing is fetched.
"""

import os
import subprocess
import sys
import tempfile

import picogpt

PAGE = '<!doctype html><html><body style="margin:8px;background:#fff;font-family:sans-serif">{}</body></html>'


def shoot(html, path, size):
    with tempfile.TemporaryDirectory() as tmp:
        page = os.path.join(tmp, "page.html")
        with open(page, "w", encoding="utf-8") as f:
            f.write(PAGE.format(html))
        subprocess.run(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--hide-scrollbars",
                f"--user-data-dir={os.path.join(tmp, 'profile')}",
                f"--window-size={size[0]},{size[1]}",
                f"--screenshot={os.path.abspath(path)}",
                "file://" + page,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )
    print(path)


def main():
    out = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "..", "docs", "images")
    os.makedirs(out, exist_ok=True)
    model = picogpt.load("tiny")
    prompt = "Call len(items"
    shoot(model.patching(prompt, "Call len[items", (")", "]"))._repr_html_(), f"{out}/inside-patching.png", (520, 150))
    shoot(model.logit_lens(prompt)._repr_html_(), f"{out}/inside-lens.png", (480, 150))
    shoot(model.attribution(prompt, ")", "]")._repr_html_(), f"{out}/inside-attribution.png", (480, 150))
    shoot(model.attention_patterns(prompt, layer=2)._repr_html_(), f"{out}/inside-patterns.png", (900, 210))


if __name__ == "__main__":
    main()
