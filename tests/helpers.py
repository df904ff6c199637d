"""Helpers the end-to-end tests share: the `picogpt` command and its one-line errors, a `picogpt serve
--model tiny` process on 127.0.0.1 and a free port, its /metrics, and OpenAI's error body."""

import os
import signal
import subprocess
import sys
import time

import httpx
from ports import free_port  # tools/ports.py: conftest puts tools/ on the path

PICOGPT = os.path.join(os.path.dirname(sys.executable), "picogpt")


def run(*args, env=None):
    return subprocess.run([PICOGPT, *args], capture_output=True, text=True, env=env, timeout=300)


def assert_one_line_error(result, *words):
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("picogpt: error: "), result.stderr
    for word in words:
        assert word in lines[0]


def start(*options, deadline=180):
    """A `picogpt serve --model tiny` process and its base URL, once /health says 200."""
    port = free_port()
    process = subprocess.Popen(
        [PICOGPT, "serve", "--model", "tiny", "--port", str(port), *options], stderr=subprocess.PIPE, text=True
    )
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + deadline
    while time.monotonic() < end:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited: {process.stderr.read()}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    process.kill()
    raise RuntimeError("the server did not get ready in time")


def stop(process, sig=signal.SIGINT):
    """Stop it as a user would; return its exit code and what it logged."""
    process.send_signal(sig)
    try:
        _, err = process.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()
        raise
    return process.returncode, err


def metric(url, name):
    for line in httpx.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.split()[-1])
    raise KeyError(name)


def expect_error(response, status, param=None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "\n" not in error["message"]
    if param:
        assert error["param"] == param, error
    return error
