"""A headless Chromium driven over the DevTools protocol through a pipe, for tests/test_page.py. With
--remote-debugging-pipe Chromium reads commands on its file descriptor 3 and writes replies and
events on 4, each a JSON message ended by a NUL byte: two os.pipe()s and json stand in for a
websocket client, so the tests need no new dependency. Every wait here is bounded in time."""

import base64
import json
import os
import select
import shutil
import signal
import subprocess
import tempfile
import time

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
FLAGS = [
    "--headless=new",
    "--no-sandbox",  # CI runs as root, where Chromium's sandbox refuses to start
    "--disable-gpu",
    "--remote-debugging-pipe",
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-background-networking",  # no updates, no safe browsing lists: nothing leaves the machine
    "--disable-component-update",
    "--disable-sync",
    "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",  # and no name resolves but the test's server
]


def find():
    """The path of the first Chromium (or Chrome) on PATH, or None."""
    return next(filter(None, map(shutil.which, NAMES)), None)


class Chromium:
    """One headless Chromium with one tab: send(method, **params) runs a DevTools command in the tab
    and returns its result. close() always ends the browser, killing it if it does not quit."""

    def __init__(self, binary, width=1000, height=800, timeout=30):
        self.profile = tempfile.mkdtemp(prefix="picogpt-chromium-")
        commands, self.commands = os.pipe()  # we write commands, Chromium reads them on its fd 3
        self.replies, replies = os.pipe()  # Chromium writes on its fd 4, we read
        # subprocess puts the two ends on the child's fds 0 and 1 (whatever their numbers here), and sh
        # moves them to 3 and 4, giving Chromium /dev/null and stderr in their place, before it execs
        # Chromium: no fd of this process can be in the way, and no Python runs in the forked child.
        self.log = open(os.path.join(self.profile, "stderr.txt"), "w+")
        move = 'exec "$@" 3<&0 4>&1 0</dev/null 1>&2'
        self.process = subprocess.Popen(
            [
                "sh",
                "-c",
                move,
                "sh",
                binary,
                *FLAGS,
                f"--user-data-dir={self.profile}",
                f"--window-size={width},{height}",
            ],
            stdin=commands,
            stdout=replies,
            stderr=self.log,
            start_new_session=True,  # its own process group: close() ends its helpers too
        )
        os.close(commands)
        os.close(replies)
        self.pending, self.last_id, self.session, self.events = b"", 0, None, []
        try:
            target = self.send("Target.createTarget", url="about:blank", timeout=timeout)["targetId"]
            self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        except BaseException:
            self.close()
            raise

    def send(self, method, timeout=30, **params):
        """Run one command (in the tab, once attached) and return its result; RuntimeError for its error."""
        self.last_id += 1
        message = {"id": self.last_id, "method": method, "params": params}
        if self.session:
            message["sessionId"] = self.session
        data = json.dumps(message).encode() + b"\0"
        while data:
            data = data[os.write(self.commands, data) :]
        end = time.monotonic() + timeout
        while True:
            reply = self.receive(end, method)
            if "method" in reply:  # an event: kept, for whoever asks (Runtime.exceptionThrown, ...)
                self.events.append(reply)
            elif reply.get("id") == self.last_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply["result"]

    def receive(self, end, method):
        """The next message from Chromium, before the monotonic time `end`."""
        while b"\0" not in self.pending:
            left = end - time.monotonic()
            if left <= 0 or not select.select([self.replies], [], [], left)[0]:
                raise TimeoutError(f"Chromium did not answer {method} in time")
            data = os.read(self.replies, 1 << 20)
            if not data:
                self.log.seek(0)
                raise RuntimeError(f"Chromium exited during {method}: {self.log.read()[-2000:]}")
            self.pending += data
        message, self.pending = self.pending.split(b"\0", 1)
        return json.loads(message)

    def evaluate(self, expression):
        """The value of a JavaScript expression in the tab (a promise is awaited); RuntimeError if it throws."""
        out = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in out:
            details = out["exceptionDetails"]
            raise RuntimeError(f"{expression}: {details.get('exception', {}).get('description', details['text'])}")
        return out["result"].get("value")

    def until(self, expression, timeout=30):
        """Wait until a JavaScript expression is truthy, and return its value; TimeoutError after `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            value = self.evaluate(expression)
            if value:
                return value
            if time.monotonic() > end:
                raise TimeoutError(f"still false after {timeout} s: {expression}")
            time.sleep(0.05)

    def open(self, url, timeout=30):
        self.send("Runtime.enable")  # from here on its events tell each uncaught exception of the page's scripts
        self.send("Page.navigate", url=url)
        self.until(f"location.href === {json.dumps(url)} && document.readyState === 'complete'", timeout)

    def center(self, selector):
        """The middle of the element, in CSS pixels: of its widest box if it wraps (a token's space
        can end one line while its word starts the next)."""
        box = self.evaluate(
            f"(() => {{ const b = [...document.querySelector({json.dumps(selector)}).getClientRects()]"
            ".reduce((a, b) => (b.width > a.width ? b : a));"
            " return [b.left + b.width / 2, b.top + b.height / 2]; })()"
        )
        return box[0], box[1]

    def click(self, selector):
        """A real mouse click (press and release of the left button) in the middle of the element."""
        x, y = self.center(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left", clickCount=1)

    def tap(self, selector):
        """A finger's tap in the middle of the element (Emulation.setTouchEmulationEnabled first)."""
        x, y = self.center(selector)
        self.send("Input.dispatchTouchEvent", type="touchStart", touchPoints=[{"x": x, "y": y}])
        self.send("Input.dispatchTouchEvent", type="touchEnd", touchPoints=[])

    def hover(self, selector):
        x, y = self.center(selector)
        self.send("Input.dispatchMouseEvent", type="mouseMoved", x=x, y=y)

    def fill(self, selector, text):
        """Empty a text box, focus it and type `text` into it (Input.insertText: as a keyboard's IME does)."""
        self.evaluate(f"(e => {{ e.value = ''; e.focus(); }})(document.querySelector({json.dumps(selector)}))")
        self.send("Input.insertText", text=text)

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(self.send("Page.captureScreenshot", format="png")["data"]))

    def close(self):
        """Ask Chromium to quit; kill its process group if it has not within 10 s."""
        try:
            if self.process.poll() is None:
                self.session = None
                self.send("Browser.close", timeout=5)
                self.process.wait(timeout=10)
        except Exception:  # noqa: BLE001 - whatever went wrong, it is killed below
            pass
        finally:
            if self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)
            for fd in (self.commands, self.replies):
                os.close(fd)
            self.log.close()
            shutil.rmtree(self.profile, ignore_errors=True)
