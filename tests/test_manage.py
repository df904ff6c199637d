"""Model management: `picogpt info`, `picogpt download` and --revision against a small stand-in for
the Hugging Face hub served from this process, and loading with no network."""

import errno
import hashlib
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import urllib.parse

import numpy as np
import pytest
from conftest import random_gpt2, save_checkpoint

import picogpt
from picogpt import formats
from picogpt.checkpoint import hub, manage
from picogpt.checkpoint import params as weights

PICOGPT = os.path.join(os.path.dirname(sys.executable), "picogpt")
NOWHERE = "http://127.0.0.1:9"  # nothing listens there: the hub cannot be reached
FILES = ["config.json", "model.safetensors", "vocab.json", "merges.txt"]


def run(*args, cache, endpoint=NOWHERE):
    env = {**os.environ, "HF_HUB_CACHE": cache, "HF_ENDPOINT": endpoint}
    env.pop("HF_HUB_OFFLINE", None)
    return subprocess.run([PICOGPT, *args], capture_output=True, text=True, env=env, timeout=300)


class Hub(http.server.BaseHTTPRequestHandler):
    """The hub's file endpoint, /{org}/{name}/resolve/{revision}/{file}: HEAD and GET with its headers
    and error codes. repos: {repo: {branch or tag: (commit, folder)}}; requests: the paths asked for."""

    repos, requests = {}, []

    def do_HEAD(self):
        self.answer(body=False)

    def do_GET(self):
        self.answer(body=True)

    def answer(self, body):
        parts = urllib.parse.unquote(urllib.parse.urlparse(self.path).path).strip("/").split("/")
        if len(parts) < 5 or parts[2] != "resolve":  # the reachability probe
            return self.reply(200, b"", body)
        repo, revision, filename = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
        type(self).requests.append((repo, revision, filename))
        if repo not in self.repos:
            return self.reply(404, b"", body, {"X-Error-Code": "RepoNotFound"})
        found = [(commit, folder) for ref, (commit, folder) in self.repos[repo].items() if revision in (ref, commit)]
        if not found:
            return self.reply(404, b"", body, {"X-Error-Code": "RevisionNotFound"})
        commit, folder = found[0]
        if not os.path.exists(os.path.join(folder, filename)):
            return self.reply(404, b"", body, {"X-Error-Code": "EntryNotFound"})
        with open(os.path.join(folder, filename), "rb") as f:
            data = f.read()
        self.reply(200, data, body, {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'})

    def reply(self, status, data, body, headers=()):
        self.send_response(status)
        for key, value in dict(headers).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def fake_hub(tmp_path_factory):
    """(endpoint, {ref: torch model}): org/model with branch main and tag v1 holding different weights,
    org/bert whose config is not GPT-2's."""
    root = tmp_path_factory.mktemp("hub")
    models = {"main": random_gpt2(seed=11), "v1": random_gpt2(seed=12)}
    Hub.repos = {"org/model": {}, "org/bert": {}}
    for i, (ref, hf) in enumerate(models.items()):
        Hub.repos["org/model"][ref] = (f"{i + 1:040x}", save_checkpoint(hf, str(root / ref), layout="hub"))
    bert = save_checkpoint(random_gpt2(seed=13), str(root / "bert"), layout="hub")
    with open(os.path.join(bert, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(bert, "config.json"), "w") as f:
        json.dump({**config, "model_type": "bert"}, f)
    Hub.repos["org/bert"]["main"] = ("f" * 40, bert)
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hub)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", models
    server.shutdown()


def test_download_then_load_with_no_network(fake_hub, tmp_path):
    endpoint, models = fake_hub
    cache = str(tmp_path / "cache")
    r = run("download", "org/model", cache=cache, endpoint=endpoint)
    assert r.returncode == 0 and "org/model is ready" in r.stderr, r.stderr
    # no network at all, no HF_HUB_OFFLINE: the cached model loads, with no attempt to fetch
    start = time.perf_counter()
    offline = run("generate", "Hello", "--model", "org/model", "-n", "8", "-t", "0", cache=cache)
    assert offline.returncode == 0 and "fetching" not in offline.stderr, offline.stderr
    assert time.perf_counter() - start < 60
    local = picogpt.load(Hub.repos["org/model"]["main"][1]).generate("Hello", max_new_tokens=8, temperature=0)
    assert offline.stdout == local + "\n"
    about = json.loads(run("info", "--model", "org/model", "--json", cache=cache).stdout)
    assert about["folder"].startswith(cache) and set(about["files"]) == set(FILES)
    assert about["parameters"] == models["main"].num_parameters()


def test_revision_selects_a_tag_and_a_missing_revision_is_one_line(fake_hub, tmp_path):
    endpoint, _ = fake_hub
    cache = str(tmp_path / "cache")
    assert run("download", "org/model", "--revision", "v1", cache=cache, endpoint=endpoint).returncode == 0
    tagged = run("generate", "Hello", "--model", "org/model", "--revision", "v1", "-n", "8", "-t", "0", cache=cache)
    local = picogpt.load(Hub.repos["org/model"]["v1"][1]).generate("Hello", max_new_tokens=8, temperature=0)
    assert tagged.returncode == 0 and tagged.stdout == local + "\n", tagged.stderr
    missing = run("generate", "Hello", "--model", "org/model", "--revision", "nope", cache=cache, endpoint=endpoint)
    assert missing.returncode == 1 and "Traceback" not in missing.stderr
    assert (
        missing.stderr.strip().splitlines()[-1]
        == "picogpt: error: org/model has no revision 'nope' on the hub: give a branch, tag or commit that exists"
    )
    nowhere = run("info", "--model", "org/model", "--revision", "main", cache=cache)  # main never downloaded here
    assert nowhere.returncode == 1 and "use the model tiny" in nowhere.stderr


def test_a_repo_that_is_not_gpt2_is_refused_before_its_weights_are_fetched(fake_hub, tmp_path):
    endpoint, _ = fake_hub
    Hub.requests.clear()
    r = run("download", "org/bert", cache=str(tmp_path / "cache"), endpoint=endpoint)
    assert r.returncode == 1 and "not a GPT-2 one" in r.stderr and "Traceback" not in r.stderr
    assert {f for repo, _, f in Hub.requests if repo == "org/bert"} == {"config.json"}  # its HEAD and GET
    r = run("download", "org/absent", cache=str(tmp_path / "cache"), endpoint=endpoint)
    assert r.returncode == 1 and "no such repo" in r.stderr


def test_offline_and_not_cached_fails_fast_naming_the_shipped_model(tmp_path):
    start = time.perf_counter()
    r = run("generate", "Hello", "--model", "org/never-downloaded", cache=str(tmp_path / "cache"))
    took = time.perf_counter() - start
    assert r.returncode == 1 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert "cannot be reached" in r.stderr and "use the model tiny" in r.stderr and "connect to the network" in r.stderr
    assert took < 15, f"{took:.1f} s: the hub client's retries were not skipped"


def test_download_of_a_cached_model_with_no_network_checks_the_cached_copy(fake_hub, tmp_path):
    endpoint, _ = fake_hub
    cache = str(tmp_path / "cache")
    assert run("download", "org/model", cache=cache, endpoint=endpoint).returncode == 0
    r = run("download", "org/model", cache=cache)
    assert r.returncode == 0 and "cannot be reached" in r.stderr and "ready" in r.stderr


def test_a_full_disk_during_download_is_one_line(monkeypatch, tmp_path):
    import huggingface_hub

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", full)
    monkeypatch.setattr(hub, "unreachable", lambda: None)
    with pytest.raises(weights.CheckpointError, match="disk filled up while downloading org/model .*HF_HUB_CACHE"):
        hub.resolve("org/model")


def test_revision_of_a_local_folder_is_refused(tiny, tmp_path):
    r = run("generate", "Hi", "--model", tiny[0], "--revision", "v1", cache=str(tmp_path))
    assert r.returncode == 1 and "drop --revision" in r.stderr and "Traceback" not in r.stderr


def test_info_reports_what_transformers_and_the_formats_say(tiny, tmp_path):
    folder, hf = tiny
    r = run("info", "--model", folder, cache=str(tmp_path))
    assert r.returncode == 0 and f"{hf.num_parameters():,}" in r.stdout and "model.safetensors" in r.stdout
    about = json.loads(run("info", "--model", folder, "--json", cache=str(tmp_path)).stdout)
    assert about["parameters"] == hf.num_parameters()
    assert (about["n_layer"], about["n_head"], about["n_embd"], about["n_positions"], about["vocab_size"]) == (
        2,
        2,
        32,
        64,
        50257,
    )
    assert about["files"]["model.safetensors"] == os.path.getsize(os.path.join(folder, "model.safetensors"))
    params = picogpt.load(folder).params
    for dtype in formats.DTYPES:  # the bytes each format's parameter tree really holds
        converted = formats.convert(params, dtype)
        leaves = []

        def walk(node):
            if isinstance(node, dict):
                for v in node.values():
                    walk(v)
            elif isinstance(node, list):
                for v in node:
                    walk(v)
            else:
                leaves.append(node)

        walk(converted)
        assert about["memory"][dtype] == sum(formats.nbytes(leaf) for leaf in leaves)


def test_check_counts_bfloat16_nan_and_infinity_bits():
    bits = (np.array([1.0, np.nan, -np.inf, np.inf, 3.0], np.float32).view(np.uint32) >> 16).astype(np.uint16)
    assert manage.non_finite(bits) == 3
    assert manage.non_finite(np.array([1, np.nan, 2], np.float16)) == 1
    assert manage.non_finite(np.arange(10, dtype=np.int8)) == 0
