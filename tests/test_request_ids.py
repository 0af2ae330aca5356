"""Request ids end to end: Envoy makes one or keeps a caller's valid one, the server reads it (or
makes one for gRPC callers that bypass Envoy), and it shows up in response headers, gRPC
trailers, every JSON error body, the server's log lines and the client's exceptions."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid

import grpc
import pytest
import requests
from support import REPO, ServerProcess, encode_request, free_port, wait_for

from esm2_client.client import Esm2Client, Esm2Error
from gateway.envoy_config import GatewayConfig
from gateway.launch import EnvoyProcess
from service.request_context import MAX_REQUEST_ID_CHARS

UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
# Not kept: too long, odd characters, a leading separator (each is replaced by a fresh UUID).
REFUSED_IDS = ["x" * (MAX_REQUEST_ID_CHARS + 1), "id<script>alert(1)</script>", "-leading", "a b", "ünïcode"]


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tiny_checkpoint):
    """A server with access lines on, and an Envoy in front of it."""
    tmp = tmp_path_factory.mktemp("request-ids")
    server = ServerProcess(tmp, "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
                           "--access-log").wait_ready()
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=server.port),
                         log_path=tmp / "envoy.log").wait_listening()
    yield server, envoy
    envoy.stop()
    server.stop()


def encode(envoy, sequence="MKTAYIAKQR", headers=None, **kwargs) -> requests.Response:
    return requests.post(envoy.url + "/api/v3/esm2-tiny/encode/", json={"items": [{"sequence": sequence}]},
                         headers=headers, timeout=60, **kwargs)


def access_lines(server, request_id: str) -> list[str]:
    return [line for line in server.log().splitlines() if request_id in line and "service.access" in line]


def wait_for_access_line(server, request_id: str) -> str:
    wait_for(lambda: access_lines(server, request_id), timeout=30)
    return access_lines(server, request_id)[0]


# ---- JSON through Envoy -------------------------------------------------------------------
def test_envoy_makes_an_id_the_server_logs_and_the_response_carries(stack):
    server, envoy = stack
    response = encode(envoy)
    assert response.status_code == 200, response.text
    request_id = response.headers["x-request-id"]
    assert UUID.fullmatch(request_id), request_id
    line = wait_for_access_line(server, request_id)
    assert "EncodeJson esm2-tiny OK items=1 residues=10" in line, line


def test_a_callers_valid_id_is_kept_everywhere(stack):
    server, envoy = stack
    mine = "client-run:42.A_b-" + uuid.uuid4().hex
    ok = encode(envoy, headers={"x-request-id": mine})
    assert ok.status_code == 200 and ok.headers["x-request-id"] == mine
    bad = encode(envoy, sequence="MKT1", headers={"x-request-id": mine + "-2"})
    assert bad.status_code == 400, bad.text
    assert bad.headers["x-request-id"] == mine + "-2"
    body = bad.json()
    assert body["request_id"] == mine + "-2"
    assert body["errors"][0]["field"] == "items[0].sequence"  # BioLM's keys are all still there
    assert {"detail", "errors", "status_code", "code", "message"} <= set(body)
    assert "INVALID_ARGUMENT" in wait_for_access_line(server, mine + "-2")
    wait_for_access_line(server, mine)
    wait_for(lambda: f"id={mine}-2" in envoy.log(), timeout=30)  # Envoy's access log line


@pytest.mark.parametrize("odd", REFUSED_IDS)
def test_a_long_or_odd_id_is_replaced_never_echoed(stack, odd):
    server, envoy = stack
    header = odd.encode("utf-8")  # sent as raw bytes (requests would refuse the non-latin-1 one)
    response = encode(envoy, sequence="MKT1", headers={"x-request-id": header})
    assert response.status_code == 400, response.text
    request_id = response.headers["x-request-id"]
    assert UUID.fullmatch(request_id), request_id
    assert response.json()["request_id"] == request_id
    assert odd not in response.text
    wait_for_access_line(server, request_id)
    assert odd not in server.log()


def test_envoy_made_errors_carry_the_id_too(stack):
    _, envoy = stack
    # The Lua filter's 415, and the transcoder's 404 for a path the API does not have.
    wrong_type = requests.post(envoy.url + "/api/v3/esm2-tiny/encode/", data="{}", timeout=30,
                               headers={"content-type": "text/plain", "x-request-id": "mine-415"})
    assert wrong_type.status_code == 415
    assert wrong_type.headers["x-request-id"] == "mine-415"
    assert wrong_type.json()["request_id"] == "mine-415"
    missing = requests.get(envoy.url + "/api/v3/nothing/here", timeout=30, headers={"x-request-id": "y" * 300})
    assert missing.status_code == 404
    request_id = missing.headers["x-request-id"]
    assert UUID.fullmatch(request_id) and missing.json()["request_id"] == request_id


# ---- gRPC, direct and through Envoy -------------------------------------------------------
def _trailing_id(call) -> str:
    return dict(call.trailing_metadata())["x-request-id"]


@pytest.mark.parametrize("through_envoy", [False, True], ids=["direct", "envoy"])
def test_grpc_callers_get_the_id_in_trailing_metadata(stack, through_envoy):
    server, envoy = stack
    target = envoy.url.removeprefix("http://") if through_envoy else server.target
    with grpc.insecure_channel(target) as channel:
        from esm2_wire.proto import pb_grpc

        stub = pb_grpc.Esm2ServiceStub(channel)
        _, call = stub.Encode.with_call(encode_request("esm2-tiny", ["MKTAYIAKQR"]))
        made = _trailing_id(call)
        assert UUID.fullmatch(made), made
        _, call = stub.Encode.with_call(encode_request("esm2-tiny", ["MKTAYIAKQR"]),
                                        metadata=[("x-request-id", "grpc-caller-1")])
        assert _trailing_id(call) == "grpc-caller-1"
        _, call = stub.Encode.with_call(encode_request("esm2-tiny", ["MKTAYIAKQR"]),
                                        metadata=[("x-request-id", "z" * 200)])
        assert UUID.fullmatch(_trailing_id(call))
        with pytest.raises(grpc.RpcError) as failed:
            stub.Encode(encode_request("esm2-tiny", ["MKT1"]), metadata=[("x-request-id", "grpc-caller-2")])
        assert failed.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert _trailing_id(failed.value) == "grpc-caller-2"
    assert "INVALID_ARGUMENT" in wait_for_access_line(server, "grpc-caller-2")
    assert "z" * 200 not in server.log()


def test_refusals_before_decoding_carry_an_id(stack):
    """The request guard's answers (here: metadata too large) come with an id too."""
    server, _ = stack
    with grpc.insecure_channel(server.target) as channel:
        from esm2_wire.proto import pb_grpc

        with pytest.raises(grpc.RpcError) as refused:
            pb_grpc.Esm2ServiceStub(channel).Encode(encode_request("esm2-tiny", ["MKT"]),
                                                    metadata=[("x-request-id", "guarded-1"), ("x-pad", "p" * 20000)])
    assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert _trailing_id(refused.value) == "guarded-1"


# ---- the Python client and the CLI --------------------------------------------------------
def test_the_client_and_cli_surface_the_id_of_a_failed_call(stack):
    server, envoy = stack
    with Esm2Client(server.target) as client, pytest.raises(Esm2Error) as failed:
        client.encode("esm2-tiny", ["MKT1"])
    assert failed.value.code is grpc.StatusCode.INVALID_ARGUMENT
    assert UUID.fullmatch(failed.value.request_id or "")
    wait_for_access_line(server, failed.value.request_id)

    cli = subprocess.run([sys.executable, "-m", "esm2_client.cli", "predict", "--server",
                          envoy.url.removeprefix("http://"), "--model", "esm2-tiny", "-q", "MKT1<mask>"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert cli.returncode == 1, cli.stderr
    shown = re.search(r"\(request id ([0-9a-f-]{36})\)", cli.stderr)
    assert shown, cli.stderr
    assert "INVALID_ARGUMENT" in wait_for_access_line(server, shown.group(1))
