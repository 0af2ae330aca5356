"""Generate the Python gRPC stubs and Envoy's descriptor set from protos/ (never hand-edited).

Used by the package build (setup.py, so that every wheel carries them) and by `make protos`
(for a source checkout):

    python protos/generate.py [--out ROOT]    # writes ROOT/esm2_wire/gen/ and ROOT/gateway/esm2_descriptor.pb
"""

from __future__ import annotations

import argparse
import importlib.util
import re
from pathlib import Path

PROTOS = Path(__file__).resolve().parent
REPO = PROTOS.parent
PROTO = "esm/v1/esm2.proto"
GEN_PACKAGE = "esm2_wire.gen"
GEN_DIR = Path(*GEN_PACKAGE.split("."))
DESCRIPTOR = Path("gateway/esm2_descriptor.pb")


def _include_dirs() -> list[str]:
    """protos/, grpc_tools' well-known types, and googleapis-common-protos' google/api."""
    import grpc_tools

    google_api = importlib.util.find_spec("google.api").submodule_search_locations[0]
    return [str(PROTOS), str(Path(grpc_tools.__file__).parent / "_proto"), str(Path(google_api).parent.parent)]


def _protoc(*args: str) -> None:
    from grpc_tools import protoc

    argv = ["grpc_tools.protoc", *(f"-I{d}" for d in _include_dirs()), *args, str(PROTOS / PROTO)]
    if protoc.main(argv) != 0:
        raise RuntimeError(f"protoc failed: {' '.join(argv)}")


def generate(out: Path = REPO) -> list[Path]:
    """Write the stubs under out/esm2_wire/gen and the descriptor set at out/gateway/; returns the files."""
    gen = out / GEN_DIR
    (gen / "esm" / "v1").mkdir(parents=True, exist_ok=True)
    _protoc(f"--python_out={gen}", f"--pyi_out={gen}", f"--grpc_python_out={gen}")
    # protoc writes `from esm.v1 import esm2_pb2`, which would find fair-esm's `esm` package.
    grpc_module = gen / "esm" / "v1" / "esm2_pb2_grpc.py"
    text = re.sub(r"^from esm\.v1 import", f"from {GEN_PACKAGE}.esm.v1 import", grpc_module.read_text(), flags=re.M)
    grpc_module.write_text(text)
    for package in (gen, gen / "esm", gen / "esm" / "v1"):
        (package / "__init__.py").touch()
    descriptor = out / DESCRIPTOR
    descriptor.parent.mkdir(parents=True, exist_ok=True)
    _protoc("--include_imports", "--include_source_info", f"--descriptor_set_out={descriptor}")
    return sorted(p for p in gen.rglob("*") if p.is_file()) + [descriptor]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO, help="root to write into (default: the repository)")
    for path in generate(parser.parse_args().out):
        print(path)
