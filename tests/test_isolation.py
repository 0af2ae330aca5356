"""No caller can starve the others on the way out (issue 16, attacks 1-4 and 10): unread
streams, huge unary responses and unread JSON responses, against a real Envoy and server."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import requests
from support import ServerProcess, encode_request, free_port, wait_for
from test_gateway import start_gateway

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
    server = ServerProcess(tmp, "--models", "esm2-8m", "--model-dir", str(checkpoint_dir),
                           "--max-stream-held-mb", str(STREAM_HELD_MB), "--max-held-response-mb", "256").wait_ready()
    envoy = start_gateway(tmp, server.port, admin_socket=tmp / "admin.sock")
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
        wait_for(lambda: _statuses(server, "EncodeStream")["RESOURCE_EXHAUSTED"] >= ended + 6, timeout=60)
        under_attack = other_callers(envoy, 4)
    finally:
        for channel in channels:
            channel.close()
    assert p99(under_attack) <= 2 * p99(idle), (sorted(idle), sorted(under_attack))


def _statuses(server, method: str) -> dict[str, float]:
    return {code: server.metric("esm_requests_total", f'code="{code}",method="{method}"')
            for code in ("OK", "CANCELLED", "RESOURCE_EXHAUSTED")}


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
                 timeout=60)
        wait_for(lambda: server.metric("esm_response_bytes_held") == 0, timeout=30)
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
    nowhere in esm_requests_total, so attacks 1 and 4 were invisible."""
    server, _ = edge
    before = _statuses(server, "EncodeStream")["CANCELLED"]
    request = attack_request()
    del request.items[2:]  # 36 MB: under the per-stream bound, far over what the connection buffers
    with own_channel(server.target) as channel:
        call = pb_grpc.Esm2ServiceStub(channel).EncodeStream(request, timeout=120)
        assert next(call).WhichOneof("payload") == "item_header"
        wait_for(lambda: server.metric("esm_response_bytes_held") > 0, timeout=30)  # the server waits for us
        call.cancel()
        wait_for(lambda: _statuses(server, "EncodeStream")["CANCELLED"] == before + 1, timeout=30)
    wait_for(lambda: server.metric("esm_response_bytes_held") == 0, timeout=30)
