"""Headless Chromium driven over the DevTools protocol, for dashboard tests that click.

A small client: navigate, evaluate JavaScript (awaiting its promise), wait for a condition in
the page (a promise that resolves when it holds, so the test waits on the page, not a clock),
and answer confirm() dialogs, recording their text."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from helpers import free_port
from websockets.sync.client import connect


class Browser:
    def __init__(self) -> None:
        binary = shutil.which("chromium") or shutil.which("chromium-browser")
        assert binary, "chromium is not installed; `make test` installs it (apt-get install chromium)"
        self.port = free_port()
        # Chromium's helper processes may still write to the profile as the browser exits: a
        # leftover file must not fail the test that used the browser.
        self.profile = tempfile.TemporaryDirectory(prefix="edgekit-chromium-", ignore_cleanup_errors=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                f"--user-data-dir={self.profile.name}",
                f"--remote-debugging-port={self.port}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # its own process group: close() ends its helpers too
        )
        self.ws = connect(self._page_url(), max_size=2**24, open_timeout=30)
        self._id = 0
        #: Texts of the dialogs (confirm, alert) the page opened, each accepted.
        self.dialogs: list[str] = []
        self.call("Page.enable")
        self.call("Runtime.enable")

    def _page_url(self) -> str:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/json/list", timeout=2) as response:
                    pages = [t for t in json.load(response) if t["type"] == "page"]
                if pages:
                    return str(pages[0]["webSocketDebuggerUrl"])
            except OSError:
                pass  # not listening yet
            if time.monotonic() > deadline:
                raise AssertionError("chromium's DevTools endpoint never came up")
            time.sleep(0.1)  # a process starting up: nothing to wait on but its port

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._id += 1
        wanted = self._id
        self.ws.send(json.dumps({"id": wanted, "method": method, "params": params}))
        while True:
            message = json.loads(self.ws.recv(timeout=60))
            if message.get("method") == "Page.javascriptDialogOpening":
                self.dialogs.append(message["params"]["message"])
                self._id += 1
                self.ws.send(
                    json.dumps(
                        {"id": self._id, "method": "Page.handleJavaScriptDialog", "params": {"accept": True}}
                    )
                )
            elif message.get("id") == wanted:
                if "error" in message:
                    raise AssertionError(f"{method}: {message['error']}")
                return dict(message.get("result", {}))

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, awaitPromise=True, returnByValue=True)
        if "exceptionDetails" in result:
            raise AssertionError(f"{expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def goto(self, url: str) -> None:
        """Open ``url`` and wait until the new document (after any redirect) has loaded."""
        self.evaluate("window.__edgekitOld = true")
        self.call("Page.navigate", url=url)
        self.wait_for("!window.__edgekitOld && document.readyState === 'complete'")

    def wait_for(self, condition: str, timeout_ms: int = 20000) -> None:
        """Resolve once ``condition`` (JavaScript) holds in the page, checked on each animation
        frame; fail after ``timeout_ms``."""
        deadline = time.monotonic() + timeout_ms / 1000
        while True:
            try:
                held = self._wait_in_page(condition, timeout_ms)
                break
            except AssertionError as exc:  # the page navigated while we waited: ask the new one
                gone = "navigated or closed" in str(exc) or "context was destroyed" in str(exc)
                if not gone or time.monotonic() > deadline:
                    raise
        assert held, f"never held in the page: {condition}"

    def _wait_in_page(self, condition: str, timeout_ms: int) -> Any:
        return self.evaluate(
            f"""new Promise((resolve) => {{
                const start = performance.now();
                const check = () => {{
                    let ok = false;
                    try {{ ok = Boolean({condition}); }} catch (e) {{}}
                    if (ok) resolve(true);
                    else if (performance.now() - start > {timeout_ms}) resolve(false);
                    else setTimeout(check, 25);
                }};
                check();
            }})"""
        )

    def screenshot(self, path: Path, width: int = 1200, height: int = 800) -> None:
        """A PNG of the page as a ``width`` x ``height`` window shows it."""
        self.call(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=False,
        )
        data = self.call("Page.captureScreenshot", format="png")["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        self.ws.close()
        self.process.terminate()
        try:
            self.process.wait(10)
        finally:
            with contextlib.suppress(ProcessLookupError):  # helpers left behind (renderer, zygote)
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
            self.profile.cleanup()
