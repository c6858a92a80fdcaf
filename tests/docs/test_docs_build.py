"""The documentation site builds offline with ``mkdocs build --strict`` (every warning is an error), works
opened from disk (``file://``), and reads well at the theme's text width.

The built pages are parsed with the standard library's HTML parser; each check names the page and what is wrong.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
# The text column holds about 78 monospace characters; a code line up to 100 scrolls a little, a longer one
# hides what matters (pasted terminal tables, trailing comments).
MAX_CODE_LINE = 100

pytest.importorskip(
    "mkdocs", reason="the docs extra (mkdocs, mkdocs-material, mkdocstrings) is not installed"
)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> tuple[Path, str]:
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "NO_COLOR": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "mkdocs",
            "build",
            "--strict",
            "--config-file",
            str(ROOT / "mkdocs.yml"),
            "--site-dir",
            str(out),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"mkdocs build --strict failed (exit {proc.returncode}):\n{log}"
    return out, log


def test_strict_build_has_no_warnings(site):
    _, log = site
    warnings = [line for line in log.splitlines() if re.match(r"\s*(WARNING|ERROR)\b", line)]
    assert not warnings, "mkdocs reported:\n" + "\n".join(warnings)


def test_site_loads_nothing_from_the_network(site):
    """No web fonts, CDN scripts or analytics: every <script src> and <link href> stays inside the site."""
    out, _ = site
    external = set()
    for page in out.rglob("*.html"):
        text = page.read_text(encoding="utf-8")
        for tag in re.findall(r"<(?:script|link|img)\b[^>]*>", text):
            for url in re.findall(r'(?:src|href)="((?:https?:)?//[^"]+)"', tag):
                external.add(f"{page.relative_to(out)}: {url}")
    assert not external, "pages load external resources:\n" + "\n".join(sorted(external))


def test_api_reference_documents_every_public_name(site):
    import flowloss

    out, _ = site
    html = (out / "api.html").read_text(encoding="utf-8")
    public = [name for name in flowloss.__all__ if not name.startswith("_")]
    missing = [name for name in public if f'id="flowloss.{name}"' not in html]
    assert not missing, f"docs/api.md lacks an entry for: {missing}"
    assert 'id="flowloss.reference.trajectory_balance_loss"' in html, "docs/api.md lacks flowloss.reference"


@pytest.mark.parametrize(("png", "page"), [("demo.png", "demo.md"), ("bench-cpu.png", "benchmarks.md")])
def test_plots_are_committed_small_and_used(png, page):
    path = DOCS / "img" / png
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert path.stat().st_size < 150_000, f"docs/img/{png} is {path.stat().st_size} bytes (limit 150 KB)"
    assert f"img/{png}" in (DOCS / page).read_text(encoding="utf-8")


class _Page(HTMLParser):
    """What the checks below need from one built page: links, element ids, code blocks, inline code, text."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.links: list[tuple[str, str]] = []  # (tag, url) of every href / src
        self.ids: set[str] = set()
        self.blocks: list[str] = []  # text of each <pre>
        self.inline: list[str] = []  # text of each <code> outside <pre>
        self.text: list[str] = []  # all text outside <script> and <style>
        self._pre: list[str] | None = None
        self._code: list[str] | None = None
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name == "id" and value:
                self.ids.add(value)
            if name in ("href", "src") and value is not None:
                self.links.append((tag, value))
        if tag in ("script", "style"):
            self._skip += 1
        elif tag == "pre":
            self._pre = []
        elif tag == "code" and self._pre is None:
            self._code = []

    def handle_endtag(self, tag):
        if tag in ("script", "style"):
            self._skip -= 1
        elif tag == "pre" and self._pre is not None:
            self.blocks.append("".join(self._pre))
            self._pre = None
        elif tag == "code" and self._code is not None:
            self.inline.append("".join(self._code))
            self._code = None

    def handle_data(self, data):
        if self._skip:
            return
        self.text.append(data)
        for buffer in (self._pre, self._code):
            if buffer is not None:
                buffer.append(data)


