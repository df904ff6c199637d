"""Every "real output" block in README.md and docs/*.md is run and compared with what the code prints
now, so none can go stale. A block is a fenced code block of the docs:
- `$ picogpt ...` (or `$ echo ... | picogpt ...`) on the tiny model, or on a folder an earlier command
  of the same file wrote: the lines after it, up to the next `$ `, are its output. Its standard output
  must be those lines exactly, less the `picogpt: ` notes, which must each be a line of its standard
  error once every number is masked (times and rates differ from run to run). A command marked
  `# just installed` runs with an empty Numba cache, as the first run after installing does.
- `$ curl ...`: run against `picogpt serve --model tiny` (started once, on a free port in place of
  8000); a line of `...` stands for any number of lines.
Lines compare as `close` says: numbers to 1e-4, `...` within a line for any text, and JSON without
the keys whose values change from run to run (ids, times).
- A ```python block that talks to the tiny model or the server: what it prints must equal its lines
  that start with `# ` (the output shown under each print).
Commands on other models (the hub's) are left out: the tests never download."""

import glob
import json
import os
import re
import shlex
import subprocess
import sys
import time

import httpx
import pytest
from helpers import free_port

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = [os.path.join(ROOT, "README.md")] + sorted(glob.glob(os.path.join(ROOT, "docs", "*.md")))
BIN = os.path.dirname(sys.executable)


def blocks(path):
    """(language, [lines]) of each fenced code block."""
    out, lines, language = [], None, None
    for line in open(path, encoding="utf-8").read().splitlines():
        if line.startswith("```"):
            if lines is None:
                lines, language = [], line[3:].strip()
            else:
                out.append((language, lines))
                lines = None
        elif lines is not None:
            lines.append(line)
    return out


def commands(lines):
    """[(command, [output lines])] of a shell block: `$ ` starts a command (a trailing `\\` continues it)."""
    out = []
    for line in lines:
        if line.startswith("$ "):
            out.append([line[2:], []])
        elif out and out[-1][0].endswith("\\"):
            out[-1][0] = out[-1][0][:-1] + " " + line.strip()
        elif out:
            out[-1][1].append(line)
    return [(command, output) for command, output in out]


def runs_offline(command, made):
    words = shlex.split(command, comments=True)
    if "picogpt" not in words or "serve" in words or "download" in words:
        return False
    model = (
        words[words.index("--model") + 1]
        if "--model" in words
        else words[words.index("convert") + 1]
        if "convert" in words
        else None
    )
    return model == "tiny" or model in made


NUMBER = re.compile(r"-?\d+(?:\.\d+)?(?:e-?\d+)?")


def masked(line):
    """A stderr line without its numbers, nor the compile time that a run on a cold kernel cache puts
    before the -v figures (the first run after a kernel's source changed)."""
    return NUMBER.sub("#", line.replace("kernels compiled in ", "").rstrip()).replace("# s (once); ", "")


VARIES = ("id", "created", "timings")  # JSON keys whose values differ from run to run


def close(got, want, rtol=1e-4):
    """The same line but for what differs between runs and machines: numbers in their last digits
    (float arithmetic differs between CPUs: another vector width sums in another order), `...` in a
    shown line of text (any text: a path, say), and in JSON the keys in VARIES."""
    if want.lstrip().startswith("{"):
        try:
            return same(json.loads(got), json.loads(want), rtol)
        except ValueError:
            return False
    pattern = ".*".join(re.escape(masked(part)) for part in want.split("..."))
    if not re.fullmatch(pattern, masked(got)):
        return False
    return "..." in want or all(
        abs(float(a) - float(b)) <= rtol * max(1.0, abs(float(b)))
        for a, b in zip(NUMBER.findall(got), NUMBER.findall(want))
    )


def like(got, want):
    """A masked stderr line as shown: `...` in it stands for any text (what varies by load or machine)."""
    return re.fullmatch(".*".join(map(re.escape, want.split("..."))), got) is not None


def tail(line):
    """The white space a line ends with: a user sees it (a copied line keeps it), so the docs show it too."""
    return line[len(line.rstrip()) :]


def same(got, want, rtol):
    if isinstance(want, dict):
        keys = set(want) - set(VARIES)
        return (
            isinstance(got, dict) and set(got) - set(VARIES) == keys and all(same(got[k], want[k], rtol) for k in keys)
        )
    if isinstance(want, list):
        return isinstance(got, list) and len(got) == len(want) and all(same(a, b, rtol) for a, b in zip(got, want))
    if isinstance(want, float) and isinstance(got, (int, float)):
        return abs(got - want) <= rtol * max(1.0, abs(want))
    return got == want and type(got) is type(want)


