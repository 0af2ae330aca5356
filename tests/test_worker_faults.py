"""The model worker failing (issue 9, section 5), through the test-only fault hook.

The hook is armed by ESM_FAULT_FILE at start-up (service.engine.faults); a test writes a fault name
into that file. A failing batch fails only its items (gRPC INTERNAL, HTTP 500 through Envoy)
and serving goes on. A dead worker thread or an unusable device fails all accepted work with
UNAVAILABLE (HTTP 503 with Retry-After), reports NOT_SERVING and exits with status 3.
"""

from __future__ import annotations

import itertools
import os
import threading
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from support import body, encode_request, post, start_gateway, start_server, wait_for

from service.engine.scheduler import WORKER_LOST
from service.server import EXIT_WORKER_LOST

_USED = itertools.count()


def fresh() -> str:
    """A sequence no earlier call sent: identical items in flight are merged and results cached."""
    n = next(_USED)
    return "MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" + "ACDEFGHIKLMNPQRSTVWY"[n % 20] * (1 + n // 20)


def arm(fault_file: Path, fault: str) -> None:
    """Atomically, so the worker never reads half a name."""
    staging = fault_file.with_suffix(".staging")
    staging.write_text(fault)
    os.replace(staging, fault_file)


ONE_ITEM_PER_BATCH = ("--max-batch-size", "1")


def fault_hook(fault_file: Path) -> dict:
    """The environment that arms the fault hook, read from `fault_file`."""
    return {"ESM_FAULT_FILE": str(fault_file)}


@pytest.fixture(scope="module")
def faulty(tmp_path_factory, tiny):
    tmp = tmp_path_factory.mktemp("faulty")
    with start_server(tmp, *ONE_ITEM_PER_BATCH, models=tiny, env=fault_hook(tmp / "fault")) as proc:
        envoy = start_gateway(tmp, proc.port)
        yield proc, envoy, tmp / "fault"
        envoy.stop()


def test_failing_batch_is_500_through_the_gateway_and_serving_goes_on(faulty):
    proc, envoy, fault_file = faulty
    arm(fault_file, "batch-error")
    failed = post(envoy, "/api/v3/esm2-tiny/encode/", body([fresh()]))
    assert failed.status_code == 500, failed.text
    assert failed.json()["message"] == "model failure; see the server log"
    assert "injected" not in failed.text  # internals stay in the log
    assert post(envoy, "/api/v3/esm2-tiny/encode/", body([fresh()])).status_code == 200

    arm(fault_file, "batch-error")
    with pytest.raises(grpc.RpcError) as info:
        proc.stub.Encode(encode_request("esm2-tiny", [fresh()]), timeout=30)
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert len(proc.stub.Encode(encode_request("esm2-tiny", [fresh()]), timeout=30).results) == 1
    health = health_pb2_grpc.HealthStub(proc.channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    assert proc.proc.poll() is None


@pytest.mark.parametrize("fault", ["device-error", "worker-exit"])
def test_lost_worker_fails_accepted_work_reports_not_serving_and_exits(tmp_path, tiny, server_factory,
                                                                      gateway_factory, fault):
    fault_file = tmp_path / "fault"
    proc = server_factory(*ONE_ITEM_PER_BATCH, models=tiny, env=fault_hook(fault_file))
    envoy = gateway_factory(proc.port)
    statuses: list[int] = []
    watch = health_pb2_grpc.HealthStub(proc.channel).Watch(health_pb2.HealthCheckRequest(), timeout=120)
    watcher = threading.Thread(target=lambda: statuses.extend(r.status for r in _until_error(watch)))
    watcher.start()

    grpc_results: list = []
    json_results: list = []

    def grpc_call():
        try:
            proc.stub.Encode(encode_request("esm2-tiny", [fresh()]), timeout=120)
            grpc_results.append(("OK", "", ()))
        except grpc.RpcError as exc:
            grpc_results.append((exc.code(), exc.details(), exc.trailing_metadata()))

    def json_call():
        json_results.append(post(envoy, "/api/v3/esm2-tiny/encode/", body([fresh()])))

    arm(fault_file, "stall")  # the next batch waits in the worker until the fault is written
    threads = [threading.Thread(target=grpc_call)]
    threads[0].start()
    wait_for(lambda: proc.metric("esm_worker_busy") == 1, "the stalled batch")
    more = [threading.Thread(target=call) for call in [grpc_call, json_call] * 3]
    for thread in more:
        thread.start()
    wait_for(lambda: proc.metric("esm_queue_items") == 6, "six queued requests")
    arm(fault_file, fault)
    for thread in threads + more:
        thread.join(120)
        assert not thread.is_alive(), "a request hung"

    assert proc.proc.wait(60) == EXIT_WORKER_LOST
    watcher.join(30)
    log = proc.log()
    assert "model worker lost" in log and f"exiting with status {EXIT_WORKER_LOST}" in log

    assert len(grpc_results) == 4 and len(json_results) == 3
    for code, details, trailers in grpc_results:
        assert code == grpc.StatusCode.UNAVAILABLE
        assert details == WORKER_LOST
        assert ("retry-after", "1") in tuple(trailers)
    for response in json_results:
        assert response.status_code == 503, response.text
        assert response.headers.get("retry-after") == "1"
        # Envoy retries UNAVAILABLE on another replica (the fleet's failover). This gateway has
        # one, so a retry can only find it gone, and Envoy then answers its own 503.
        message = response.json()["detail"]
        assert message == WORKER_LOST or message.startswith("upstream connect error"), message
    assert health_pb2.HealthCheckResponse.NOT_SERVING in statuses
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING


def _until_error(stream):
    try:
        yield from stream
    except grpc.RpcError:
        return


def test_fault_hook_is_off_without_the_environment_variable(server):
    """The shared server runs without ESM_FAULT_FILE: no hook object exists to reach."""
    assert "fault injection armed" not in server.log()
