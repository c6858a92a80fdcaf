"""Screenshots of every page of the built site, opened from disk (``file://``) in headless Chromium.

Run by hand (not in CI) after ``make docs``, then look at every image::

    apt-get install -y chromium                                   # Debian's package: /usr/bin/chromium
    .venv/bin/python docs/screenshots.py                          # site/ -> site-screenshots/
    .venv/bin/python docs/screenshots.py --width 800 --out shots  # a narrow window
    .venv/bin/python docs/screenshots.py --serve                  # the same pages served over http://127.0.0.1

Each page is cut into window-sized tiles, ``<page>-01.png``, ``<page>-02.png``, ... (``--full`` takes one tall
image instead). The script also types a query into the search box of the first page and takes
``search-<query>.png``. It prints every JavaScript error and failed resource load it sees, and every code block
or table wider than the text column: a page that works from disk and fits the column prints none; the exit
status is 1 when anything was printed. Chromium is driven through its DevTools protocol on a pipe
(``--remote-debugging-pipe``), so nothing but the standard library and the browser is needed.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import functools
import http.server
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]


class Browser:
    """A headless Chromium on ``--remote-debugging-pipe``: requests out on fd 3, replies and events in on fd 4."""

    def __init__(self, executable: str, profile: str):
        to_browser_r, self._out = os.pipe()
        self._in, from_browser_w = os.pipe()

        def wire_fds() -> None:
            os.dup2(to_browser_r, 3)
            os.dup2(from_browser_w, 4)

        self.proc = subprocess.Popen(
            [executable, *FLAGS, f"--user-data-dir={profile}", "--remote-debugging-pipe", "about:blank"],
            pass_fds=(3, 4, to_browser_r, from_browser_w),  # 3 and 4 after wire_fds
            preexec_fn=wire_fds,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_r)
        os.close(from_browser_w)
        self._buffer = b""
        self._next_id = 0
        self.events: list[dict] = []
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable", session=True)

    def _read_message(self, timeout: float) -> dict | None:
        deadline = time.monotonic() + timeout
        while b"\0" not in self._buffer:
            if time.monotonic() > deadline:
                return None
            ready, _, _ = select.select([self._in], [], [], 0.1)
            if ready:
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError("chromium closed the DevTools pipe")
                self._buffer += chunk
        raw, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(raw)

    def call(self, method: str, session: bool = False, timeout: float = 30.0, **params) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            reply = self._read_message(deadline - time.monotonic())
            if reply is None:
                break
            if reply.get("id") == self._next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]
            self.events.append(reply)
        raise TimeoutError(method)

    def wait_for(self, event: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.get("method") == event for e in self.events):
                return
            message = self._read_message(0.2)
            if message is not None:
                self.events.append(message)
        raise TimeoutError(event)

    def settle(self, seconds: float) -> None:
        """Keep collecting events (errors) for a while: scripts run after the load event."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            message = self._read_message(0.1)
            if message is not None:
                self.events.append(message)

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        return result["result"].get("value")

    def close(self) -> None:
        with contextlib.suppress(RuntimeError, TimeoutError, OSError):
            self.call("Browser.close", timeout=5)
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def problems(events: list[dict]) -> list[str]:
    """JavaScript exceptions, console errors and failed loads among the DevTools events."""
    found = []
    for event in events:
        method, params = event.get("method"), event.get("params", {})
        if method == "Runtime.exceptionThrown":
            details = params["exceptionDetails"]
            found.append(f"js exception: {details.get('exception', {}).get('description') or details['text']}")
        elif method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "warning"):
            found.append(f"console {params['type']}: " + " ".join(str(a.get("value", "")) for a in params["args"]))
        elif method == "Log.entryAdded" and params["entry"]["level"] in ("error", "warning"):
            found.append(f"log {params['entry']['level']}: {params['entry']['text']}")
        elif method == "Network.loadingFailed":
            found.append(f"failed load: {params.get('errorText')} ({params.get('type')})")
    return found


OVERFLOW_JS = """
[...document.querySelectorAll('.md-content pre > code, .md-typeset__table table')]
  .filter(e => e.scrollWidth > e.clientWidth + 1 || e.getBoundingClientRect().right >
               document.querySelector('.md-content__inner').getBoundingClientRect().right + 1)
  .map(e => (e.tagName === 'CODE' ? 'code block' : 'table') + ' wider than the text column: ' +
            e.textContent.trim().slice(0, 60).replace(/\\s+/g, ' '))
"""


def overflowing(browser: Browser) -> list[str]:
    """Code blocks and tables that do not fit the text column (the reader must scroll sideways to see all)."""
    return browser.evaluate(OVERFLOW_JS) or []


