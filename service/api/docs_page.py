"""The JSON API's interactive docs: Swagger UI over the served OpenAPI document, at GET /api/v3/docs.

Swagger UI is npm's `swagger-ui-dist` (5.x: the first major that reads OpenAPI 3.1), pinned by
version and checked against its registry integrity hash. The package build vendors it (setup.py;
`make setup` runs `python -m service.api.docs_page --vendor`) with npm's own client, into
service/api/swagger_ui/; nothing is fetched from a CDN when the page is served. Our page and its
start-up script are files too, with no inline script or style, so that Envoy can serve them under a
strict Content-Security-Policy (gateway/envoy_config.py, DOCS_HEADERS).

This module imports only the standard library: setup.py loads it before anything is installed.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

SWAGGER_UI_PACKAGE = "swagger-ui-dist"
SWAGGER_UI_VERSION = "5.32.0"
SWAGGER_UI_INTEGRITY = ("sha512-nKZB0OuDvacB0s/lC2gbge+RigYvGRGpLLMWMFxaTUwfM+CfndVk9Th2IaTinqXiz6Mn26GK2zriCpv6/"
                        "+5m3Q==")
# What the page uses from the package (and its licence, which travels with it).
VENDORED_FILES = ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "LICENSE", "NOTICE")
VENDOR_DIR = Path(__file__).resolve().parent / "swagger_ui"
DOCS_PATH = "/api/v3/docs"
OPENAPI_PATH = "/api/v3/openapi.json"

INDEX_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>ESM-2 JSON API</title>
<link rel="stylesheet" href="{DOCS_PATH}/swagger-ui.css">
<link rel="icon" type="image/png" href="{DOCS_PATH}/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{DOCS_PATH}/swagger-ui-bundle.js"></script>
<script src="{DOCS_PATH}/docs.js"></script>
</body>
</html>
"""
# No validator badge (it would call validator.swagger.io), requests go to this origin only.
START_JS = f"""window.ui = SwaggerUIBundle({{
  url: "{OPENAPI_PATH}",
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  displayRequestDuration: true,
}});
"""

CONTENT_TYPES = {".js": "application/javascript; charset=utf-8", ".css": "text/css; charset=utf-8",
                 ".png": "image/png", ".html": "text/html; charset=utf-8", "": "text/plain; charset=utf-8"}


class DocsUnavailable(Exception):
    pass


class DocsPage:
    """The files of the docs page by name ("" is the page itself), read once."""

    def __init__(self, vendor_dir: Path = VENDOR_DIR):
        self.files: dict[str, tuple[str, bytes]] = {
            "": (CONTENT_TYPES[".html"], INDEX_HTML.encode()),
            "docs.js": (CONTENT_TYPES[".js"], START_JS.encode()),
        }
        self.missing = [name for name in VENDORED_FILES if not (vendor_dir / name).is_file()]
        for name in VENDORED_FILES:
            path = vendor_dir / name
            if path.is_file():
                self.files[name] = (CONTENT_TYPES[path.suffix], path.read_bytes())

    def get(self, name: str) -> tuple[str, bytes] | None:
        """(content type, bytes) of a file of the page, None for any other name."""
        if self.missing and name in ("", *VENDORED_FILES):
            raise DocsUnavailable(
                f"the docs page's Swagger UI files are not installed ({', '.join(self.missing)} missing): "
                "run `make setup` or `python -m service.api.docs_page --vendor` (needs npm)")
        return self.files.get(name)


def _integrity(data: bytes) -> str:
    return "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()


def vendor(target: Path = VENDOR_DIR) -> None:
    """Fetch the pinned swagger-ui-dist with `npm pack`, check its integrity, unpack what the page uses."""
    npm = shutil.which("npm")
    if npm is None:
        raise DocsUnavailable("npm is not installed: the docs page's Swagger UI cannot be vendored")
    with tempfile.TemporaryDirectory(prefix="esm2-swagger-ui-") as tmp:
        subprocess.run([npm, "pack", f"{SWAGGER_UI_PACKAGE}@{SWAGGER_UI_VERSION}", "--pack-destination", tmp,
                        "--silent"], check=True, stdout=subprocess.DEVNULL)
        archive = Path(tmp) / f"{SWAGGER_UI_PACKAGE}-{SWAGGER_UI_VERSION}.tgz"
        if _integrity(archive.read_bytes()) != SWAGGER_UI_INTEGRITY:
            raise DocsUnavailable(f"{archive.name} does not match its pinned integrity hash")
        target.mkdir(parents=True, exist_ok=True)
        with tarfile.open(archive) as tar:
            for name in VENDORED_FILES:
                member = tar.extractfile(f"package/{name}")
                (target / name).write_bytes(member.read())
        (target / "VERSION").write_text(SWAGGER_UI_VERSION)


def vendored(target: Path = VENDOR_DIR) -> bool:
    """The pinned version's files are all there."""
    version = target / "VERSION"
    return version.is_file() and version.read_text() == SWAGGER_UI_VERSION and \
        all((target / name).is_file() for name in VENDORED_FILES)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.api.docs_page", description=__doc__.splitlines()[0])
    parser.add_argument("--vendor", action="store_true", help=f"fetch {SWAGGER_UI_PACKAGE} into {VENDOR_DIR}")
    args = parser.parse_args(argv)
    if args.vendor and not vendored():
        try:
            vendor()
        except DocsUnavailable as exc:  # the rest of the service works without the docs page
            print(f"warning: {exc}; GET {DOCS_PATH} will answer 404", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
