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


def test_the_launcher_writes_only_json_lines_envoys_included(tmp_path, tiny_checkpoint):
    """Issue 32: under --log-format json about half the launcher's output was Envoy's plain text
    (its access log and its own log). Now its own lines, the server's and Envoy's are all JSON,
    and Envoy's access lines name the method the client sent (GET, not the transcoder's POST)."""
    import signal
    import subprocess
    import sys

    import requests
    from support import REPO, free_port

    http_port = free_port()
    output = tmp_path / "launch.log"
    with open(output, "wb") as sink:
        launcher = subprocess.Popen(
            [sys.executable, "-m", "gateway.launch", "--http-host", "127.0.0.1", "--http-port", str(http_port),
             "--log-format", "json", "--envoy-log-level", "info", "--access-log", "--metrics-port", "0",
             "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}", "--offline"],
            cwd=REPO, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            url = f"http://127.0.0.1:{http_port}"
            wait_for(lambda: launcher.poll() is not None or requests.get(url + "/healthz", timeout=2).status_code == 200,
                     lambda: output.read_text(), timeout=120)
            assert requests.get(url + "/api/v3/models", headers={"x-request-id": "json-get"}, timeout=30).ok
            assert requests.post(url + "/api/v3/esm2-tiny/encode/", json={"items": [{"sequence": "MKTAY"}]},
                                 headers={"x-request-id": "json-post"}, timeout=30).ok
            requests.get(url + '/api/v3/a"b', headers={"x-request-id": "json-quote"}, timeout=30)
            wait_for(lambda: '"json-quote"' in output.read_text(), lambda: output.read_text(), timeout=30)
        finally:
            launcher.send_signal(signal.SIGTERM)
            launcher.wait(60)
    lines = [line for line in output.read_text().splitlines() if line.strip()]
    entries = []
    for line in lines:
        entry = json.loads(line)  # a line that is not JSON fails here
        assert {"time", "level", "logger", "message"} <= set(entry), entry
        entries.append(entry)
    loggers = {e["logger"] for e in entries}
    assert "gateway" in loggers and "service.access" in loggers and "envoy.access" in loggers
    assert any(name.startswith("envoy.") and name != "envoy.access" for name in loggers)  # Envoy's own log
    access = {e["request_id"]: e for e in entries if e["logger"] == "envoy.access"}
    assert (access["json-get"]["method"], access["json-get"]["path"], access["json-get"]["http_status"]) == (
        "GET", "/api/v3/models", 200)
    assert (access["json-post"]["method"], access["json-post"]["path"]) == ("POST", "/api/v3/esm2-tiny/encode/")
    assert access["json-quote"]["path"] == "/api/v3/a%22b" and access["json-quote"]["http_status"] == 400
