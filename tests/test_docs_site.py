"""The documentation: the MkDocs site in docs/ builds with `mkdocs build --strict` (what `make docs`
runs) without one warning, so a broken internal link or anchor fails it (mkdocs.yml's
`validation`); and README.md, which lives outside the site, links only to files that exist and to
headings they have. No server: each build is a subprocess of a second or two."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from urllib.parse import unquote

import pytest
from pymdownx.slugs import slugify

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# What the site reads: its config, its pages, and the files its pages include whole (snippets).
SITE_SOURCES = ["mkdocs.yml", "docs", "BENCHMARKS.md", "CHANGELOG.md", "examples/README.md"]
README_MAX_LINES = 250  # a landing page (issue 30): the rest lives in docs/
# The anchor rule mkdocs.yml gives the toc extension: GitHub's, so links mean the same on both.
ANCHOR = slugify(case="lower")


def build(root: Path, site: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")  # Material's banner about its successor
    return subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=120)


def warnings(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in (result.stdout + result.stderr).splitlines() if "WARNING" in line or "ERROR" in line]


def test_the_site_builds_strict_without_a_warning(tmp_path):
    result = build(REPO, tmp_path / "site")
    assert result.returncode == 0 and not warnings(result), result.stdout + result.stderr
    assert (tmp_path / "site" / "configuration" / "index.html").is_file()
    # The included files arrive whole: BENCHMARKS.md's first heading is on its page.
    assert "Reproduce" in (tmp_path / "site" / "benchmark-results" / "index.html").read_text()
    # Offline: no page asks a CDN for fonts.
    assert "fonts.googleapis.com" not in (tmp_path / "site" / "index.html").read_text()


@pytest.fixture
def site_copy(tmp_path) -> Path:
    copy = tmp_path / "repo"
    for source in SITE_SOURCES:
        target = copy / source
        target.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (REPO / source).is_dir() else shutil.copy)(REPO / source, target)
    return copy


@pytest.mark.parametrize("link,complaint", [
    ("[gone](no-such-page.md)", "no-such-page.md"),
    ("[gone](api.md#no-such-heading)", "no-such-heading"),
    ("[gone](#no-such-heading-here)", "no-such-heading-here"),
], ids=["page", "anchor on another page", "anchor on the same page"])
def test_a_broken_link_or_anchor_fails_the_build(site_copy, link, complaint):
    page = site_copy / "docs" / "scoring.md"
    page.write_text(page.read_text() + f"\nSee {link}.\n")
    result = build(site_copy, site_copy / "site")
    assert result.returncode != 0, result.stdout + result.stderr
    assert any(complaint in line for line in warnings(result)), warnings(result)


def headings(markdown: str) -> set[str]:
    """The anchors of a Markdown file's headings (outside code blocks), as GitHub and the site make them."""
    found, fenced = set(), False
    for line in markdown.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (heading := re.match(r"#{1,6} +(.*?)\s*#*\s*$", line)):
            found.add(ANCHOR(heading.group(1), "-"))
    return found


def relative_links(markdown: str) -> list[str]:
    """Targets of inline links and images, without web addresses."""
    text = re.sub(r"```.*?```", "", markdown, flags=re.S)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def broken_links(markdown: str, page: Path = README) -> list[str]:
    """Each relative link of `page` (text `markdown`) whose file is missing, or whose #anchor is
    not a heading of that file."""
    broken = []
    for link in relative_links(markdown):
        path, _, anchor = link.partition("#")
        target = (page.parent / unquote(path)) if path else page
        if not target.exists():
            broken.append(f"{link}: no file {target.relative_to(REPO)}")
        elif anchor and anchor not in headings(markdown if target == page else target.read_text()):
            broken.append(f"{link}: no heading #{anchor} in {target.relative_to(REPO)}")
    return broken


def test_every_relative_link_of_the_readme_finds_its_file_and_heading():
    text = README.read_text()
    assert len(relative_links(text)) >= 15, relative_links(text)  # the landing page links into the docs
    assert not broken_links(text)


def test_the_readme_link_check_finds_a_missing_page_and_a_missing_heading():
    text = README.read_text() + "\n[a](docs/api.md#no-such-heading) [b](docs/no-such-page.md) [c](#nor-here)\n"
    assert broken_links(text) == ["docs/api.md#no-such-heading: no heading #no-such-heading in docs/api.md",
                                  "docs/no-such-page.md: no file docs/no-such-page.md",
                                  "#nor-here: no heading #nor-here in README.md"]


def test_the_readme_is_a_landing_page_with_its_picture():
    text = README.read_text()
    assert len(text.splitlines()) <= README_MAX_LINES
    picture = REPO / "docs" / "img" / "playground.png"
    assert f"]({picture.relative_to(REPO)})" in text
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and picture.stat().st_size < 300_000
    assert "random" in text.split(str(picture.relative_to(REPO)))[1][:600].lower()  # its caption says so
