"""Open a page in headless Chromium (Debian's ``chromium``) over the DevTools protocol and report what a reader's
browser would see go wrong: requests that leave the file system, console errors and uncaught exceptions, images that
did not load or have no alt text, and which of a list of element ids exist.

Chromium runs with every network path closed (no proxy, every host name unresolvable, no background services), so a
page that tries to fetch a CDN script is caught by its request, not by a timeout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import websocket

LOCAL_SCHEMES = ("file:", "data:", "about:", "blob:")
FLAGS = (
    "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-extensions",
    "--host-resolver-rules=MAP * ~NOTFOUND", "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
)


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@dataclass
class PageReport:
    """What went wrong on one page."""

    url: str
    remote_requests: list[str] = field(default_factory=list)
    console_errors: list[str] = field(default_factory=list)
    broken_images: list[str] = field(default_factory=list)
    images: int = 0
    found_ids: set[str] = field(default_factory=set)
    viewport_width: int = 0
    scroll_width: int = 0
    widest: list[str] = field(default_factory=list)

    def problems(self, required_ids: tuple[str, ...] = ()) -> list[str]:
        missing = [f"missing element #{name}" for name in required_ids if name not in self.found_ids]
        sideways = ([f"scrolls sideways at {self.viewport_width} px: page {self.scroll_width} px wide "
                     f"(widest: {'; '.join(self.widest)})"] if self.scroll_width > self.viewport_width else [])  # fmt: skip
        return ([f"remote request {u}" for u in self.remote_requests] + [f"console error {e}" for e in self.console_errors]
                + [f"broken image {i}" for i in self.broken_images] + missing + sideways)


class Browser:
    """One headless Chromium process; :meth:`check` opens a page in a fresh tab."""

    def __init__(self, width: int = 1400, height: int = 1000) -> None:
        binary = chromium()
        if binary is None:
            raise RuntimeError("chromium not found; install it with: apt-get install -y chromium")
        self.profile = tempfile.mkdtemp(prefix="kdrepro-chromium-")
        self.process = subprocess.Popen(
            [binary, *FLAGS, "--remote-debugging-port=0", f"--user-data-dir={self.profile}",
             f"--window-size={width},{height}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = Path(self.profile) / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text().count("\n") >= 1):
            if time.monotonic() > deadline or self.process.poll() is not None:
                self.close()
                raise RuntimeError("chromium did not open its DevTools port within 30 s")
            time.sleep(0.1)
        port, path = port_file.read_text().splitlines()[:2]
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{port}{path}", timeout=60, suppress_origin=True)
        self._id = 0

    def _send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None) -> int:
        self._id += 1
        message: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        self.socket.send(json.dumps(message))
        return self._id

    def _call(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
              events: list[dict] | None = None) -> dict[str, Any]:
        wanted = self._send(method, params, session)
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})
            if events is not None and "method" in message:
                events.append(message)

    def check(self, page: Path, ids: tuple[str, ...] = (), settle_seconds: float = 1.0, width: int | None = None) -> PageReport:
        """Load ``page`` (a local HTML file), wait for its load event, and collect what went wrong; ``width``: emulate
        a screen that many CSS pixels wide (a phone at 390, with its viewport meta tag honoured)."""
        url = Path(page).resolve().as_uri()
        target = self._call("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self._call("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        events: list[dict] = []
        for domain in ("Network", "Runtime", "Log", "Page"):
            self._call(f"{domain}.enable", session=session, events=events)
        if width is not None:
            self._call("Emulation.setDeviceMetricsOverride", {"width": width, "height": 900, "deviceScaleFactor": 1,
                                                              "mobile": width < 600}, session=session, events=events)
        self._call("Page.navigate", {"url": url}, session=session, events=events)
        deadline = time.monotonic() + 60
        while not any(e["method"] == "Page.loadEventFired" for e in events) and time.monotonic() < deadline:
            events.append(json.loads(self.socket.recv()))
        end = time.monotonic() + settle_seconds
        self.socket.settimeout(0.2)
        while time.monotonic() < end:
            try:
                events.append(json.loads(self.socket.recv()))
            except websocket.WebSocketTimeoutException:
                pass
        self.socket.settimeout(60)
        report = PageReport(url)
        images = self._call("Runtime.evaluate", {"expression": _IMAGES_JS, "returnByValue": True}, session=session, events=events)
        value = images["result"]["value"]
        report.images, report.broken_images = value["count"], value["broken"]
        found = self._call("Runtime.evaluate", {"expression": f"{json.dumps(list(ids))}.filter(id => document.getElementById(id))",
                                                "returnByValue": True}, session=session, events=events)
        report.found_ids = set(found["result"]["value"])
        widths = self._call("Runtime.evaluate", {"expression": _WIDTH_JS, "returnByValue": True}, session=session, events=events)
        report.viewport_width, report.scroll_width, report.widest = widths["result"]["value"]
        for event in events:
            self._record(event, report)
        self._call("Target.closeTarget", {"targetId": target})
        return report

    @staticmethod
    def _record(event: dict, report: PageReport) -> None:
        method, params = event.get("method"), event.get("params", {})
        if method == "Network.requestWillBeSent":
            request_url = params["request"]["url"]
            if not request_url.startswith(LOCAL_SCHEMES):
                report.remote_requests.append(request_url)
        elif method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            report.console_errors.append(details.get("exception", {}).get("description") or details.get("text", "exception"))
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
            report.console_errors.append(" ".join(str(a.get("value", a.get("description", ""))) for a in params.get("args", [])))
        elif method == "Log.entryAdded" and params["entry"].get("level") == "error":
            report.console_errors.append(f"{params['entry'].get('text')} ({params['entry'].get('url', '')})")

    def close(self) -> None:
        if getattr(self, "socket", None) is not None:
            self.socket.close()
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
        shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


_IMAGES_JS = """(() => {
  const images = Array.from(document.images);
  const broken = images.filter(i => !(i.complete && i.naturalWidth > 0) || !(i.alt || '').trim()
                                    || i.alt === 'figure without a description')
                       .map(i => (i.alt || i.src.slice(0, 60)));
  return {count: images.length, broken: broken};
})()"""


#: [viewport width, page scroll width, the three widest elements that stick out past the viewport]
_WIDTH_JS = """(() => {
  const view = document.documentElement.clientWidth;
  const wide = [...document.querySelectorAll('body *')].map(e => [e.getBoundingClientRect().right, e])
    .filter(([right]) => right > view + 1).sort((a, b) => b[0] - a[0]).slice(0, 3)
    .map(([right, e]) => `${e.tagName.toLowerCase()}${e.id ? '#' + e.id : ''}.${[...e.classList].join('.')} ${Math.round(right)}px`);
  return [view, document.documentElement.scrollWidth, wide];
})()"""


def require_browser() -> bool:
    """CI sets ``KDREPRO_REQUIRE_BROWSER=1`` (``.ci/run``), where a missing chromium is a failure, not a skip."""
    return os.environ.get("KDREPRO_REQUIRE_BROWSER") == "1"


#: Element ids each page must have (the verdict and Table 1 where a reader looks for them first).
REQUIRED_IDS = {"index": ("verdict", "table1"), "matched": ("verdict", "table1"), "cost": ("T_cost-table",),
                "extended": ("T_budget-table", "T_published-table")}


def check_reports(reports_dir: Path) -> dict[str, list[str]]:
    """Open every ``*.html`` of ``reports_dir`` in one browser; the problems of each page (empty lists = clean)."""
    with Browser() as browser:
        return {page.stem: browser.check(page, REQUIRED_IDS.get(page.stem, ())).problems(REQUIRED_IDS.get(page.stem, ()))
                for page in sorted(Path(reports_dir).glob("*.html"))}
