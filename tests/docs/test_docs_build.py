"""The documentation site builds offline with ``mkdocs build --strict`` (every warning is an error)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

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
    html = (out / "api" / "index.html").read_text(encoding="utf-8")
    public = [name for name in flowloss.__all__ if not name.startswith("_")]
    missing = [name for name in public if f'id="flowloss.{name}"' not in html]
    assert not missing, f"docs/api.md lacks an entry for: {missing}"
    assert 'id="flowloss.reference"' in html


def test_demo_plot_is_committed_small_and_used():
    png = ROOT / "docs" / "img" / "demo.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert png.stat().st_size < 150_000, f"docs/img/demo.png is {png.stat().st_size} bytes (limit 150 KB)"
    assert "img/demo.png" in (ROOT / "docs" / "demo.md").read_text(encoding="utf-8")
