"""No caller can starve the others on the way out (issue 16, attacks 1-4 and 10): unread
streams, huge unary responses and unread JSON responses, against a real Envoy and server."""

from __future__ import annotations

import http.client
import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import grpc
import numpy as np
import pytest
import requests
from support import encode_request, start_gateway, start_server, wait_for

from esm2_wire.proto import pb, pb_grpc

RESIDUES = "ACDEFGHIKLMNPQRSTVWY"
# The attackers' request: 8 copies of one 2,048-residue sequence, per_token for all 7 layers of
# the 8M shape (146 MB of float32 out; computed once, the copies merge).
LONG = "".join(np.random.default_rng(16).choice(list(RESIDUES), 2048))
ALL_LAYERS = list(range(7))
SMALL = "MKTAYIAKQRQISFVKSHFSRQ"
CALLERS = 12  # 6 gRPC and 6 JSON
STREAM_HELD_MB = 64  # the attack's 146 MB is over it; two items (36 MB) are not


def attack_request() -> pb.EncodeStreamRequest:
    return pb.EncodeStreamRequest(model="esm2-8m", params=pb.EncodeParams(include=["per_token"], repr_layers=ALL_LAYERS),
                                  items=[pb.SequenceItem(sequence=LONG)] * 8)


def own_channel(target: str) -> grpc.Channel:
    """A channel with its own connection (not shared with the test's other channels)."""
    return grpc.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1),
                                                  ("grpc.max_receive_message_length", 1 << 30)])


@pytest.fixture(scope="module")
def edge(tmp_path_factory, checkpoint_dir):
    """One server with the 8M shape and the gateway users reach it through."""
    tmp = tmp_path_factory.mktemp("isolation")
    server = start_server(tmp, "--max-stream-held-mb", str(STREAM_HELD_MB), "--max-held-response-mb", "256",
                          "--json-response-budget-mb", "600", models={"esm2-8m": None}, model_dir=checkpoint_dir)
    # No retries: with one replica, a caller refused by the JSON budget sees the 429 itself.
    envoy = start_gateway(tmp, server.port, retries=0)
    yield server, envoy
    envoy.stop()
    server.stop()


def _grpc_caller(target: str, index: int) -> float:
    with own_channel(target) as channel:
        started = time.monotonic()
        pb_grpc.Esm2ServiceStub(channel).Encode(encode_request("esm2-8m", [SMALL + RESIDUES[index]], ["mean"]),
                                                timeout=30)
        return time.monotonic() - started


def _json_caller(url: str, index: int) -> float:
    with requests.Session() as session:
        started = time.monotonic()
        response = session.post(url + "/api/v3/esm2-8m/encode/", timeout=30,
                                json={"items": [{"sequence": SMALL + RESIDUES[index]}]})
        assert response.status_code == 200, response.text[:300]
        return time.monotonic() - started


