"""A headless Chromium driven over the DevTools protocol, for the tests of pages segplan writes.

The protocol runs over a pipe (``--remote-debugging-pipe``: commands on the browser's file
descriptor 3, answers and events on 4, each message JSON ended by a NUL byte), so no websocket
package and no port are needed. The browser is the system's (Debian's ``chromium``): nothing is
downloaded. Where it is missing the test skips, and fails under CI, which installs it (.ci/run).
"""
from __future__ import annotations

import base64
import contextlib
import fcntl
import io
import json
import os
import select
import shlex
import shutil
import subprocess
import time
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import pytest

NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")


def chromium() -> str:
    """The browser's executable; skips (fails under CI) where none is installed."""
    for name in NAMES:
        path = shutil.which(name)
        if path:
            return path
    if os.environ.get("CI"):
        pytest.fail("no Chromium found (looked for " + ", ".join(NAMES) + "): CI must install it (.ci/run)")
    pytest.skip("no Chromium installed (as root on Debian: apt-get install -y chromium)")


def _high(fd: int) -> int:
    """The same pipe end at a descriptor >= 10, so placing it at 3 or 4 in the child clobbers nothing."""
    new = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
    os.close(fd)
    return new


@contextlib.contextmanager
def page(profile: Path, width: int = 1300, height: int = 1400,
         timeout: float = 60.0) -> Iterator[tuple[Callable[..., dict], list[dict]]]:
    """Start a headless browser with one page of ``width`` x ``height`` CSS pixels; yield
    ``send(method, **params) -> result`` for that page and the list of events received so far."""
    cmd_r, cmd_w = (_high(fd) for fd in os.pipe())
    out_r, out_w = (_high(fd) for fd in os.pipe())
    args = [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
            "--no-default-browser-check", "--disable-extensions", "--mute-audio", "--hide-scrollbars",
            f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"]
    shell = f"exec {shlex.join(args)} 3<&{cmd_r} 4>&{out_w} {cmd_r}<&- {out_w}>&-"
    proc = subprocess.Popen(["bash", "-c", shell], pass_fds=(cmd_r, out_w), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    os.close(cmd_r)
    os.close(out_w)
    events: list[dict] = []
    buffer = bytearray()
    ids = iter(range(1, 1 << 30))

    def receive(deadline: float) -> dict:
        while b"\0" not in buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([out_r], [], [], left)[0]:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(out_r, 1 << 20)
            if not chunk:
                raise RuntimeError(f"Chromium exited: {proc.stderr.read().decode(errors='replace')[-2000:]}")
            buffer.extend(chunk)
        end = buffer.index(b"\0")
        msg = json.loads(bytes(buffer[:end]))
        del buffer[:end + 1]
        return msg

    def call(method: str, session: str | None = None, **params) -> dict:
        i = next(ids)
        msg = {"id": i, "method": method, "params": params, **({"sessionId": session} if session else {})}
        os.write(cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = receive(deadline)
            if reply.get("id") == i:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            if "method" in reply:
                events.append(reply)

    try:
        target = call("Target.createTarget", url="about:blank")["targetId"]
        session = call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

        def send(method: str, **params) -> dict:
            return call(method, session, **params)
        send("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1, mobile=False)
        for domain in ("Page", "Runtime", "Network"):
            send(f"{domain}.enable")
        yield send, events
    finally:
        with contextlib.suppress(OSError, RuntimeError, TimeoutError):
            call("Browser.close")
        os.close(cmd_w)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        os.close(out_r)
        proc.stderr.close()


def evaluate(send: Callable[..., dict], expression: str):
    """The value of a JavaScript expression in the page (JSON-able values only)."""
    result = send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
    if "exceptionDetails" in result:
        raise RuntimeError(f"{expression}: {result['exceptionDetails']}")
    return result["result"].get("value")


def wait_for(send: Callable[..., dict], expression: str, timeout: float = 30.0):
    """Poll a JavaScript expression until it is truthy; its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = evaluate(send, expression)
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"still false after {timeout} s: {expression}")
        time.sleep(0.1)


def open_file(send: Callable[..., dict], events: list[dict], path: Path, timeout: float = 30.0) -> None:
    """Load a local file and wait for its load event."""
    send("Page.navigate", url=Path(path).resolve().as_uri())
    wait_for(send, "document.readyState === 'complete'", timeout)


def screenshot(send: Callable[..., dict], clip: dict | None = None) -> tuple[bytes, np.ndarray]:
    """The page as PNG bytes and as an (h, w, 3) uint8 array; ``clip`` in page CSS pixels."""
    from PIL import Image
    params = {"format": "png", "captureBeyondViewport": True}
    if clip:
        params["clip"] = {**clip, "scale": 1}
    png = base64.b64decode(send("Page.captureScreenshot", **params)["data"])
    return png, np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
