// picogpt's page. Write: stream a completion onto the text, as `"stream": true` sends it (server-sent
// events). Read: score a text (echo, max_tokens 0, logprobs 5) and colour each token by its rank among
// the model's predictions, as GLTR does (Gehrmann et al. 2019). Nothing but this server is reached.
"use strict";

const $ = (id) => document.getElementById(id);
const JSON_HEADERS = { "Content-Type": "application/json" };

for (const tab of document.querySelectorAll("[role=tab]")) {
  tab.onclick = () => {
    for (const other of document.querySelectorAll("[role=tab]")) {
      other.setAttribute("aria-selected", other === tab);
      $(other.getAttribute("aria-controls")).hidden = other !== tab;
    }
    hideTip();
  };
}

// The model's name and context, once it is loaded (503 until then: the header just stays empty).
fetch("v1/models")
  .then((r) => r.json())
  .then((m) => ($("model").textContent = `${m.data[0].id}, a context of ${m.data[0].max_model_len} tokens`))
  .catch(() => {});

function say(status, message, error = false) {
  status.textContent = message;
  status.classList.toggle("error", error);
}

// The one line a failed request answers: OpenAI's {"error": {"message": ...}}, else the HTTP status.
async function failure(response) {
  try {
    return (await response.json()).error.message;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

// ---- Write -------------------------------------------------------------------------------------------

let stopping = null; // the AbortController of the running generation

// The JSON of each `data: ` line of a server-sent event stream, until `data: [DONE]`. A read may end
// in the middle of a line (or of a character: TextDecoderStream keeps those), so the unfinished line
// waits for the next read.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let pending = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    const lines = (pending + value).split(/\r?\n/);
    pending = lines.pop();
    for (const line of lines) {
      if (!line.startsWith("data: ")) continue; // blank lines end events; nothing else is sent
      if (line === "data: [DONE]") return;
      yield JSON.parse(line.slice(6));
    }
  }
}

async function generate() {
  const text = $("text"), status = $("write-status");
  const body = { prompt: text.value, stream: true, stream_options: { include_usage: true } };
  for (const name of ["max_tokens", "temperature", "top_p", "top_k", "seed"]) {
    const value = $(name).value.trim(); // empty: the server's default (no top k, a random seed)
    if (value !== "") body[name] = Number(value);
  }
  stopping = new AbortController();
  $("generate").disabled = true;
  $("stop").disabled = false;
  say(status, "writing…");
  try {
    const response = await fetch("v1/completions", {
      method: "POST", headers: JSON_HEADERS, body: JSON.stringify(body), signal: stopping.signal,
    });
    if (!response.ok) return say(status, await failure(response), true);
    let finish = null, tokens = 0;
    for await (const chunk of events(response)) {
      if (chunk.error) return say(status, chunk.error.message, true);
      if (chunk.usage) tokens = chunk.usage.completion_tokens;
      for (const choice of chunk.choices) {
        text.value += choice.text;
        text.scrollTop = text.scrollHeight; // follow the end, as a terminal does
        finish = choice.finish_reason || finish;
      }
    }
    say(status, `${tokens} new tokens: ${finish === "stop" ? "the text ended" : "max tokens reached"}`);
  } catch (e) {
    say(status, e.name === "AbortError" ? "stopped" : `failed: ${e.message}`, e.name !== "AbortError");
  } finally {
    $("generate").disabled = false;
    $("stop").disabled = true;
    stopping = null;
  }
}

$("generate").onclick = generate;
$("stop").onclick = () => stopping && stopping.abort(); // the server cancels the request when we leave
$("text").onkeydown = (e) => {
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !$("generate").disabled) generate();
};

// ---- Read --------------------------------------------------------------------------------------------

const BUCKETS = [[10, "top10"], [100, "top100"], [1000, "top1000"], [Infinity, "rest"]];
const bucket = (rank) => BUCKETS.find(([most]) => rank <= most)[1];
let scored = null; // the logprobs object of the text shown

async function read() {
  const status = $("read-status"), text = $("source").value;
  $("tokens").replaceChildren();
  hideTip();
  if (!text) return say(status, "paste a text first", true);
  $("read-button").disabled = true;
  say(status, "reading…");
  try {
    const response = await fetch("v1/completions", {
      method: "POST", headers: JSON_HEADERS,
      body: JSON.stringify({ prompt: text, max_tokens: 0, echo: true, logprobs: 5 }),
    });
    if (!response.ok) return say(status, await failure(response), true); // too long: context_length_exceeded
    const choice = (await response.json()).choices[0];
    show(choice.text, choice.logprobs);
  } catch (e) {
    say(status, `failed: ${e.message}`, true);
  } finally {
    $("read-button").disabled = false;
  }
}

