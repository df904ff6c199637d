"""The page at / of `picogpt serve --model tiny` (docs/page.md), in a headless Chromium driven over the
DevTools protocol (tests/chromium.py), with real typing, clicks and mouse moves. Write must show the
text the server gives the same request sent from here; Read must colour every token by the bucket of
its rank computed here from the model itself (the NumPy reference's logits), and its tooltip show
the token's logprob, entropy and most likely alternatives, also from the reference. A phone's width
must not scroll sideways, and the page must reach nothing but the server. With
PICOGPT_SCREENSHOT=docs/page.png the Read view is saved there (docs/page.md shows it)."""

import json
import os
import re

import chromium
import httpx
import numpy as np
import pytest
from helpers import start, stop

import picogpt
from picogpt import model as reference

pytestmark = pytest.mark.slow

BINARY = chromium.find()
if BINARY is None:
    pytest.skip(
        "no Chromium: apt-get install chromium (or put chromium, chromium-browser or google-chrome on PATH)",
        allow_module_level=True,
    )

PROMPT = "The list of files"
TEXT = (
    "The list of files in the folder is read once, and each one is opened in turn. Returns a new"
    " dictionary with the keys of the mapping. My grandmother's zebra plays the violin on Tuesdays."
)
GLTR = {"top10": "#ADFF80", "top100": "#FFEA80", "top1000": "#FF9280", "rest": "#E5B0FF"}  # GLTR's own colours
COLOURS = {name: f"rgb({int(h[1:3], 16)}, {int(h[3:5], 16)}, {int(h[5:7], 16)})" for name, h in GLTR.items()}
TIE = 1e-4  # logits this close may order differently in the server's kernels and the reference: either rank is right


@pytest.fixture(scope="module")
def server():
    process, url = start()
    try:
        yield url
    finally:
        code, err = stop(process)
    assert code == 0 and "Traceback" not in err, err


@pytest.fixture(scope="module")
def browser(server):
    browser = chromium.Chromium(BINARY)
    try:
        browser.open(f"{server}/")
        yield browser
        thrown = [e["params"]["exceptionDetails"] for e in browser.events if e["method"] == "Runtime.exceptionThrown"]
        assert not thrown, thrown  # no script of the page failed
    finally:
        browser.close()


@pytest.fixture(scope="module")
def model():
    return picogpt.load("tiny", backend="numpy")


def bucket(rank):
    return "top10" if rank <= 10 else "top100" if rank <= 100 else "top1000" if rank <= 1000 else "rest"


def predictions(model, ids):
    """What the reference predicted for each token after the first: (lowest rank, highest rank,
    logprob, entropy in nats, {the 5 most likely token ids: logprob}). Rank 1 is the model's first
    choice: 1 + the logits strictly greater than the token's, as a range over logits within TIE."""
    logits = reference.gpt2(ids, **model.params, n_head=model.config["n_head"]).astype(np.float64)
    out = [None]
    for position in range(1, len(ids)):
        row = logits[position - 1]
        x = row[ids[position]]
        logprobs = row - row.max() - np.log(np.exp(row - row.max()).sum())
        best = np.argsort(-row)[:6]
        top = {int(t): logprobs[t] for t in best[:5] if row[t] - row[best[5]] > TIE}  # the 6th: not a near tie
        entropy = -(np.exp(logprobs) * logprobs).sum()
        out.append((1 + (row > x + TIE).sum(), (row > x - TIE).sum(), logprobs[ids[position]], entropy, top))
    return out


def read(browser, text):
    """Paste `text` into Read and press Read; the spans' [text, background colour] once the answer is shown."""
    browser.click("[aria-controls=read]")
    browser.fill("#source", text)
    browser.evaluate("document.querySelector('#read-status').textContent = ''")
    browser.click("#read-button")
    browser.until(
        "(s => s.textContent.includes(' tokens: ') || s.classList.contains('error'))(document.querySelector('#read-status'))"
    )
    return browser.evaluate(
        "[...document.querySelectorAll('#tokens .tok')].map(s => [s.textContent, getComputedStyle(s).backgroundColor])"
    )


def hover(browser, selector):
    """Move the mouse off the text, then onto the element: its tooltip shows."""
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=0, y=0)
    browser.hover(selector)
    browser.until(f"document.querySelector({json.dumps(selector)}).classList.contains('on')", 10)
    return browser.evaluate("document.querySelector('#tip').innerText")


def test_write_streams_what_the_server_gives_the_same_request(browser, server):
    settings = {"max_tokens": 24, "temperature": 0.8, "top_p": 0.95, "top_k": 40, "seed": 3}
    want = httpx.post(f"{server}/v1/completions", json={"prompt": PROMPT, **settings}, timeout=60).json()
    browser.click("[aria-controls=write]")
    browser.fill("#text", PROMPT)
    for name, value in settings.items():
        browser.fill(f"#{name}", str(value))
    browser.click("#generate")
    browser.until(f"document.querySelector('#text').value.length > {len(PROMPT)}", 30)  # the first piece
    browser.until("document.querySelector('#write-status').textContent.includes('new tokens')", 30)
    assert browser.evaluate("document.querySelector('#text').value") == PROMPT + want["choices"][0]["text"]
    status = browser.evaluate("document.querySelector('#write-status').textContent")
    assert status.startswith(f"{want['usage']['completion_tokens']} new tokens")


