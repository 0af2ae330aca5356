"""Running the service: health, reflection, model info, overload, deadlines, OOM, shutdown."""

import signal

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase
from reference import assert_close, matrix, reference

from support import encode_request, start_server, wait_for
from esm2_wire.proto import pb

rng = np.random.default_rng(11)
LONG = ["".join(rng.choice(list("ACDEFGHIKLMNPQRSTVWY"), 2000)) for _ in range(8)]


def test_health_per_model(server):
    health = health_pb2_grpc.HealthStub(server.channel)
    for name in ("", "esm.v1.Esm2Service", "esm2-tiny", "esm2-8m"):
        response = health.Check(health_pb2.HealthCheckRequest(service=name))
        assert response.status == health_pb2.HealthCheckResponse.SERVING, name
    with pytest.raises(grpc.RpcError) as info:
        health.Check(health_pb2.HealthCheckRequest(service="esm2-3b"))
    assert info.value.code() == grpc.StatusCode.NOT_FOUND


def test_reflection_describes_the_api(server):
    database = ProtoReflectionDescriptorDatabase(server.channel)
    services = set(database.get_services())
    assert {"esm.v1.Esm2Service", "grpc.health.v1.Health"} <= services
    file = database.FindFileContainingSymbol("esm.v1.Esm2Service")
    assert "EncodeRequest" in [m.name for m in file.message_type]


def test_list_models_reports_shapes_and_random_weights(server, stub):
    models = {m.name: m for m in stub.ListModels(pb.ListModelsRequest()).models}
    assert sorted(models) == ["esm2-8m", "esm2-tiny"]
    m = models["esm2-8m"]
    assert (m.num_layers, m.embed_dim, m.attention_heads) == (6, 320, 20)
    assert m.random_weights and m.ready and m.device == "cpu"
    assert m.checkpoint.endswith("esm2_t6_8M_UR50D.pt")
    assert (m.max_items, m.max_sequence_length) == (8, 2048)
    assert 7_000_000 < m.parameters < 8_000_000
    assert "MODEL esm2-8m HAS RANDOM WEIGHTS" in server.log()


@pytest.fixture(scope="module")
def busy_server(tmp_path_factory, checkpoint_dir):
    """8M shape with a queue of 8 items: one long request keeps the worker busy for seconds."""
    with start_server(tmp_path_factory.mktemp("busy"), "--max-queue-items", "8", "--max-batch-tokens", "16384",
                      "--max-batch-token-pairs", str(16384 * 2048),
                      "--aging", "0",  # first come, first served: nothing runs between its layers
                      models={"esm2-8m": None}, model_dir=checkpoint_dir) as proc:
        yield proc


def test_queue_full_and_deadlines_refuse_work_before_the_model(busy_server):
    stub = busy_server.stub
    items_before = busy_server.metric("esm_items_total", 'model="esm2-8m"')
    long_call = stub.Encode.future(encode_request("esm2-8m", LONG))  # fills the worker
    wait_for(lambda: busy_server.metric("esm_worker_busy") == 1 and busy_server.metric("esm_queue_items") == 0)
    # Distinct sequences throughout: identical ones are computed once and take one queue place.
    queued_call = stub.Encode.future(encode_request("esm2-8m", ["MKTAYIAKQR" + "A" * i for i in range(6)]))
    wait_for(lambda: busy_server.metric("esm_queue_items") == 6)

    # 6 queued + 3 > 8: refused at once, nothing queued.
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(encode_request("esm2-8m", ["MKT", "MKTA", "MKTAY"]))
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "8" in info.value.details() and "retry" in info.value.details()

    # 2 more fit the queue, but not their deadline behind the running batch (8 x 2,002 tokens, 0.95 s at
    # the cost model's initial rate, and far longer in fact): refused at once, nothing queued (issue 31;
    # before, they were queued and dropped once their deadline passed: tests/unit/test_scheduler.py).
    with pytest.raises(grpc.RpcError) as info:
        stub.Encode(encode_request("esm2-8m", ["MKTAYI", "MKTAYIAK"]), timeout=0.5)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "server busy: the request cannot finish before its deadline" in info.value.details()
    assert ("retry-after", "1") in info.value.trailing_metadata()

    assert len(long_call.result(timeout=300).results) == 8
    assert len(queued_call.result(timeout=300).results) == 6
    dropped = busy_server.metric("esm_dropped_items_total", 'reason="cancelled"') + busy_server.metric(
        "esm_dropped_items_total", 'reason="deadline"')
    assert dropped == 0
    assert busy_server.metric("esm_items_total", 'model="esm2-8m"') - items_before == 8 + 6
    assert busy_server.metric("esm_rejected_requests_total") == 1
    assert busy_server.metric("esm_admission_refused_total", 'model="esm2-8m",verdict="BEHIND_QUEUE"') == 1


