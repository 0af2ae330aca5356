"""Hostile and careless input at the JSON gateway (issue 9): a real Envoy in front of a real server.

Every case is answered fast with a 4xx in BioLM's error shape naming the problem; none
reaches the model, hangs, answers 200 for something else, or costs other callers.
"""

from __future__ import annotations

import gzip
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import zlib

import pytest
import requests
from support import REPO, free_port, start_gateway, wait_for

from gateway.envoy_config import GatewayConfig, render
from gateway.launch import EnvoyProcess

JSON = {"Content-Type": "application/json"}
ENCODE = "/api/v3/esm2-tiny/encode/"
PREDICT = "/api/v3/esm2-tiny/predict/"
OK_BODY = {"items": [{"sequence": "MKTAYIAKQR"}]}
# A hang shows as a timeout here; the answers below come in milliseconds.
HANG = 20


@pytest.fixture(scope="module")
def edge(server, tmp_path_factory):
    envoy = start_gateway(tmp_path_factory.mktemp("edge"), server.port, request_headers_timeout_s=2,
                          request_receive_timeout_s=3, connection_idle_timeout_s=3)
    yield envoy
    envoy.stop()


def send(envoy, path=ENCODE, data: bytes | str | None = None, headers=None, method="post") -> requests.Response:
    if data is None:
        data = json.dumps(OK_BODY)
    return requests.request(method, envoy.url + path, data=data, headers={**JSON, **(headers or {})}, timeout=HANG)


def assert_error(response: requests.Response, status: int, *fragments: str) -> dict:
    """BioLM's error shape: detail, errors, status_code, code (message kept), naming the problem."""
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()
    assert set(error) >= {"detail", "errors", "status_code", "code", "message"}, error
    assert error["status_code"] == status and error["detail"] and error["detail"] == error["message"]
    assert isinstance(error["errors"], list)
    for fragment in fragments:
        assert fragment in error["detail"], error["detail"]
    return error


def requests_seen(server, method="EncodeJson") -> float:
    return sum(v for k, v in server.metrics().items() if k.startswith("esm_requests_total") and method in k)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("VmRSS:"))


def gzip_bomb(mebibytes: int) -> bytes:
    """A valid gzip member of one JSON item whose sequence is `mebibytes` MiB of 'A'.

    Deflate output after a full flush depends only on the input, so one compressed MiB
    repeats; CRC and length are those of the whole text.
    """
    deflate = zlib.compressobj(9, zlib.DEFLATED, -15)
    head, chunk, tail = b'{"items": [{"sequence": "', b"A" * (1 << 20), b'"}]}'
    first = deflate.compress(head) + deflate.flush(zlib.Z_FULL_FLUSH)
    middle = deflate.compress(chunk) + deflate.flush(zlib.Z_FULL_FLUSH)
    last = deflate.compress(tail) + deflate.flush()
    crc = zlib.crc32(head)
    for _ in range(mebibytes):
        crc = zlib.crc32(chunk, crc)
    crc = zlib.crc32(tail, crc)
    size = len(head) + len(chunk) * mebibytes + len(tail)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff" + first + middle * mebibytes + last
            + crc.to_bytes(4, "little") + (size % (1 << 32)).to_bytes(4, "little"))


def test_gzip_bomb_helper_is_valid_gzip():
    assert gzip.decompress(gzip_bomb(3)) == b'{"items": [{"sequence": "' + b"A" * (3 << 20) + b'"}]}'


# ---- 1. sizes and bombs --------------------------------------------------------------
def test_oversized_body_is_413_from_envoy_before_the_server(edge, server):
    before = requests_seen(server)
    body = json.dumps({"items": [{"sequence": "A" * (12 << 20)}]})
    response = send(edge, data=body)
    assert_error(response, 413, "buffer size exceeds the configured limit")
    assert requests_seen(server) == before  # never parsed, never sent upstream