def shoot(browser: Browser, path: Path, width: int, height: int, full: bool) -> list[Path]:
    """Screenshots of the current page: window-sized tiles (or one tall image), returns the files written."""
    page_height = int(browser.evaluate("document.documentElement.scrollHeight"))
    if full:
        tiles = [(0, page_height)]
    else:
        tiles = [(top, min(height, page_height - top)) for top in range(0, page_height, height)]
    written = []
    for k, (top, h) in enumerate(tiles, start=1):
        shot = browser.call(
            "Page.captureScreenshot",
            session=True,
            format="png",
            captureBeyondViewport=True,
            clip={"x": 0, "y": top, "width": width, "height": max(h, 1), "scale": 1},
        )
        out = path.with_name(f"{path.name}-{k:02d}.png") if not full else path.with_suffix(".png")
        out.write_bytes(base64.b64decode(shot["data"]))
        written.append(out)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--site", type=Path, default=ROOT / "site", help="the built site (default: site/)")
    parser.add_argument("--out", type=Path, default=ROOT / "site-screenshots", help="where the PNGs go")
    parser.add_argument("--width", type=int, default=1280, help="window width in CSS pixels (default 1280)")
    parser.add_argument("--height", type=int, default=900, help="window height, and tile height (default 900)")
    parser.add_argument("--full", action="store_true", help="one tall image per page instead of tiles")
    parser.add_argument("--search", default="vargrad", help="query typed into the search box (default vargrad)")
    parser.add_argument("--serve", action="store_true", help="serve the site on 127.0.0.1 instead of file://")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args(argv)

    site = args.site.resolve()
    # The home page first (the search is tried there), then every other page in path order.
    pages = sorted(
        (p for p in site.rglob("*.html") if p.name != "404.html"), key=lambda p: (p != site / "index.html", p)
    )
    if not pages:
        print(f"no pages under {site}: build the site first (make docs)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    url = Path.as_uri
    if args.serve:

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(site)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        port = server.server_address[1]

        def url(page: Path) -> str:
            return f"http://127.0.0.1:{port}/{page.relative_to(site).as_posix()}"

    failures = 0
    with tempfile.TemporaryDirectory(prefix="flowloss-shots-") as profile:
        browser = Browser(args.chromium, profile)
        try:
            browser.call(
                "Emulation.setDeviceMetricsOverride",
                session=True,
                width=args.width,
                height=args.height,
                deviceScaleFactor=1,
                mobile=False,
            )
            for page in pages:
                name = str(page.relative_to(site).with_suffix("")).replace(os.sep, "-")
                browser.events.clear()
                browser.call("Page.navigate", session=True, url=url(page))
                browser.wait_for("Page.loadEventFired")
                browser.settle(0.5)
                files = shoot(browser, args.out / name, args.width, args.height, args.full)
                found = problems(browser.events) + overflowing(browser)
                failures += bool(found)
                print(f"{page.relative_to(site)}: {len(files)} image(s)" + "".join(f"\n  {p}" for p in found))

            # Search, from disk: type the query into the first page's search box and wait for results.
            browser.events.clear()
            browser.call("Page.navigate", session=True, url=url(pages[0]))
            browser.wait_for("Page.loadEventFired")
            browser.settle(0.5)
            visible = browser.evaluate(
                "(() => { const i = document.querySelector('.md-search__input');"
                " return !!i && i.offsetParent !== null && getComputedStyle(i).visibility !== 'hidden'; })()"
            )
            browser.evaluate(
                "(() => { document.querySelector('label[for=__search]')?.click();"
                " const i = document.querySelector('.md-search__input'); i.focus();"
                f" i.value = {json.dumps(args.search)}; i.dispatchEvent(new Event('input')); }})()"
            )
            browser.settle(1.5)
            hits = browser.evaluate("document.querySelectorAll('.md-search-result__item').length")
            meta = browser.evaluate("document.querySelector('.md-search-result__meta')?.textContent")
            shot = browser.call("Page.captureScreenshot", session=True, format="png")
            search_png = args.out / f"search-{args.search}.png"
            search_png.write_bytes(base64.b64decode(shot["data"]))
            found = problems(browser.events)
            print(f"search {args.search!r}: box visible: {visible}, {hits} result(s), {meta!r} -> {search_png.name}")
            for p in found:
                print(f"  {p}")
            failures += bool(found) or not visible or not hits
        finally:
            browser.close()
    print(f"screenshots in {args.out}" + (f"; {failures} page(s) with problems" if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
