"""Package build hook: every build generates the gRPC stubs and Envoy's descriptor set from protos/,
and vendors Swagger UI (npm's swagger-ui-dist, pinned and hash-checked) for the docs page.

Metadata lives in pyproject.toml; this only adds the generation step to build_py
(grpcio-tools and googleapis-common-protos are in build-system.requires).
"""

import importlib.util
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

_spec = importlib.util.spec_from_file_location("_generate_protos", Path(__file__).parent / "protos" / "generate.py")
_generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_generate)
_docs_spec = importlib.util.spec_from_file_location("_docs_page", Path(__file__).parent / "service" / "api" / "docs_page.py")
_docs = importlib.util.module_from_spec(_docs_spec)
_docs_spec.loader.exec_module(_docs)


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        # An editable install imports from the source tree, so generate there; a wheel from build_lib.
        root = _generate.REPO if getattr(self, "editable_mode", False) else Path(self.build_lib)
        _generate.generate(root)
        target = root / "service" / "api" / "swagger_ui"
        if not _docs.vendored(target):
            source = _docs.VENDOR_DIR
            try:
                if _docs.vendored(source):  # already fetched in this checkout
                    target.mkdir(parents=True, exist_ok=True)
                    for name in (*_docs.VENDORED_FILES, "VERSION"):
                        (target / name).write_bytes((source / name).read_bytes())
                else:
                    _docs.vendor(target)
            except (_docs.DocsUnavailable, OSError) as exc:  # the client needs none of it
                print(f"warning: the docs page will answer 404: {exc}")


setup(cmdclass={"build_py": BuildPyWithProtos})