def test_gzip_bomb_is_413_and_memory_stays_flat(edge, server):
    """1 MiB of gzip inflating to 1 GiB, four at once: refused at 4 MiB of output."""
    bomb_bytes = gzip_bomb(1024)
    assert len(bomb_bytes) < 1.1 * (1 << 20)
    assert zlib.decompressobj(31).decompress(bomb_bytes, 1 << 20).startswith(b'{"items": [{"sequence": "AAAA')
    envoy_before, server_before = rss_kib(edge.proc.pid), rss_kib(server.proc.pid)
    answers: list[requests.Response] = []
    threads = [threading.Thread(target=lambda: answers.append(send(edge, data=bomb_bytes, headers={"Content-Encoding": "gzip"})))
               for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for response in answers:
        assert_error(response, 413, "decompressed request body exceeds 4194304 bytes")
    # Each bomb costs at most --max-request-bytes of inflated text, briefly.
    assert rss_kib(edge.proc.pid) - envoy_before < 64 << 10
    assert rss_kib(server.proc.pid) - server_before < 128 << 10
    assert send(edge).status_code == 200


def test_inflated_body_at_the_cap_is_accepted(edge):
    payload = json.dumps({"items": [{"sequence": "A" * 2048}] * 8}).encode()
    response = send(edge, data=gzip.compress(payload), headers={"Content-Encoding": "gzip"})
    assert response.status_code == 200, response.text


# ---- 1. connections ------------------------------------------------------------------
def _closed_within(sock: socket.socket, seconds: float, trickle: bytes = b"") -> bytes:
    """Send `trickle` a byte every 0.2 s until the peer closes; what it answered."""
    sock.settimeout(0.2)
    answer = b""
    end = time.monotonic() + seconds
    position = 0
    while time.monotonic() < end:
        try:
            if position < len(trickle):
                sock.sendall(trickle[position:position + 1])
                position += 1
            data = sock.recv(4096)
            if not data:
                return answer
            answer += data
        except socket.timeout:
            continue
        except (ConnectionResetError, BrokenPipeError):
            return answer
    raise AssertionError(f"connection still open after {seconds}s; got {answer!r}")


def test_header_trickle_is_cut_off(edge):
    with socket.create_connection(("127.0.0.1", edge.config.http_port)) as sock:
        trickle = b"POST /api/v3/esm2-tiny/encode/ HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 1000
        answer = _closed_within(sock, 10, trickle)
    assert answer == b"" or b" 408 " in answer.split(b"\r\n")[0]


def test_body_trickle_is_cut_off(edge):
    with socket.create_connection(("127.0.0.1", edge.config.http_port)) as sock:
        sock.sendall(b"POST /api/v3/esm2-tiny/encode/ HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 1000\r\n\r\n")
        answer = _closed_within(sock, 10, b"{" + b" " * 999)
    assert b" 408 " in answer.split(b"\r\n")[0], answer


def test_idle_connection_is_closed(edge):
    with socket.create_connection(("127.0.0.1", edge.config.http_port)) as sock:
        _closed_within(sock, 10)


def _open(sockets: list[socket.socket]) -> int:
    count = 0
    for sock in sockets:
        sock.setblocking(False)
        try:
            count += sock.recv(1) != b""
        except BlockingIOError:
            count += 1
        except OSError:
            pass
        sock.setblocking(True)
    return count


def _answers(url: str) -> bool:
    try:
        requests.get(url, timeout=5)
        return True
    except requests.ConnectionError:
        return False


def test_health_answers_while_connections_are_exhausted(server, tmp_path):
    envoy = start_gateway(tmp_path, server.port, max_connections=20, health_port=free_port())
    held = []
    try:
        for _ in range(40):  # twice the limit: the rest are refused or closed at once
            held.append(socket.create_connection(("127.0.0.1", envoy.config.http_port)))

        def main_port_refuses() -> bool:
            """True once Envoy refuses more; a free place (a probe took a held one's turn while
            Envoy was still accepting them) is taken by one more held connection."""
            if _answers(envoy.url + "/healthz"):
                held.append(socket.create_connection(("127.0.0.1", envoy.config.http_port)))
                return False
            return True

        wait_for(main_port_refuses, lambda: f"the main port to refuse more; {_open(held)} held open", timeout=10)
        health = requests.get(f"http://127.0.0.1:{envoy.config.health_port}/healthz", timeout=5)
        assert health.status_code == 200
    finally:
        for sock in held:
            sock.close()
        envoy.stop()


# ---- 2. strict JSON ------------------------------------------------------------------
STRICT = [
    ('{"items": [{"sequence": "MKT"}], "params": {"includes": ["logits"]}}', ["params", "unknown field 'includes'"]),
    ('{"items": [{"sequence": "MKT"}], "items": [{"sequence": "MKK"}]}', ["duplicate key 'items'"]),
    ('{"items": {"sequence": "MKT"}}', ["items: expected an array, got an object"]),
    ('{"items": [{"sequence": "MKT"}], "params": {"include": "logits"}}', ["params.include: expected an array"]),
    ('{"items": [{"sequence": "MKT"}], "params": {"repr_layers": 1}}', ["params.repr_layers: expected an array"]),
    ('{"items": [{"sequence": "MKT"}], "params": {"include": [null]}}', ["params.include[0]: expected a string, got null"]),
    ('{"items": [null]}', ["items[0]: expected an object, got null"]),
    ('{"items": [{"sequence": "MKT"},]}', ["invalid JSON"]),
    ("{'items': [{'sequence': 'MKT'}]}", ["invalid JSON", "double quotes"]),
    ('{"model": "esm2-8m", "items": [{"sequence": "MKT"}]}', ["unknown field 'model'", "URL path"]),
    ('{"items": [{"sequence": "MKT", "extra": 1}]}', ["items[0]: unknown field 'extra'"]),
    ('{"items": [{"sequence": "MKT"}], "params": {"repr_layers": [NaN]}}', ["NaN"]),
    ('{"items": [{"sequence": "MKT"}], "params": {"repr_layers": [true]}}', ["params.repr_layers[0]: expected an integer"]),
    (b'{"items": [{"sequence": "MK\xff"}]}', ["not UTF-8"]),
    ("[]", ["body: expected an object"]),
]


@pytest.mark.parametrize("data, fragments", STRICT)
def test_strict_json_is_400_naming_the_problem(edge, data, fragments):
    assert_error(send(edge, data=data), 400, *fragments)


def test_item_problems_name_index_and_field(edge):
    error = assert_error(send(edge, data=json.dumps({"items": [{"sequence": "MKT"}, {"sequence": "MK1"}, {}]})), 400)
    assert {"index": 2, "field": "items[2]", "detail": "missing required field 'sequence'"} in error["errors"]
    error = assert_error(send(edge, data=json.dumps({"items": [{"sequence": "MKT"}, {"sequence": "MK1"}]})), 400)
    assert [(e["index"], e["field"]) for e in error["errors"]] == [(1, "items[1].sequence")]
    assert "position 3" in error["errors"][0]["detail"]  # 1-based: the third letter


@pytest.mark.parametrize("query", ["?params.include=logits", "?items.sequence=AAAA", "?model=esm2-8m", "?body.data=e30="])
def test_query_strings_cannot_inject_fields(edge, query):
    assert_error(send(edge, ENCODE + query), 400, "query parameters are not accepted")


@pytest.mark.parametrize("path", ["/api/v3/schema/esm2-tiny/score/?action=predict",
                                  "/api/v3/schema/esm2-tiny/encode/?model=esm2-8m", "/api/v3/docs?file=docs.js",
                                  "/api/v3/docs?unknown=1", "/api/v3/models?x=%22", "/api/v3/openapi.json?"
                                  "a=%ZZ"])
def test_the_path_alone_decides_model_and_action(edge, path):
    """Issue 32: a query on a GET route overrode the path's fields (?action= answered the predict
    schema), and an unknown one named the internal type esm.v1.GetDocsPageRequest."""
    response = requests.get(edge.url + path, timeout=HANG)
    assert_error(response, 400, "query parameters are not accepted: the URL path names the model and action")
    assert "esm.v1" not in response.text


JSON_READS = ["/api/v3/docs", "/api/v3/models", "/api/v3/openapi.json", "/api/v3/schema/esm2-tiny/encode/",
              "/api/v3/docs/docs.js", "/api/v3/schema/esm2-tiny/nope/"]


@pytest.mark.parametrize("path", JSON_READS)
def test_head_answers_like_get_without_a_body(edge, path):
    got = requests.get(edge.url + path, timeout=HANG, headers={"Accept-Encoding": "identity"})
    head = requests.head(edge.url + path, timeout=HANG, headers={"Accept-Encoding": "identity"})
    assert (head.status_code, head.headers["content-type"]) == (got.status_code, got.headers["content-type"])
    assert head.headers["content-length"] == str(len(got.content)) and head.content == b""


def test_no_grpc_headers_reach_json_callers(edge):
    answers = [requests.get(edge.url + path, timeout=HANG) for path in JSON_READS]
    answers += [send(edge), send(edge, "/api/v3/esm2-tiny/log_prob/"), send(edge, data=b"{"),
                send(edge, "/api/v3/esm2-tiny/score/", json.dumps({"items": [{"sequence": "MKT", "variants": ["M1A"]}]}))]
    assert {a.status_code for a in answers} == {200, 400, 404}
    for answer in answers:
        assert not [name for name in answer.headers if name.lower().startswith("grpc-")], answer.headers


def test_the_access_log_shows_what_the_client_sent_escaped(edge):
    """Issue 32: transcoded GETs were logged as POST, and a quote in the path ended the quoted field."""
    tag = f"{time.monotonic_ns()}"
    requests.get(f"{edge.url}/api/v3/models", headers={"x-request-id": f"get-{tag}"}, timeout=HANG)
    requests.head(f"{edge.url}/api/v3/docs", headers={"x-request-id": f"head-{tag}"}, timeout=HANG)
    send(edge, headers={"x-request-id": f"post-{tag}"})
    host, port = edge.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as raw:
        raw.sendall(f'GET /api/v3/a"b\\c HTTP/1.1\r\nHost: x\r\nx-request-id: quote-{tag}\r\n'
                    f'Connection: close\r\n\r\n'.encode())
        assert b" 404 " in raw.recv(4096).split(b"\r\n")[0]

    def line(name):
        return next((l for l in edge.log().splitlines() if f"id={name}-{tag} " in l), None)

    wait_for(lambda: all(line(name) for name in ("get", "head", "post", "quote")), timeout=HANG)
    assert '"GET /api/v3/models" 200 ' in line("get")
    assert '"HEAD /api/v3/docs" 200 ' in line("head")
    assert '"POST /api/v3/esm2-tiny/encode/" 200 ' in line("post")
    assert '"GET /api/v3/a%22b%5Cc" 404 ' in line("quote") and line("quote").count('"') == 2


def test_the_path_names_the_model(edge):
    response = send(edge, "/api/v3/esm2-999/encode/", json.dumps(OK_BODY))
    assert_error(response, 404, "esm2-999")


def test_schema_forbids_what_the_parser_refuses(edge):
    schema = requests.get(edge.url + "/api/v3/schema/esm2-tiny/encode/", timeout=HANG).json()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["params"]["additionalProperties"] is False
    assert schema["properties"]["items"]["items"]["additionalProperties"] is False


# ---- 3. statuses, content types, encodings -------------------------------------------
@pytest.mark.parametrize("content_type", [None, "text/plain", "application/x-www-form-urlencoded", "application/xml",
                                          "multipart/form-data; boundary=x", "application/jsonp"])
def test_only_json_bodies_are_accepted(edge, server, content_type):
    before = requests_seen(server)
    headers = {"Content-Type": content_type} if content_type else {}
    response = requests.post(edge.url + ENCODE, data=json.dumps(OK_BODY), headers=headers, timeout=HANG)
    assert_error(response, 415, "Content-Type must be application/json")
    assert requests_seen(server) == before


def test_json_with_charset_is_accepted(edge):
    assert send(edge, headers={"Content-Type": "application/json; charset=utf-8"}).status_code == 200


def _gzip_variants() -> list:
    good = gzip.compress(json.dumps(OK_BODY).encode())
    bad_crc = bytearray(good)
    bad_crc[-6] ^= 0xFF
    return [
        pytest.param(json.dumps(OK_BODY).encode(), "incorrect header check", id="plain-body"),
        pytest.param(good[:-10], "truncated", id="truncated"),
        pytest.param(good[: len(good) // 2], "truncated", id="cut-in-half"),
        pytest.param(bytes(bad_crc), "incorrect data check", id="bad-crc"),
        pytest.param(good + b"garbage", "after the gzip stream", id="trailing-garbage"),
        pytest.param(gzip.compress(b'{"items": ['), "invalid JSON", id="malformed-json-inside"),
    ]


@pytest.mark.parametrize("data, fragment", _gzip_variants())
def test_bad_gzip_is_400_at_once(edge, data, fragment):
    response = send(edge, data=data, headers={"Content-Encoding": "gzip"})
    if fragment == "invalid JSON":
        assert_error(response, 400, "invalid JSON")
    else:
        assert_error(response, 400, "could not be decompressed", fragment)


@pytest.mark.parametrize("encoding", ["br", "deflate", "gzip, gzip", "zstd", "x-unknown"])
def test_unknown_encodings_are_415(edge, encoding):
    assert_error(send(edge, data=b"\x00\x01", headers={"Content-Encoding": encoding}), 415, "not supported")


@pytest.mark.parametrize(
    "path, headers, status, fragment",
    [
        ("/api/v3/%ff%fe/encode/", {}, 400, "percent-encoded"),
        (ENCODE, {"grpc-timeout": "zzz"}, 400, "grpc-timeout"),
        (ENCODE, {"Authorization": "Token " + "k" * 17_000}, 431, ""),
        (ENCODE, {"Authorization": "Token " + "k" * 2_000}, 401, "Authorization header is longer"),
        (ENCODE, {"X-Filler": "f" * 7_000}, 431, "request headers total"),
        (ENCODE, {"X-Filler": "f" * 59_000}, 431, ""),
        (ENCODE, {f"X-Header-{i}": "v" for i in range(120)}, 431, ""),
        (ENCODE + "x" * 3_000, {}, 414, "URL path"),
        (ENCODE + "x" * 17_000, {}, 431, ""),
    ],
)
def test_client_faults_are_4xx_never_5xx_or_429(edge, path, headers, status, fragment):
    assert_error(send(edge, path, headers=headers), status, fragment)


def _raw(envoy, request: bytes) -> tuple[int, dict]:
    with socket.create_connection(("127.0.0.1", envoy.config.http_port), timeout=HANG) as sock:
        sock.sendall(request)
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


@pytest.mark.parametrize("request_bytes", [
    b"GET /api/v3/models#fragment HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    b"GET /api/v3/models HTTP/1.1\r\nConnection: close\r\n\r\n",
    b"GET /api/v3/models HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n",
    b"GET /api/v3/nothing-here HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
])
def test_every_envoy_reply_has_a_message(edge, request_bytes):
    status, body = _raw(edge, request_bytes)
    assert 400 <= status < 500
    assert body["detail"] and body["message"] and body["status_code"] == status


def test_biolmai_client_sees_results_and_errors(edge, server, tmp_path):
    """BioLM's own client, unchanged, pointed at the gateway (it reads BIOLMAI_BASE_API_URL)."""
    script = """
import json
from biolmai.core.http import BioLMApi
api = BioLMApi("esm2-tiny", retry_error_batches=False)
encoded = api.encode(items=[{"sequence": "MKTAYIAKQR"[: 3 + i]} for i in range(11)], params={"include": ["mean"]})
predicted = api.predict(items=[{"sequence": "MK<mask>AYI"}])
bad = api.encode(items=[{"sequence": "MK1T"}])
print(json.dumps({"encoded": encoded, "predicted": predicted, "bad": bad}))
"""
    before = requests_seen(server)
    env = {**os.environ, "BIOLMAI_BASE_API_URL": edge.url + "/api/v3", "BIOLMAI_TOKEN": "unused-no-keys-configured",
           "BIOLMAI_THREADS": "2", "HOME": str(tmp_path)}
    run = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(out["encoded"]) == 11 and all(len(r["embeddings"][0]["embedding"]) == 64 for r in out["encoded"])
    assert requests_seen(server) - before >= 3  # 11 items in batches of maxItems=8, then the bad one
    assert len(out["predicted"]["logits"]) == 6 and out["predicted"]["sequence_tokens"][2] == "<mask>"
    bad = out["bad"]  # the client copies `detail` to `error`, its mark of a failed item
    assert bad["status_code"] == 400
    assert "items[0].sequence" in bad["error"] and "'1'" in bad["error"]
    assert bad["errors"][0]["index"] == 0


# ---- 4. ports and exposure -----------------------------------------------------------
def test_second_gateway_on_a_busy_port_fails(edge, tmp_path):
    twin = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=edge.config.http_port), log_path=tmp_path / "twin.log")
    try:
        assert twin.proc.wait(30) != 0
    finally:
        twin.stop()
    assert "ddress already in use" in twin.log()


def test_second_server_on_a_busy_port_fails(server, tiny_checkpoint):
    run = subprocess.run(
        [sys.executable, "-m", "service.server", "--host", "127.0.0.1", "--port", str(server.port), "--metrics-port", "0",
         "--offline", "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert run.returncode != 0
    assert "address in use" in run.stderr and "ready: serving" not in run.stderr


def test_admin_is_off_by_default_and_private_when_on(tmp_path):
    assert "admin:" not in render(GatewayConfig())
    socket_path = tmp_path / "admin.sock"
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), admin_socket=socket_path),
                         log_path=tmp_path / "envoy.log").wait_listening()
    try:
        wait_for(socket_path.exists, "the admin socket", timeout=10)
        assert socket_path.stat().st_mode & 0o777 == 0o600
    finally:
        envoy.stop()


