"""Shared fixtures: random-weight checkpoints and real servers on 127.0.0.1."""

from __future__ import annotations

from pathlib import Path

import pytest
from support import ServerProcess

from esm2_wire.proto import pb_grpc
from service.models.checkpoints import load
from service.models.random_checkpoints import write_random_checkpoint


@pytest.fixture(scope="session")
def checkpoint_dir(tmp_path_factory) -> Path:
    """Random-weight checkpoints in fair-esm's format: tiny and the real 8M shape."""
    directory = tmp_path_factory.mktemp("checkpoints")
    write_random_checkpoint("tiny", directory, seed=1)
    write_random_checkpoint("8m", directory, seed=2)
    return directory


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoint_dir) -> Path:
    return checkpoint_dir / "esm2_t2_tiny_random.pt"


@pytest.fixture(scope="session")
def reference_models(checkpoint_dir, tiny_checkpoint):
    """Models loaded in the test process through the same loader, for direct fair-esm passes."""
    return {
        "esm2-tiny": load("esm2-tiny", tiny_checkpoint),
        "esm2-8m": load("esm2-8m", checkpoint_dir / "esm2_t6_8M_UR50D.pt"),
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint_dir, tiny_checkpoint):
    """A server with the tiny model as esm2-tiny and the 8M shape as esm2-8m."""
    proc = ServerProcess(
        tmp_path_factory.mktemp("server"),
        "--models", "esm2-tiny,esm2-8m",
        "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
        "--model-dir", str(checkpoint_dir),
    ).wait_ready()
    yield proc
    proc.stop()


@pytest.fixture
def stub(server) -> pb_grpc.Esm2ServiceStub:
    return server.stub