@pytest.fixture(scope="module")
def pages(site) -> dict[Path, _Page]:
    out, _ = site
    parsed = {}
    for path in sorted(out.rglob("*.html")):
        page = _Page()
        page.feed(path.read_text(encoding="utf-8"))
        parsed[path] = page
    return parsed


def test_every_internal_link_resolves_to_a_file_from_disk(site, pages):
    """Opened from disk, a link to a folder (``math/``) shows a directory listing: every internal href and src
    must name an existing file, and a ``#fragment`` must name an id on the target page."""
    out, _ = site
    broken = []
    for path, page in pages.items():
        if path == out / "404.html":
            continue  # a server's answer to any missing path, so its links are root-absolute; never opened from disk
        for tag, url in page.links:
            parts = urlsplit(url)
            if parts.scheme or url.startswith("//"):
                continue  # external (test_site_loads_nothing_from_the_network checks scripts, styles, images)
            target = (path.parent / unquote(parts.path)).resolve() if parts.path else path
            where = f"{path.relative_to(out)}: <{tag}> {url}"
            if not target.is_file():
                kind = "a folder" if target.is_dir() else "missing"
                broken.append(f"{where} -> {kind}")
            elif parts.fragment and target in pages and unquote(parts.fragment) not in pages[target].ids:
                broken.append(f"{where} -> no id {parts.fragment!r} on that page")
    assert not broken, "links that do not work from file://:\n" + "\n".join(broken)


def test_no_raw_roles_or_constant_names_in_the_api_page(site, pages):
    """Sphinx roles (``:func:`x` ``) are not markdown and show as typed; a default shown as ``DEFAULT_BETA`` tells
    the reader nothing: the signature must show the value."""
    out, _ = site
    text = "".join(pages[out / "api.html"].text)
    roles = sorted(set(re.findall(r":(?:py:)?[a-z]+:`[^`]*`", text)))
    constants = sorted(set(re.findall(r"\bDEFAULT_[A-Z0-9_]+\b", text)))
    assert not roles, f"raw Sphinx roles on the API page: {roles}"
    assert not constants, f"constant names instead of values on the API page: {constants}"


def test_code_lines_fit_the_text_column(site, pages):
    """Code blocks and inline code: no line over MAX_CODE_LINE characters (the column shows about 78)."""
    out, _ = site
    long = []
    for path, page in pages.items():
        for line in (line for block in page.blocks for line in block.splitlines()):
            if len(line) > MAX_CODE_LINE:
                long.append(f"{path.relative_to(out)}: code line of {len(line)} chars: {line[:60]}...")
        for code in page.inline:
            if len(code) > MAX_CODE_LINE:
                long.append(f"{path.relative_to(out)}: inline code of {len(code)} chars: {code[:60]}...")
    assert not long, f"code lines over {MAX_CODE_LINE} characters:\n" + "\n".join(long)


def test_code_spans_show_no_escapes(pages):
    """Inside backticks a backslash is literal: ``\\|`` in a table cell shows the backslash (a plain ``|`` inside a
    code span does not split the cell)."""
    escaped = [f"{path.name}: {code}" for path, page in pages.items() for code in page.inline if "\\|" in code]
    assert not escaped, "code spans showing an escape:\n" + "\n".join(escaped)


def test_no_accidental_headings_in_the_markdown():
    """Python-Markdown makes any line that starts with ``#`` a heading (``#4397).`` after a line break)."""
    found = []
    for path in sorted(DOCS.rglob("*.md")):
        fence = None
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            marker = re.match(r"\s*(`{3,}|~{3,})", line)
            if marker and (fence is None or marker.group(1).startswith(fence)):
                fence = None if fence else marker.group(1)
                continue
            if fence is None and re.match(r"#{1,6}(?!#)\S", line):
                found.append(f"{path.relative_to(ROOT)}:{number}: {line[:60]}")
    assert not found, "lines that render as headings but are not meant to be:\n" + "\n".join(found)