def test_read_colours_each_token_by_its_rank(browser, model):
    ids = model.tokenizer.encode(TEXT)
    spans = read(browser, TEXT)
    assert len(spans) == len(ids) and "".join(text for text, _ in spans) == TEXT
    assert [text for text, _ in spans] == [model.tokenizer.decode([t]) for t in ids]
    assert spans[0][1] == "rgba(0, 0, 0, 0)"  # the first token: nothing predicts it, so no colour
    for (text, colour), (lowest, highest, *_) in zip(spans[1:], predictions(model, ids)[1:]):
        assert colour in {COLOURS[bucket(lowest)], COLOURS[bucket(highest)]}, (text, colour, lowest, highest)


def test_the_tooltip_shows_the_tokens_logprob_entropy_and_alternatives(browser, model):
    ids = model.tokenizer.encode(TEXT)
    read(browser, TEXT)
    oracle = predictions(model, ids)
    position = next(i for i in range(1, len(ids)) if oracle[i][0] > 3)  # not the model's first choice
    lowest, highest, logprob, entropy, top = oracle[position]
    tip = hover(browser, f"#tokens .tok:nth-child({position + 1})")
    quoted = lambda token: json.dumps(model.tokenizer.decode([token]), ensure_ascii=False)  # noqa: E731
    assert tip.splitlines()[0] == quoted(ids[position]), tip
    shown = re.search(r"rank (\d+) · logprob (-?[\d.]+) \(.*\) · entropy ([\d.]+) nats", tip)
    assert shown, tip
    assert lowest <= int(shown[1]) <= highest, (tip, lowest, highest)
    assert abs(float(shown[2]) - logprob) < 0.006 and abs(float(shown[3]) - entropy) < 0.006, (tip, logprob, entropy)
    assert len(top) >= 4 and all(quoted(t) in tip for t in top), (tip, [quoted(t) for t in top])


def test_errors_are_the_servers_one_line(browser, server):
    long = "word " * 300  # more tokens than the tiny model's context of 256
    assert read(browser, long) == []
    want = httpx.post(
        f"{server}/v1/completions", json={"prompt": long, "max_tokens": 0, "echo": True, "logprobs": 5}, timeout=60
    ).json()["error"]
    assert want["code"] == "context_length_exceeded"
    assert browser.evaluate("document.querySelector('#read-status').textContent") == want["message"]
    browser.click("[aria-controls=write]")
    browser.fill("#temperature", "5")
    browser.evaluate("document.querySelector('#write-status').textContent = ''")
    browser.click("#generate")
    shown = browser.until("document.querySelector('#write-status.error')?.textContent", 30)
    want = httpx.post(f"{server}/v1/completions", json={"prompt": "x", "temperature": 5}, timeout=60).json()["error"]
    assert shown == want["message"] and "temperature" in shown


def test_a_phone_does_not_scroll_sideways_and_nothing_else_is_reached(browser, server):
    spans = read(browser, TEXT)
    keys = [text for text, _ in spans].index(" keys")  # a red one, in the picture
    screenshot = os.environ.get("PICOGPT_SCREENSHOT")
    if screenshot:
        browser.send("Emulation.setDeviceMetricsOverride", width=900, height=640, deviceScaleFactor=1, mobile=False)
        hover(browser, f"#tokens .tok:nth-child({keys + 1})")
        browser.screenshot(screenshot)
    browser.send("Input.dispatchMouseEvent", type="mouseMoved", x=0, y=0)  # off the text: a phone has no mouse
    fits = "document.scrollingElement.scrollWidth <= window.innerWidth"
    try:
        browser.send("Emulation.setDeviceMetricsOverride", width=390, height=844, deviceScaleFactor=3, mobile=True)
        browser.send("Emulation.setTouchEmulationEnabled", enabled=True, maxTouchPoints=1)
        assert browser.evaluate("window.innerWidth") == 390
        assert browser.evaluate(fits), browser.evaluate("document.scrollingElement.scrollWidth")
        # a tap (a phone has no hover) on a token shows its tooltip, within the width; a tap elsewhere hides it
        for position in (keys, len(spans) - 1):
            browser.tap(f"#tokens .tok:nth-child({position + 1})")
            browser.until(f"document.querySelector('#tokens .tok:nth-child({position + 1})').classList.contains('on')")
            assert browser.evaluate("document.querySelector('#tip').getBoundingClientRect().right <= 390")
            assert browser.evaluate(fits)
            browser.tap(".legend")
            browser.until("document.querySelector('#tip').hidden", 10)
        browser.tap("[aria-controls=write]")
        browser.until("!document.querySelector('#write').hidden", 10)
        assert browser.evaluate(fits)
    finally:
        browser.send("Emulation.setTouchEmulationEnabled", enabled=False)
        browser.send("Emulation.clearDeviceMetricsOverride")
    reached = browser.evaluate("[location.href, ...performance.getEntriesByType('resource').map(e => e.name)]")
    assert len(reached) >= 4 and all(url.startswith(f"{server}/") for url in reached), reached
