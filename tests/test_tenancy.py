"""Tenancy with API keys (issue 16, attack 5), against a real server behind a real Envoy.

A cache hit answers in a millisecond, a miss in the model's time: with one cache for every key,
a caller holding key B could tell whether key A's caller had asked for a sequence. So with keys
each key has its own results, unless --share-cache-across-keys says otherwise. Whether an
answer was computed or came from the cache is read from the server's own counters.
"""

from __future__ import annotations

import grpc
import pytest
import requests
from support import ServerProcess, encode_request, free_port, wait_for

from esm2_wire.proto import pb_grpc
from gateway.envoy_config import GatewayConfig
from gateway.launch import EnvoyProcess

KEY_A, KEY_B = "tenant-a-0123456789", "tenant-b-0123456789"
COMPUTED = ("esm_items_total", 'model="esm2-tiny"')
HITS = ("esm_cache_hits_total", "")


@pytest.fixture(scope="module", params=["per-key", "shared"])
def keyed(request, tmp_path_factory, tiny_checkpoint):
    """(server, Envoy in front of it, whether keys share results)."""
    shared = request.param == "shared"
    tmp = tmp_path_factory.mktemp(request.param)
    proc = ServerProcess(tmp, "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
                         *(["--share-cache-across-keys"] if shared else []),
                         env={"ESM_API_KEYS": f"{KEY_A},{KEY_B}"}).wait_ready()
    envoy = EnvoyProcess(GatewayConfig(http_host="127.0.0.1", http_port=free_port(), upstream_port=proc.port),
                         log_path=tmp / "envoy.log").wait_listening()
    try:
        wait_for(lambda: requests.get(envoy.url + "/healthz", timeout=5).status_code == 200, timeout=30)
        yield proc, envoy, shared
    finally:
        envoy.stop()
        proc.stop()


def encode_grpc(envoy, key: str, sequence: str) -> list[float]:
    with grpc.insecure_channel(envoy.url.removeprefix("http://")) as channel:
        response = pb_grpc.Esm2ServiceStub(channel).Encode(
            encode_request("esm2-tiny", [sequence]), metadata=[("authorization", f"Token {key}")], timeout=60)
    return list(response.results[0].embeddings[0].embedding)


def encode_json(envoy, key: str, sequence: str) -> list[float]:
    response = requests.post(envoy.url + "/api/v3/esm2-tiny/encode/", json={"items": [{"sequence": sequence}]},
                             headers={"Authorization": f"Token {key}"}, timeout=60)
    assert response.status_code == 200, response.text
    return response.json()["results"][0]["embeddings"][0]["embedding"]


@pytest.mark.parametrize("encode", [encode_grpc, encode_json], ids=["grpc", "json"])
def test_another_keys_identical_request_is_computed_afresh_unless_shared(keyed, encode):
    server, envoy, shared = keyed
    sequence = f"MKTAYIAKQR{'G' * (5 + (encode is encode_json) + 2 * shared)}"  # new to this server
    counters = lambda: (server.metric(*COMPUTED), server.metric(*HITS))  # noqa: E731

    computed, hits = counters()
    first = encode(envoy, KEY_A, sequence)
    assert counters() == (computed + 1, hits)

    again = encode(envoy, KEY_A, sequence)  # the same key: from the cache
    assert again == first and counters() == (computed + 1, hits + 1)

    other = encode(envoy, KEY_B, sequence)
    assert other == first
    if shared:  # B's answer came from A's result: the timing leak --share-cache-across-keys accepts
        assert counters() == (computed + 1, hits + 2)
    else:  # B's answer was computed afresh; B cannot tell that A asked
        assert counters() == (computed + 2, hits + 1)
        encode(envoy, KEY_B, sequence)
        assert counters() == (computed + 2, hits + 2)  # and B's own result is cached for B
