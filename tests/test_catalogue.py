"""One catalogue across pools: two pools of different models behind one Envoy. ListModels, through
JSON and gRPC, lists both pools' models with each server's own facts, and an unknown model's 404
names every served model.
"""

from __future__ import annotations

import grpc
import pytest
import requests
from support import ServerProcess, free_port, wait_for

from esm2_wire.proto import FLEET_MODELS_HEADER, MODEL_HEADER, pb, pb_grpc
from gateway.envoy_config import GatewayConfig, Pool
from gateway.launch import EnvoyProcess

TINY, OTHER = "esm2-tiny", "esm2-8m"  # the fallback pool's model, and the other pool's
LAYERS = {TINY: 2, OTHER: 6}
NOT_SERVED = ("model {} is not served here; this server serves esm2-tiny, the gateway's other pools esm2-8m: a gRPC "
              "call reaches a model's pool with the x-esm-model header set to its name, a JSON call by the model in "
              "its path")


@pytest.fixture(scope="module")
def two_pools(tmp_path_factory, tiny_checkpoint, checkpoint_dir):
    tmp = tmp_path_factory.mktemp("catalogue")
    tiny = ServerProcess(tmp, "--models", TINY, "--checkpoint", f"{TINY}={tiny_checkpoint}")
    other = ServerProcess(tmp, "--models", OTHER, "--model-dir", str(checkpoint_dir))
    tiny.wait_ready()
    other.wait_ready()
    envoy = EnvoyProcess(GatewayConfig(
        http_host="127.0.0.1", http_port=free_port(),
        pools=(Pool(TINY, (("127.0.0.1", tiny.port),)), Pool(OTHER, (("127.0.0.1", other.port),))),
    ), log_path=tmp / "envoy.log").wait_listening()
    channel = grpc.insecure_channel(envoy.url.split("//")[1])
    stub = pb_grpc.Esm2ServiceStub(channel)
    wait_for(lambda: requests.get(f"{envoy.url}/healthz", timeout=10).status_code == 200)  # both pools healthy
    yield envoy, stub, other, tiny
    channel.close()
    envoy.stop()
    other.stop()
    tiny.stop()


def test_json_model_list_names_every_pools_models(two_pools):
    envoy, _, _, _ = two_pools
    response = requests.get(f"{envoy.url}/api/v3/models", timeout=30)
    assert response.status_code == 200, response.text
    models = response.json()["models"]
    assert [m["name"] for m in models] == sorted(LAYERS)
    # Each entry is its own server's: the tiny model has 2 layers, the 8M shape 6, both ready.
    assert {m["name"]: m["num_layers"] for m in models} == LAYERS
    assert all(m["ready"] for m in models)


@pytest.mark.parametrize("header", [None, TINY, OTHER])
def test_grpc_list_models_names_every_pools_models(two_pools, header):
    _, stub, _, _ = two_pools
    metadata = () if header is None else ((MODEL_HEADER, header),)
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30, metadata=metadata)
    assert [m.name for m in reply.models] == sorted(LAYERS)
    assert {m.name: m.num_layers for m in reply.models} == LAYERS


def test_unknown_model_404_names_every_served_model(two_pools):
    envoy, stub, _, _ = two_pools
    response = requests.post(f"{envoy.url}/api/v3/esm2-nope/encode", json={"items": [{"sequence": "MKT"}]},
                             timeout=30)
    assert response.status_code == 404, response.text
    assert response.json()["message"] == NOT_SERVED.format("'esm2-nope'")
    # gRPC, no model header: the fallback pool's server answers, and names the other pool's model too.
    # A caller's own fleet header is replaced by Envoy's.
    with pytest.raises(grpc.RpcError) as error:
        stub.Encode(pb.EncodeRequest(model="esm2-nope", items=[pb.SequenceItem(sequence="MKT")]), timeout=30,
                    metadata=((FLEET_MODELS_HEADER, "esm2-made-up"),))
    assert error.value.code() is grpc.StatusCode.NOT_FOUND
    assert error.value.details() == NOT_SERVED.format("'esm2-nope'")


def test_a_call_without_the_model_header_is_told_how_the_fleet_routes(two_pools):
    """Issue 32: Score for the other pool's model, sent without x-esm-model, lands on the fallback
    pool; the error names that server's own model apart, and the header that routes the call."""
    _, stub, _, _ = two_pools
    request = pb.ScoreRequest(model=OTHER, items=[pb.ScoreItem(sequence="MKTAY", variants=["K2A"])])
    with pytest.raises(grpc.RpcError) as error:
        stub.Score(request, timeout=30)
    assert error.value.code() is grpc.StatusCode.NOT_FOUND
    assert error.value.details() == NOT_SERVED.format(f"'{OTHER}'")
    routed = stub.Score(request, timeout=30, metadata=((MODEL_HEADER, OTHER),))
    assert len(routed.results[0].scores) == 1


def test_a_direct_callers_fleet_header_is_bounded(two_pools):
    """Straight to a server (no Envoy to replace it): only well-formed names, at most 64, are named."""
    *_, tiny = two_pools
    names = ["esm2-extra", "not a name!", "x" * 65, "", *(f"m{i}" for i in range(100))]
    with pytest.raises(grpc.RpcError) as error:
        tiny.stub.Encode(pb.EncodeRequest(model="esm2-nope", items=[pb.SequenceItem(sequence="MKT")]), timeout=30,
                         metadata=((FLEET_MODELS_HEADER, ",".join(names)),))
    assert error.value.code() is grpc.StatusCode.NOT_FOUND
    details = error.value.details()
    assert details.startswith(f"model 'esm2-nope' is not served here; this server serves {TINY}, the gateway's other pools ")
    named = details.split("other pools ")[1].split(": a gRPC call")[0].split(", ")
    assert "esm2-extra" in named
    assert "not a name!" not in details and "x" * 65 not in details
    # The first 64 entries, of which 3 are malformed.
    assert len(named) == 64 - 3


def test_a_pool_that_is_down_is_left_out_of_the_list(two_pools):
    envoy, stub, other, _ = two_pools
    other.stop()
    wait_for(lambda: requests.get(f"{envoy.url}/healthz", timeout=10).status_code == 503)
    reply = stub.ListModels(pb.ListModelsRequest(), timeout=30)
    assert [m.name for m in reply.models] == [TINY]
    response = requests.get(f"{envoy.url}/api/v3/models", timeout=30)
    assert response.status_code == 200 and [m["name"] for m in response.json()["models"]] == [TINY]
