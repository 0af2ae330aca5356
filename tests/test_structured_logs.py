"""--log-format json: one JSON object per line; --access-log adds a line per RPC with what it
asked and how it went; API keys never appear."""

from __future__ import annotations

import json

import grpc
import pytest
from support import ServerProcess, encode_request, wait_for

from esm2_wire.proto import pb_grpc

KEY = "secret-key-4f1b9c2e7a"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_checkpoint):
    proc = ServerProcess(tmp_path_factory.mktemp("json-logs"), "--models", "esm2-tiny",
                         "--checkpoint", f"esm2-tiny={tiny_checkpoint}", "--log-format", "json", "--access-log",
                         env={"ESM_API_KEYS": KEY}).wait_ready()
    yield proc
    proc.stop()


def entries(server) -> list[dict]:
    """Every line of the server's log as JSON (a line that is not fails the test)."""
    return [json.loads(line) for line in server.log().splitlines() if line.strip()]


def access_entry(server, request_id: str) -> dict:
    found = lambda: [e for e in entries(server) if e["request_id"] == request_id and e["logger"] == "service.access"]  # noqa: E731
    wait_for(lambda: found(), timeout=30)
    return found()[0]


def test_every_line_is_one_json_object_with_time_level_message(server):
    lines = entries(server)
    assert any(e["message"].startswith("ready: serving") for e in lines)
    for entry in lines:
        assert {"time", "level", "logger", "message", "request_id"} <= set(entry), entry
        assert entry["time"].endswith("Z") and entry["level"] in ("INFO", "WARNING", "ERROR", "CRITICAL")


def test_access_lines_say_what_each_request_asked_and_how_it_went(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = pb_grpc.Esm2ServiceStub(channel)
        auth = ("authorization", f"Token {KEY}")
        stub.Encode(encode_request("esm2-tiny", ["MKTAYIAKQR", "MKTAY"]), metadata=[auth, ("x-request-id", "ok-1")])
        with pytest.raises(grpc.RpcError):
            stub.Encode(encode_request("esm2-tiny", ["MKT1"]), metadata=[auth, ("x-request-id", "bad-1")])
    ok = access_entry(server, "ok-1")
    assert ok["method"] == "Encode" and ok["model"] == "esm2-tiny" and ok["status"] == "OK"
    assert ok["items"] == 2 and ok["residues"] == 15
    assert 0 <= ok["queue_wait_s"] <= ok["latency_s"]
    bad = access_entry(server, "bad-1")
    assert bad["status"] == "INVALID_ARGUMENT" and bad["queue_wait_s"] is None  # refused before queueing
    assert KEY not in server.log()