def test_out_of_memory_splits_the_batch_and_fails_only_what_cannot_fit(server_factory, tiny, reference_models):
    server = server_factory("--simulate-oom-above-tokens", "300", "--max-wait-ms", "200", models=tiny)
    fits = ["M" + "KTAYIAKQRQ" * 10, "A" * 90, "G" * 95, "W" * 99]  # 4 x 103 > 300; 2 x 103 fits
    too_long = ["MKTAYIAKQR" * 40]  # 402 tokens alone
    ok_call = server.stub.Encode.future(encode_request("esm2-tiny", fits))
    failing_call = server.stub.Encode.future(encode_request("esm2-tiny", too_long))
    response = ok_call.result(timeout=60)
    with pytest.raises(grpc.RpcError) as info:
        failing_call.result(timeout=60)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "400-residue sequence does not fit in cpu memory" in info.value.details()
    for sequence, result in zip(fits, response.results):
        assert_close(result.embeddings[0].embedding, reference(reference_models["esm2-tiny"], sequence)["mean"][2])
    assert "retrying as" in server.log()


def test_sigterm_finishes_in_flight_work_then_exits(server_factory, checkpoint_dir):
    server = server_factory(models={"esm2-8m": None}, model_dir=checkpoint_dir)
    call = server.stub.Encode.future(encode_request("esm2-8m", LONG[:4]))
    wait_for(lambda: server.metric("esm_worker_busy") == 1)
    server.proc.send_signal(signal.SIGTERM)
    response = call.result(timeout=120)
    assert len(response.results) == 4
    assert server.proc.wait(60) == 0
    assert "shutting down" in server.log() and "stopped" in server.log()


def test_contacts_need_the_regression_file(tmp_path, tiny_checkpoint, server_factory):
    copy = tmp_path / "esm2_t2_copy.pt"
    copy.write_bytes(tiny_checkpoint.read_bytes())  # no -contact-regression.pt beside it
    server = server_factory(models={"esm2-tiny": copy})
    assert server.stub.Encode(encode_request("esm2-tiny", ["MKT"], ["mean"])).results[0].embeddings
    with pytest.raises(grpc.RpcError) as info:
        server.stub.Encode(encode_request("esm2-tiny", ["MKT"], ["contacts"]))
    assert info.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "esm2_t2_copy-contact-regression.pt was not found" in info.value.details()


def test_mixed_precision_autocast_path(server_factory, tiny, reference_models):
    """--precision bf16 runs the model under autocast (on CPU here, as on CUDA) and returns
    float32 outputs close to fp32 fair-esm, within bfloat16's ~3 significant digits. (The CPU
    is told it has native bf16, so that the path runs on any machine; tests/test_precision.py.)"""
    server = server_factory("--precision", "bf16", "--simulate-cpu-native", "present", models=tiny)
    sequence = "MKTAYIAKQRQISFVKSHFSRQ"
    response = server.stub.Encode(encode_request("esm2-tiny", [sequence], ["mean", "contacts", "logits"]))
    ref = reference(reference_models["esm2-tiny"], sequence)
    result = response.results[0]
    mean = np.asarray(result.embeddings[0].embedding)
    assert not np.allclose(mean, ref["mean"][2], rtol=1e-6, atol=1e-6), "autocast did not change the arithmetic"
    np.testing.assert_allclose(mean, ref["mean"][2], rtol=0.05, atol=0.05)
    logits = matrix(result.logits)
    assert np.abs(logits - ref["logits"]).max() <= 0.05 * np.abs(ref["logits"]).max()
    np.testing.assert_allclose(matrix(result.contacts), ref["contacts"], atol=0.05)