def test_authorization_never_logged_even_at_trace(server, tmp_path):
    secret = "Token sekrit-0123456789"
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=server.port),
                         log_path=tmp_path / "envoy.log", log_level="trace").wait_listening()
    try:
        for http2 in (False, True):
            if http2:
                subprocess.run(["curl", "-s", "--http2-prior-knowledge", "-H", f"Authorization: {secret}", "-H",
                                "Content-Type: application/json", "-d", json.dumps(OK_BODY), envoy.url + ENCODE],
                               capture_output=True, timeout=HANG, check=True)
            else:
                send(envoy, headers={"Authorization": secret})
        # Envoy writes a request's access-log line when the request ends, after its trace lines.
        wait_for(lambda: envoy.log().count(f'"POST {ENCODE}" ') == 2, "the access-log lines of both requests")
        log = envoy.log()
        assert "trace" in log and "sekrit" not in log
    finally:
        envoy.stop()


def test_launcher_binds_grpc_and_metrics_to_loopback(tmp_path, tiny_checkpoint):
    http_port, metrics_port = free_port(), free_port()
    launcher = subprocess.Popen(
        [sys.executable, "-m", "gateway.launch", "--http-host", "127.0.0.1", "--http-port", str(http_port),
         "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}", "--offline",
         "--metrics-port", str(metrics_port)],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )
    lines = []
    try:
        end = time.monotonic() + 120
        for line in launcher.stdout:
            lines.append(line)
            if "ready: serving" in line or time.monotonic() > end:
                break
        listening = next(line for line in lines if "gRPC listening on" in line)
        assert "gRPC listening on 127.0.0.1:" in listening
        with open("/proc/net/tcp") as table:  # metrics: 127.0.0.1 (0100007F), never 0.0.0.0
            rows = [row.split() for row in table.readlines()[1:]]
        bound = {row[1] for row in rows if row[1].endswith(f":{metrics_port:04X}") and row[3] == "0A"}
        assert bound == {f"0100007F:{metrics_port:04X}"}, bound
    finally:
        launcher.terminate()
        launcher.wait(60)


