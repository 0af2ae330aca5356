"""Shared fixtures: random-weight checkpoints, real servers and gateways on 127.0.0.1; and the
markers `unit` (tests/unit) and `e2e` (the rest). `slow` and `packaging` are marked in place."""

from __future__ import annotations

from pathlib import Path

import pytest
import suite_order
from support import start_gateway, start_server

from esm2_wire.proto import pb_grpc
from service.models.checkpoints import load
from service.models.random_checkpoints import write_random_checkpoint

_UNIT = Path(__file__).parent / "unit"


def pytest_configure(config) -> None:
    suite_order.configure(config)


@pytest.hookimpl(tryfirst=True)  # before xdist reads the xdist_group marks
def pytest_collection_modifyitems(config, items) -> None:
    """tests/unit is `unit` (no server, no model file); everything else starts real processes: `e2e`.
    Then the groups and order of parallel runs (suite_order)."""
    for item in items:
        item.add_marker(pytest.mark.unit if _UNIT in Path(item.fspath).parents else pytest.mark.e2e)
    suite_order.arrange(config, items)


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
def tiny(tiny_checkpoint) -> dict[str, Path]:
    """`models=` for start_server: the tiny checkpoint as esm2-tiny."""
    return {"esm2-tiny": tiny_checkpoint}


@pytest.fixture(scope="session")
def reference_models(checkpoint_dir, tiny_checkpoint):
    """Models loaded in the test process through the same loader, for direct fair-esm passes."""
    return {
        "esm2-tiny": load("esm2-tiny", tiny_checkpoint),
        "esm2-8m": load("esm2-8m", checkpoint_dir / "esm2_t6_8M_UR50D.pt"),
    }


@pytest.fixture(scope="session")
def server(tmp_path_factory, checkpoint_dir, tiny):
    """A server with the tiny model as esm2-tiny and the 8M shape as esm2-8m."""
    with start_server(tmp_path_factory.mktemp("server"), models={**tiny, "esm2-8m": None},
                      model_dir=checkpoint_dir) as proc:
        yield proc


@pytest.fixture(scope="module")
def gateway(server, tmp_path_factory):
    """An Envoy in front of `server`: the shared one, or the module's own where it defines one."""
    envoy = start_gateway(tmp_path_factory.mktemp("gateway"), server.port)
    yield envoy
    envoy.stop()


@pytest.fixture
def stub(server) -> pb_grpc.Esm2ServiceStub:
    return server.stub


@pytest.fixture
def server_factory(tmp_path):
    """start_server for one test, logging to its tmp_path; stops every server it started."""
    started = []

    def start(*args: str, **kwargs):
        started.append(start_server(kwargs.pop("log_dir", tmp_path), *args, **kwargs))
        return started[-1]

    yield start
    for proc in reversed(started):
        proc.stop()


@pytest.fixture
def gateway_factory(tmp_path):
    """start_gateway for one test, logging to its tmp_path; stops every Envoy it started."""
    started = []

    def start(upstream_port: int, **config):
        started.append(start_gateway(config.pop("log_dir", tmp_path), upstream_port, **config))
        return started[-1]

    yield start
    for envoy in reversed(started):
        envoy.stop()