// One span per token, its text cut from the echoed text at text_offset. The offsets count characters
// (code points, as Python does), so the text is split into code points first, not UTF-16 units. A token
// that is only part of a character (its bytes end mid-character) gets an empty span.
function show(text, lp) {
  const chars = Array.from(text), n = lp.tokens.length, counts = {};
  scored = lp;
  const spans = lp.tokens.map((_, i) => {
    const span = document.createElement("span");
    span.className = "tok";
    span.dataset.i = i;
    span.textContent = chars.slice(lp.text_offset[i], i + 1 < n ? lp.text_offset[i + 1] : chars.length).join("");
    const rank = (lp.token_ranks || [])[i];
    if (rank != null) { // null: the first token, which nothing before it predicts
      span.classList.add(bucket(rank));
      counts[bucket(rank)] = (counts[bucket(rank)] || 0) + 1;
    }
    return span;
  });
  $("tokens").replaceChildren(...spans);
  const c = (name) => counts[name] || 0;
  say($("read-status"), `${n} tokens: ${c("top10")} in the top 10, ${c("top100")} in 11 to 100, ` +
    `${c("top1000")} in 101 to 1000, ${c("rest")} beyond (the first has no prediction)`);
}

// ---- the tooltip: a token's rank, logprob, entropy and the model's most likely tokens there ------------

const percent = (logprob) => {
  const p = Math.exp(logprob);
  return p < 0.001 ? "<0.1%" : `${(100 * p).toFixed(1)}%`;
};

function element(tag, text, className) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (className) e.className = className;
  return e;
}

function showTip(span) {
  const tip = $("tip"), i = Number(span.dataset.i), lp = scored;
  const token = lp.tokens[i], logprob = lp.token_logprobs[i];
  const rank = (lp.token_ranks || [])[i], entropy = (lp.token_entropies || [])[i];
  const parts = [element("b", JSON.stringify(token), rank == null ? "" : bucket(rank))]; // quoted: spaces and newlines show
  if (logprob == null) {
    parts.push(element("div", "the first token: nothing before it to predict it from"));
  } else {
    parts.push(element("div", `rank ${rank ?? "?"} · logprob ${logprob.toFixed(2)} (${percent(logprob)})` +
      ` · entropy ${entropy == null ? "?" : entropy.toFixed(2)} nats`));
    parts.push(element("div", "most likely here:"));
    const table = element("table");
    const best = Object.entries(lp.top_logprobs[i]).sort((a, b) => b[1] - a[1]).slice(0, 5); // the token itself is 6th when not among them
    for (const [name, value] of best) {
      const row = element("tr", undefined, name === token ? "self" : "");
      row.append(element("td", JSON.stringify(name)), element("td", value.toFixed(2)), element("td", percent(value)));
      table.append(row);
    }
    parts.push(table);
  }
  tip.replaceChildren(...parts);
  tip.style.left = "0px"; // measured at the left edge, where it has the whole width to take
  tip.hidden = false;
  document.querySelectorAll(".tok.on").forEach((s) => s.classList.remove("on"));
  span.classList.add("on");
  // below the token (its last line, if it wraps), or above it near the window's bottom, and never past
  // the window's right edge
  const lines = span.getClientRects(), box = lines[lines.length - 1] || span.getBoundingClientRect();
  const width = document.documentElement.clientWidth;
  const left = Math.max(4, Math.min(box.left, width - tip.offsetWidth - 4));
  const below = box.bottom + 4 + tip.offsetHeight < window.innerHeight;
  tip.style.left = `${left + window.scrollX}px`;
  tip.style.top = `${(below ? box.bottom + 4 : box.top - 4 - tip.offsetHeight) + window.scrollY}px`;
}

function hideTip() {
  $("tip").hidden = true;
  document.querySelectorAll(".tok.on").forEach((s) => s.classList.remove("on"));
}

// Pointer events, not mouse events: a phone sends mouse events after a touch too, and its mouseleave
// would hide the tooltip the touch just showed. A mouse hovers; a touch (or a click) shows the token
// under it, and anywhere else (the tooltip too: it may cover the next token) hides the tooltip.
const tokenAt = (e) => e.target.closest && e.target.closest(".tok");
const mouse = (e) => e.pointerType === "mouse";
$("tokens").addEventListener("pointerover", (e) => mouse(e) && tokenAt(e) && showTip(tokenAt(e)));
$("tokens").addEventListener("pointerleave", (e) => mouse(e) && hideTip());
document.addEventListener("pointerdown", (e) => (tokenAt(e) ? showTip(tokenAt(e)) : hideTip()));
$("read-button").onclick = read;