def other_callers(envoy, rounds: int) -> list[float]:
    """Latencies (s) of 6 gRPC and 6 JSON callers at once, each on its own connection, `rounds` times."""
    target = envoy.url.removeprefix("http://")
    seen = []
    with ThreadPoolExecutor(CALLERS) as pool:
        for _ in range(rounds):
            calls = [pool.submit(_grpc_caller, target, i) for i in range(CALLERS // 2)]
            calls += [pool.submit(_json_caller, envoy.url, i) for i in range(CALLERS // 2)]
            seen += [call.result(timeout=60) for call in calls]
    return seen


SCHEDULING_MARGIN_S = 0.5


def p99(latencies: list[float]) -> float:
    return float(np.percentile(latencies, 99))


def test_unread_streams_through_envoy_do_not_stall_other_callers(edge):
    """Attack 1. Before: Envoy's upstream connection window (32 MiB) was used up by a few unread
    streams (16 MiB windows each), and no other caller on that connection got an answer until
    the 300 s stream idle timeout."""
    server, envoy = edge
    other_callers(envoy, 1)  # warm: connections, caches of the callers' sequences
    idle = other_callers(envoy, 4)
    target = envoy.url.removeprefix("http://")
    channels = [own_channel(target) for _ in range(6)]
    ended = _statuses(server, "EncodeStream")["RESOURCE_EXHAUSTED"]
    try:
        attacks = [pb_grpc.Esm2ServiceStub(c).EncodeStream(attack_request(), timeout=120) for c in channels]
        for call in attacks:
            assert next(call).WhichOneof("payload") == "item_header"  # computed and flowing; then never read
        # Steady state: the server has given up on the unread streams (each held more than its per-stream
        # bound and read nothing); Envoy still holds what it took of them, and their callers keep them open.
        wait_for(lambda: _statuses(server, "EncodeStream")["RESOURCE_EXHAUSTED"] >= ended + 6,
                 "the server to give up the 6 unread streams", timeout=60)
        under_attack = other_callers(envoy, 4)
    finally:
        for channel in channels:
            channel.close()
    # A stall is the stream idle timeout (300 s). The two samples are taken seconds apart and, in a
    # parallel run, other workers' tests take the CPU in one and not the other: 25 ms latencies
    # then differ by tens of ms (p99 139 ms against 25 ms idle, in a -n 4 run), so twice the idle
    # p99 plus a scheduling margin far below any stall.
    assert p99(under_attack) <= 2 * p99(idle) + SCHEDULING_MARGIN_S, (sorted(idle), sorted(under_attack))


def _statuses(server, method: str) -> dict[str, float]:
    return {code: server.metric("esm_requests_total", f'code="{code}",method="{method}"')
            for code in ("OK", "CANCELLED", "RESOURCE_EXHAUSTED", "INTERNAL", "UNKNOWN")}


def test_unread_streams_straight_to_the_server_are_bounded(edge):
    """Attack 4. Before: each unread stream held its whole response (about 155 MB of server RSS),
    with no bound but the connection count. Now a caller that reads nothing while the server holds
    more than the per-stream bound for it is ended with RESOURCE_EXHAUSTED, and what it held is freed."""
    server, _ = edge
    before = _statuses(server, "EncodeStream")
    channels = [own_channel(server.target) for _ in range(4)]
    try:
        calls = [pb_grpc.Esm2ServiceStub(c).EncodeStream(attack_request(), timeout=120) for c in channels]
        for call in calls:
            assert next(call).WhichOneof("payload") == "item_header"
        wait_for(lambda: _statuses(server, "EncodeStream")["RESOURCE_EXHAUSTED"] >= before["RESOURCE_EXHAUSTED"] + 4,
                 "RESOURCE_EXHAUSTED for the 4 unread streams", timeout=60)
        wait_for(lambda: server.metric("esm_response_bytes_held") == 0, "no bytes held", timeout=30)
        for call in calls:  # reading now: what was already sent, then the status
            with pytest.raises(grpc.RpcError) as info:
                for _ in call:
                    pass
            assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
            message = info.value.details()
            assert f"over the {STREAM_HELD_MB} MiB per stream (--max-stream-held-mb)" in message, message
            assert "read the stream as it arrives" in message
    finally:
        for channel in channels:
            channel.close()


def test_a_reader_that_keeps_up_gets_everything(edge):
    """The same 146 MB stream, read as it arrives, is never cancelled: the bound is for slow readers."""
    server, _ = edge
    with own_channel(server.target) as channel:
        messages = list(pb_grpc.Esm2ServiceStub(channel).EncodeStream(attack_request(), timeout=120))
    chunks = [m.chunk for m in messages if m.HasField("chunk")]
    assert sum(len(c.data) for c in chunks) == 8 * 7 * 2048 * 320 * 4
    assert server.metric("esm_response_bytes_held") == 0


def test_a_stream_cancelled_while_blocked_on_its_reader_is_counted(edge):
    """Attack 10. Before: a stream cancelled while the server waited for its reader was counted
    nowhere in esm_requests_total, so attacks 1 and 4 were invisible. Then: in about 1 cancel in 6
    the pending write failed before grpc cancelled the handler, and the cancel was logged as a
    server error and counted INTERNAL. Twenty cancels make that race all but certain to show."""
    server, _ = edge
    before = _statuses(server, "EncodeStream")
    request = attack_request()
    del request.items[2:]  # 36 MB: under the per-stream bound, far over what the connection buffers
    for cancels in range(1, 21):
        with own_channel(server.target) as channel:
            call = pb_grpc.Esm2ServiceStub(channel).EncodeStream(request, timeout=120)
            assert next(call).WhichOneof("payload") == "item_header"
            wait_for(lambda: server.metric("esm_response_bytes_held") > 0, "the server to wait for us", timeout=30)
            call.cancel()
            wait_for(lambda: sum(_statuses(server, "EncodeStream").values()) == sum(before.values()) + cancels,
                     "the cancelled stream counted", timeout=30)
        assert _statuses(server, "EncodeStream")["CANCELLED"] == before["CANCELLED"] + cancels, \
            (_statuses(server, "EncodeStream"), server.log()[-2000:])
        wait_for(lambda: server.metric("esm_response_bytes_held") == 0, "no bytes held", timeout=30)
    assert "EncodeStream failed" not in server.log()


def test_huge_unary_responses_are_refused_before_any_work(edge):
    """Attack 2. Before: a unary Encode of 8 x 2,048 residues with every output (over 400 MB) was
    computed and rendered as one piece, holding the GIL for 6-8 s after its caller had gone; four at
    once delayed everyone by 23 s. Now it is refused at once, naming the streaming RPC."""
    server, _ = edge
    huge = encode_request("esm2-8m", [LONG] * 8, ["mean", "per_token", "bos", "logits", "attentions"], ALL_LAYERS)

    def attack(_) -> grpc.RpcError:
        with own_channel(server.target) as channel:
            with pytest.raises(grpc.RpcError) as info:
                pb_grpc.Esm2ServiceStub(channel).Encode(huge, timeout=3)
            return info.value

    with ThreadPoolExecutor(4) as pool:
        refusals = list(pool.map(attack, range(4)))
    for error in refusals:
        assert error.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.code(), error.details())
        assert "response too large for a unary call" in error.details()
        assert "(--max-unary-response-mb)" in error.details() and "esm.v1.Esm2Service/EncodeStream" in error.details()
    # Under the bound, the same outputs arrive whole from the new renderer (its pieces are exact copies).
    with own_channel(server.target) as channel:
        stub = pb_grpc.Esm2ServiceStub(channel)
        unary = stub.Encode(encode_request("esm2-8m", [LONG[:300]], ["per_token", "attentions"], [0, 6]), timeout=60)
        streamed = list(stub.EncodeStream(pb.EncodeStreamRequest(
            model="esm2-8m", params=pb.EncodeParams(include=["per_token", "attentions"], repr_layers=[0, 6]),
            items=[pb.SequenceItem(sequence=LONG[:300])]), timeout=60))
    chunks = {(c.output, c.layer): np.frombuffer(c.data, "<f4") for c in (m.chunk for m in streamed if m.HasField("chunk"))}
    result = unary.results[0]
    for entry in result.per_token_embeddings:
        np.testing.assert_array_equal(np.asarray(entry.embeddings.values, np.float32),
                                      chunks[(pb.OUTPUT_KIND_PER_TOKEN, entry.layer)])
    np.testing.assert_array_equal(np.asarray(result.attentions.values, np.float32),
                                  chunks[(pb.OUTPUT_KIND_ATTENTIONS, 0)])


def _unread_json(port: int, body: bytes) -> socket.socket:
    """A JSON request whose caller never reads the answer (a small receive buffer, never drained)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 << 10)
    sock.connect(("127.0.0.1", port))
    sock.sendall(b"POST /api/v3/esm2-8m/encode/ HTTP/1.1\r\nHost: esm2\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    return sock


def _read_all(sock: socket.socket) -> tuple[int, dict, bytes, bool]:
    """(status, headers, body, whether the body arrived whole) of the answer on `sock`."""
    sock.settimeout(30)
    response = http.client.HTTPResponse(sock)
    response.begin()
    try:
        return response.status, dict(response.getheaders()), response.read(), True
    except http.client.IncompleteRead as cut:
        return response.status, dict(response.getheaders()), cut.partial, False


def _memory_kib(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def test_unread_json_responses_are_bounded_in_envoy_and_the_server(edge):
    """Attack 3. Before: each unread 8 x 2,048-residue per_token JSON response (440 MB) sat whole in
    Envoy (3.9 GB of Envoy RSS for 8) and peaked the server at 2.7 GB. Now JSON responses stream through
    Envoy a result at a time, the server admits them within its in-flight budget (429 with Retry-After
    past it), and one whose caller reads nothing is given up."""
    server, envoy = edge
    body = json.dumps({"items": [{"sequence": LONG}] * 8,
                       "params": {"include": ["per_token"], "repr_layers": ALL_LAYERS}}).encode()
    envoy_before = _memory_kib(envoy.proc.pid, "VmRSS")
    ended = _statuses(server, "EncodeJson")["RESOURCE_EXHAUSTED"]
    sockets = [_unread_json(envoy.config.http_port, body) for _ in range(4)]
    try:
        # Three are refused by the budget; the one admitted is given up once its caller has read nothing.
        wait_for(lambda: _statuses(server, "EncodeJson")["RESOURCE_EXHAUSTED"] >= ended + 4,
                 "3 refusals and 1 given-up JSON response", timeout=90)
        assert _json_caller(envoy.url, 0) < 30  # others are served meanwhile
        wait_for(lambda: server.metric("esm_response_bytes_held") == 0, "no bytes held", timeout=30)
        assert server.metric("esm_json_response_bytes_in_flight") == 0
        assert _memory_kib(envoy.proc.pid, "VmHWM") - envoy_before < 256 << 10  # KiB: under 256 MiB for all four
        answers = [_read_all(sock) for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()
    refused = [a for a in answers if a[0] == 429]
    assert len(refused) == 3, [a[:2] for a in answers]
    for _, headers, text, _ in refused:
        assert headers["retry-after"] == "1"
        assert b"(--json-response-budget-mb)" in text and b"esm.v1.Esm2Service/EncodeStream" in text
    # The admitted one had begun (200) when its caller stopped reading: what Envoy held of it, then the end.
    # HTTP/1.1 cannot carry the late RESOURCE_EXHAUSTED, but the body is cut inside the results array,
    # so no client can take it for a whole answer.
    status, _, body, _ = next(a for a in answers if a[0] != 429)
    assert status == 200 and body.startswith(b'{"results":[{"sequence_index":0,')
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)
