"""mkdocs hook: publish `benchmarks/results/` with the site, so pages link the full result files.

The files stay where the benchmark scripts write them (the repository's `benchmarks/results/`); the built site
gets a copy under the same path, `site/benchmarks/results/`, and `[...](benchmarks/results/<file>)` links to it
from a page at the top of `docs/` (mkdocs checks those links like any other).
"""

from __future__ import annotations

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
RESULTS = "benchmarks/results"


def on_files(files, config):
    for path in sorted((ROOT / RESULTS).iterdir()):
        if path.is_file() and not path.name.startswith("."):
            files.append(
                File(
                    f"{RESULTS}/{path.name}",
                    src_dir=str(ROOT),
                    dest_dir=config.site_dir,
                    use_directory_urls=config.use_directory_urls,
                )
            )
    return files