# ---- 6. OpenAPI ----------------------------------------------------------------------
def test_openapi_served_is_the_committed_document(edge):
    from service.api import openapi

    committed = (REPO / "service" / "api" / "openapi.json").read_bytes()
    assert committed == openapi.render(), "service/api/openapi.json is stale: python -m service.api.openapi > service/api/openapi.json"
    response = requests.get(edge.url + "/api/v3/openapi.json", timeout=HANG)
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    # The shared server has no API keys: the committed document less its security requirements.
    assert response.content == openapi.as_served(committed, api_keys_required=False)
    served = response.json()
    assert served["openapi"] == "3.1.0"
    assert "securitySchemes" not in served["components"]
    assert not [op for ops in served["paths"].values() for op in ops.values() if "security" in op]
    assert {k: v for k, v in served.items() if k not in ("paths", "components")} == \
        {k: v for k, v in json.loads(committed).items() if k not in ("paths", "components")}
    # Every JSON route of a model that Envoy's transcoder serves (the proto's http rules) is in the
    # document, so Swagger UI and schemathesis see each one (score_stream was missing).
    rules = re.findall(r'post: "(/api/v3/\{model\}/\w+)"', (REPO / "protos" / "esm" / "v1" / "esm2.proto").read_text())
    assert len(rules) >= 5 and {rule + "/" for rule in rules} <= set(served["paths"]), rules


