"""The playground page at GET /api/v3/ui: a sequence's contact map, per-residue track and
mutational-scan heatmap, drawn in the browser from the JSON API's own answers.

Three static files in service/api/playground/ (the page, one JS module that draws on canvas
itself, its stylesheet): no library, nothing from a CDN, no inline script or style, so Envoy
serves them under the docs page's strict Content-Security-Policy (gateway/envoy_config.py,
DOCS_HEADERS). The page is told whether the server requires API keys (a `data-api-keys`
attribute), so it shows the key field only then.
"""

from __future__ import annotations

from pathlib import Path

from service.api.docs_page import CONTENT_TYPES

PLAYGROUND_PATH = "/api/v3/ui"
PAGE_DIR = Path(__file__).resolve().parent / "playground"
PAGE_FILES = ("playground.js", "playground.css")
API_KEYS_MARK = "{{api_keys}}"


class PlaygroundPage:
    """The files of the playground page by name ("" is the page itself), read once."""

    def __init__(self, api_keys_required: bool, page_dir: Path = PAGE_DIR):
        page = (page_dir / "index.html").read_text(encoding="utf-8")
        assert page.count(API_KEYS_MARK) == 1, f"{page_dir / 'index.html'} must carry {API_KEYS_MARK} once"
        self.files: dict[str, tuple[str, bytes]] = {
            "": (CONTENT_TYPES[".html"], page.replace(API_KEYS_MARK, "on" if api_keys_required else "off").encode()),
        }
        for name in PAGE_FILES:
            path = page_dir / name
            self.files[name] = (CONTENT_TYPES[path.suffix], path.read_bytes())

    def get(self, name: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of a file of the page, None for any other name."""
        return self.files.get(name)
