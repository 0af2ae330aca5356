"""Package build hook: every build generates the gRPC stubs and Envoy's descriptor set from protos/.

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


class BuildPyWithProtos(build_py):
    def run(self):
        super().run()
        # An editable install imports from the source tree, so generate there; a wheel from build_lib.
        _generate.generate(_generate.REPO if getattr(self, "editable_mode", False) else Path(self.build_lib))


setup(cmdclass={"build_py": BuildPyWithProtos})