@pytest.mark.slow
def test_schemathesis_finds_no_5xx_no_nonconforming_response_no_hang(tmp_path, tiny, server_factory, gateway_factory):
    """Fuzz every operation through the real Envoy, from the served document (bounded: examples and time).

    The server has small limits so that generated sequences stay cheap; longer ones are
    refused with a documented 400.
    """
    server = server_factory("--max-sequence-length", "32", "--max-items", "2", models=tiny)
    envoy = gateway_factory(server.port)
    (tmp_path / "schemathesis.toml").write_text('[parameters]\n"path.model" = "esm2-tiny"\n')  # else nearly all 404
    run = subprocess.run(
        [sys.executable, "-m", "schemathesis.cli", "run", envoy.url + "/api/v3/openapi.json",
         "--checks", "not_a_server_error,status_code_conformance,content_type_conformance,"
                     "response_schema_conformance",
         "--phases", "examples,coverage,fuzzing", "--max-examples", "10", "--seed", "9",
         "--request-timeout", "20", "--max-time", "60", "--no-shrink",
         # One worker: CPython 3.11 before 3.11.9 raises "AST constructor recursion depth
         # mismatch" when two threads compile at once (gh-106905), which schemathesis' fuzzer does.
         "--workers", "1"],
        cwd=tmp_path, capture_output=True, text=True, timeout=240,
    )
    # Exit status 0: no check failed; every generated case passed (warnings are allowed).
    assert run.returncode == 0 and re.search(r"(\d+) generated, \1 passed", run.stdout), \
        run.stdout[-6000:] + run.stderr[-2000:]
    assert server.proc.poll() is None and "Traceback" not in server.log(), server.log()[-3000:]
