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
import html
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
<link rel="stylesheet" href="{DOCS_PATH}/docs.css">
<link rel="icon" type="image/png" href="{DOCS_PATH}/favicon-32x32.png">
</head>
<body>
<nav class="esm2-links">Also: <a href="#python-client">the Python client</a> &middot;
<a href="#command-line">the esm2 command line</a> (docs/client.md)</nav>
{{banner}}<div id="swagger-ui"></div>
<section id="python-client" class="esm2-section">
<h2>Python client</h2>
<p><code>pip install esm2-service</code> (no torch). It talks gRPC to the server (port 50051), splits any
number of sequences into requests, retries and keeps input order. Every call takes the model first.</p>
<pre>from esm2_client import Esm2Client
with Esm2Client("localhost:50051") as client:
    outputs = client.encode("esm2-8m", ["MKTAYIAKQR"], include=["mean", "contacts"])
    outputs[0].mean[6]          # float32 numpy [320]
    client.predict("esm2-8m", ["MKT&lt;mask&gt;AYIAK"])[0].logits
    client.score("esm2-8m", [("MKTAYIAKQR", ["K2A", "T3G:A4C"])], "masked_marginal")[0].scores
    client.provenance("esm2-8m")  # weights fingerprint, random_weights, precision, server version</pre>
</section>
<section id="command-line" class="esm2-section">
<h2>The esm2 command line</h2>
<pre>esm2 embed proteins.fasta -o embeddings.h5 --include mean per_token   # resumable; provenance in the file
esm2 score --sequence MKTAYIAKQR --mutations K2A T3G:A4C
esm2 score --sequence MKTAYIAKQR --scan --positions 2-8 --method wt_marginal -o scan.csv --png scan.png
esm2 contacts proteins.fasta --png maps/
esm2 models</pre>
</section>
<script src="{DOCS_PATH}/swagger-ui-bundle.js"></script>
<script src="{DOCS_PATH}/docs.js"></script>
</body>
</html>
"""
# Our own styles: a file, as the Content-Security-Policy allows no inline style.
DOCS_CSS = """.esm2-links, .esm2-section { font-family: sans-serif; max-width: 1460px; margin: 0 auto; padding: 8px 20px; }
.esm2-section pre { background: #f4f4f4; padding: 12px; overflow-x: auto; }
.esm2-random-weights { font-family: sans-serif; max-width: 1460px; margin: 8px auto; padding: 12px 20px;
  background: #b00020; color: #fff; font-weight: bold; }
"""


def random_weights_banner(models: list[str]) -> str:
    """The page's warning when a served model has random weights (a test or demo checkpoint)."""
    if not models:
        return ""
    names = ", ".join(html.escape(name) for name in models)
    return (f'<div class="esm2-random-weights" role="alert">RANDOM WEIGHTS: {names} '
            f'{"has" if len(models) == 1 else "have"} random weights (a test or demo checkpoint): '
            "every output of it is meaningless.</div>\n")
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
    """The files of the docs page by name ("" is the page itself), read once. `random_models`: the
    served models with random weights, which the page warns about above everything else."""

    def __init__(self, vendor_dir: Path = VENDOR_DIR, random_models: list[str] = ()):
        page = INDEX_HTML.replace("{banner}", random_weights_banner(list(random_models)))
        self.files: dict[str, tuple[str, bytes]] = {
            "": (CONTENT_TYPES[".html"], page.encode()),
            "docs.js": (CONTENT_TYPES[".js"], START_JS.encode()),
            "docs.css": (CONTENT_TYPES[".css"], DOCS_CSS.encode()),
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