def cases():
    for path in FILES:
        for language, lines in blocks(path):
            if language in ("", "console", "sh", "bash") and any(line.startswith("$ ") for line in lines):
                yield pytest.param(path, "shell", lines, id=f"{os.path.basename(path)}:{lines[0][:50]}")
            elif (
                language == "python"
                and any(line.startswith("# ") for line in lines)
                and re.search(r'"tiny"', "\n".join(lines))
            ):
                yield pytest.param(path, "python", lines, id=f"{os.path.basename(path)}:python:{lines[0][:40]}")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One folder for all the blocks, in the order they are shown: a command may load what an earlier
    one wrote (convert, then --model); with its own cache of converted copies, empty at first."""
    folder = str(tmp_path_factory.mktemp("docs"))
    os.makedirs(os.path.join(folder, ".cache"))
    return folder


@pytest.fixture(scope="module")
def server():
    port = free_port()
    process = subprocess.Popen(
        [os.path.join(BIN, "picogpt"), "serve", "--model", "tiny", "--port", str(port)], stderr=subprocess.DEVNULL
    )
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + 180
    while time.monotonic() < end:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            time.sleep(0.2)
    yield port
    process.terminate()
    process.wait(timeout=60)


def same_json(got, want):
    """A line of curl's output: JSON, or a server-sent event of JSON, as `close` compares them."""
    prefix = "data: " if want.startswith("data: ") and got.startswith("data: ") else ""
    return close(got.removeprefix(prefix), want.removeprefix(prefix))


def check_curl(command, output, port):
    run = subprocess.run(
        command.replace("localhost:8000", f"127.0.0.1:{port}"), shell=True, capture_output=True, text=True, timeout=60
    )
    got = [line for line in run.stdout.splitlines() if line.strip()]
    want = [line for line in output if line.strip()]
    i = 0
    for k, line in enumerate(want):
        if line.strip() == "...":  # any number of lines, up to one like the next shown
            while i < len(got) and k + 1 < len(want) and not same_json(got[i], want[k + 1]):
                i += 1
            continue
        assert i < len(got) and same_json(got[i], line), (
            f"{command}\nwant: {line}\ngot:  {got[i] if i < len(got) else '(nothing)'}"
        )
        i += 1
    assert i == len(got), f"{command}: more output than shown: {got[i:]}"


@pytest.mark.parametrize("path, kind, lines", list(cases()))
def test_shown_output_is_what_the_code_prints(path, kind, lines, workdir, request, tmp_path):
    env = {
        **os.environ,
        "PATH": BIN + os.pathsep + os.environ["PATH"],
        "PICOGPT_CACHE": os.path.join(workdir, ".cache"),
    }
    if kind == "python":
        code = "\n".join(lines)
        if "127.0.0.1:8000" in code:
            code = code.replace("127.0.0.1:8000", f"127.0.0.1:{request.getfixturevalue('server')}")
        run = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, cwd=workdir, env=env, timeout=300
        )
        assert run.returncode == 0, run.stderr[-2000:]
        printed, shown = run.stdout.splitlines(), [line[2:] for line in lines if line.startswith("# ")]
        assert len(printed) == len(shown) and all(close(a, b) for a, b in zip(printed, shown)), (
            f"shown:\n{shown}\nprinted:\n{printed}"
        )
        return
    made = set(os.listdir(workdir))  # folders written by earlier commands
    for command, output in commands(lines):
        if command.startswith("curl "):
            check_curl(command, output, request.getfixturevalue("server"))
            continue
        if not runs_offline(command, made):
            continue
        here = dict(env)
        if "# just installed" in command:
            here["NUMBA_CACHE_DIR"] = str(tmp_path / "empty-numba-cache")
        run = subprocess.run(command, shell=True, capture_output=True, text=True, cwd=workdir, env=here, timeout=300)
        assert run.returncode == 0 or any("error" in line for line in output), run.stderr[-2000:]
        shown_out = [line for line in output if not line.startswith("picogpt: ")]
        while shown_out and not shown_out[-1].strip():
            shown_out.pop()
        shown_err = [masked(line) for line in output if line.startswith("picogpt: ")]
        printed = run.stdout.rstrip("\n").split("\n") if run.stdout.strip() else []
        same = len(printed) == len(shown_out) and all(
            close(a, b) and tail(a) == tail(b) for a, b in zip(printed, shown_out)
        )
        assert same, f"{command}\n--- shown:\n" + "\n".join(shown_out) + "\n--- printed:\n" + run.stdout
        err = [masked(line) for line in run.stderr.splitlines()]
        missing = [line for line in shown_err if not any(like(e, line) for e in err)]
        assert not missing, f"{command}: shown but not printed: {missing}\nprinted: {run.stderr}"
        made = set(os.listdir(workdir))
