"""The CUDA path, checked where it can be on a CPU (issue 22; docs/gpus.md): the
numerics of reduced precision under CPU autocast, the host copies, weights cast once at load,
bf16 accepted by the worker's device's compute capability, replicate's host memory and the
liveness signal of a stuck worker. Timings wait for a GPU (BENCHMARKS.md)."""

from __future__ import annotations

import copy
import gc
import threading

import grpc
import numpy as np
import pytest
import torch
from esm.model.esm2 import ESM2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from simulated_cuda import installed
from support import ServerProcess, encode_request, wait_for

from esm2_wire.output_kinds import OutputKind
from service import platforms, server
from service.engine import worker as worker_module
from service.engine.inputs import ModelInput
from service.engine.worker import ModelWorker, replicate, to_host
from service.models import precision
from service.models.checkpoints import load
from service.models.forward import BatchPlan, forward

# Contacts are probabilities in [0, 1]. Under bf16 autocast the attention maps themselves carry
# bf16 rounding; with the contact head in fp32 the 8M shape's contacts stay within 5e-4 of fp32
# (measured: 7e-5). A contact head run in bf16 (its einsum, the sum over layers, bias and
# sigmoid) rounds at every layer and lands near 2e-3 off.
CONTACTS_BF16_MAX_ABS_ERROR = 5e-4
SEQUENCES = ["MKTAYIAKQRQISFVKSHFSRQLEERLGLIEVQ" * 4, "GSHMSLFDFFKNKGSAAATPAPEPSEKDIL"]


def _tokens(loaded, sequences):
    return loaded.alphabet.get_batch_converter()([(str(i), s) for i, s in enumerate(sequences)])[2]


def test_contacts_under_bf16_autocast_equal_fp32_within_the_bound(reference_models):
    loaded = reference_models["esm2-8m"]
    tokens = _tokens(loaded, SEQUENCES)
    plan = BatchPlan(outputs=frozenset({OutputKind.CONTACTS}))
    fp32 = forward(loaded.model, tokens, plan).contacts
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = forward(loaded.model, tokens, plan).contacts
    assert low.dtype == torch.float32  # the head's output: computed and rounded once in fp32
    for row, sequence in enumerate(SEQUENCES):
        n = len(sequence)
        error = (low[row, :n, :n] - fp32[row, :n, :n]).abs().max().item()
        assert 0 < error <= CONTACTS_BF16_MAX_ABS_ERROR, f"row {row}: {error:.2e}"


def _inputs(loaded) -> list[ModelInput]:
    """Three items of different lengths asking for different outputs and layers."""
    every = {OutputKind.MEAN, OutputKind.BOS, OutputKind.PER_TOKEN, OutputKind.LOGITS, OutputKind.CONTACTS,
             OutputKind.ATTENTIONS}
    asks = [(every, (0, 3, 6)), ({OutputKind.MEAN}, (6,)), ({OutputKind.PER_TOKEN, OutputKind.CONTACTS}, (3,))]
    sequences = ["MKTAYIAKQRQISFVKSHFSRQ", "GSHMSLFDFFKNKGSAAATPAPEPSEKDIL", "ACDEFGHIK"]
    return [ModelInput("m", np.asarray(loaded.tokenize(tuple(s)), dtype=np.int64), frozenset(outputs), layers)
            for s, (outputs, layers) in zip(sequences, asks)]


def _per_item_copy(out, row: int, item: ModelInput) -> dict:
    """What the worker did before: one .cpu() per item, output and layer."""
    n = item.length - 2
    host = lambda t: t.float().cpu().numpy().copy()  # noqa: E731
    expected = {}
    for layer in item.layers:
        rep = out.representations[layer][row]
        if OutputKind.MEAN in item.outputs:
            expected[("mean", layer)] = host(rep[1 : n + 1].mean(0))
        if OutputKind.BOS in item.outputs:
            expected[("bos", layer)] = host(rep[0])
        if OutputKind.PER_TOKEN in item.outputs:
            expected[("per_token", layer)] = host(rep[1 : n + 1])
    if OutputKind.LOGITS in item.outputs:
        expected["logits"] = host(out.logits[row, 1 : n + 1])
    if OutputKind.CONTACTS in item.outputs:
        expected["contacts"] = host(out.contacts[row, :n, :n])
    if OutputKind.ATTENTIONS in item.outputs:
        expected["attentions"] = host(out.attentions[row, 1 : n + 1, 1 : n + 1])
    return expected


def test_batched_host_copies_equal_per_item_copies(reference_models):
    loaded = reference_models["esm2-8m"]
    batch = _inputs(loaded)
    width = max(item.length for item in batch)
    tokens = torch.full((len(batch), width), loaded.alphabet.padding_idx, dtype=torch.int64)
    for row, item in enumerate(batch):
        tokens[row, : item.length] = torch.from_numpy(item.token_ids)
    plan = BatchPlan(layers=frozenset({0, 3, 6}), outputs=frozenset().union(*(i.outputs for i in batch)))
    out = forward(loaded.model, tokens, plan)
    host = to_host(out, batch, platforms.of(torch.device("cpu")))
    for row, item in enumerate(batch):
        result = ModelWorker._extract(host, row, item)
        got = {("mean", k): v for k, v in result.mean.items()} | {("bos", k): v for k, v in result.bos.items()} \
            | {("per_token", k): v for k, v in result.per_token.items()} \
            | {k: getattr(result, k) for k in ("logits", "contacts", "attentions") if getattr(result, k) is not None}
        expected = _per_item_copy(out, row, item)
        assert got.keys() == expected.keys(), row
        for key, array in expected.items():
            assert got[key].dtype == np.float32 and np.array_equal(got[key], array), (row, key)
            assert got[key].base is None  # its own memory: no item keeps the batch's arrays alive


def _load_args(tiny_checkpoint, *flags):
    args = server.parse_args(["--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}", "--device",
                              "cpu", *flags])
    server.choose_precisions(args)
    return args


def test_linear_weights_are_cast_once_at_load(tiny_checkpoint):
    """Under bf16 the transformer's Linear layers hold bf16 weights after load (autocast would
    otherwise re-cast fp32 weights on every call); norms, embeddings and the contact head stay
    fp32; and the numbers equal autocast over fp32 weights exactly."""
    args = _load_args(tiny_checkpoint, "--precision", "bf16", "--simulate-cpu-native", "present")
    model = server.load_models(args)["esm2-tiny"].loaded.model
    for name, parameter in model.named_parameters():
        linear = name.startswith("layers.") and name.rsplit(".", 2)[-2] in {"q_proj", "k_proj", "v_proj", "out_proj",
                                                                           "fc1", "fc2"}
        wanted = torch.bfloat16 if linear or name.startswith("lm_head.dense.") else torch.float32
        assert parameter.dtype == wanted, name
    assert model.contact_head.regression.weight.dtype == torch.float32

    uncast = load("esm2-tiny", tiny_checkpoint).model
    tokens = _tokens(load("esm2-tiny", tiny_checkpoint), SEQUENCES)
    plan = BatchPlan(layers=frozenset({model.num_layers}), outputs=frozenset({OutputKind.LOGITS}))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_once, cast_per_call = forward(model, tokens, plan), forward(uncast, tokens, plan)
    assert torch.equal(cast_once.logits, cast_per_call.logits)
    assert torch.equal(cast_once.representations[model.num_layers], cast_per_call.representations[model.num_layers])


def test_auto_precision_is_fp32_on_a_cpu_and_keeps_fp32_weights(tiny_checkpoint):
    args = _load_args(tiny_checkpoint)  # --precision auto, the default
    assert [spec.precision for spec in args.specs] == ["fp32"]
    model = server.load_models(args)["esm2-tiny"].loaded.model
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_bf16_is_accepted_by_the_workers_device_capability():
    """A V100 (7.0) or T4 (7.5) emulates bf16: refused, and `auto` picks fp32 there; an A100 or
    H100 (8.0, 9.0) runs it. The question goes to each worker's own device: four simulated
    devices (tests/simulated_cuda.py) with those capabilities."""
    with installed(devices=4, capability=[(7, 0), (9, 0), (7, 5), (8, 0)]):
        v100, h100, t4, a100 = platforms.resolve_devices("cuda:0,cuda:1,cuda:2,cuda:3")
        with pytest.raises(precision.PrecisionUnsupported, match=r"cuda:0 \(compute capability 7\.0\) has no native bf16"):
            precision.check("bf16", v100)
        with pytest.raises(precision.PrecisionUnsupported, match=r"cuda:2 \(compute capability 7\.5\)"):
            precision.check("bf16", t4)
        precision.check("bf16", h100)
        precision.check("bf16", a100)
        precision.check("fp16", v100)  # native there
        assert precision.resolve("auto", [h100]) == "bf16"
        assert precision.resolve("auto", [a100, h100]) == "bf16"
        assert precision.resolve("auto", [v100]) == "fp32"
        assert precision.resolve("auto", [h100, t4]) == "fp32"  # one model, one precision: what every device runs
        assert precision.resolve("auto", [torch.device("cpu")]) == "fp32"
        assert precision.resolve("fp16", [v100]) == "fp16"


def test_tf32_only_where_no_model_on_cuda_asked_for_fp32():
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    try:
        cpu, gpu = torch.device("cpu"), torch.device("cuda:0")
        torch.backends.cuda.matmul.allow_tf32 = False
        assert not precision.use_tf32([("fp32", cpu)])  # nothing on CUDA
        assert not precision.use_tf32([("auto", gpu), ("fp32", gpu)])  # asked for fp32: full fp32 matmuls
        assert not torch.backends.cuda.matmul.allow_tf32
        assert precision.use_tf32([("auto", gpu), ("fp32", cpu)])
        assert torch.backends.cuda.matmul.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def _host_copies() -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is ESM2 and next(o.parameters()).device.type == "cpu")


def test_replicate_never_holds_more_than_one_extra_copy_on_the_host(tiny_checkpoint, monkeypatch):
    """Three accelerator devices (the meta device stands in: moving there frees host memory as
    moving to a GPU does): the loaded model plus at most one copy on the host at any time."""
    loaded = load("esm2-tiny", tiny_checkpoint)
    baseline = _host_copies() - 1  # every other model alive in this process
    peak = []
    real_deepcopy = copy.deepcopy

    def counting_deepcopy(obj, *args):  # deepcopy recurses through the module: count after whole models
        made = real_deepcopy(obj, *args)
        if type(obj) is ESM2:
            peak.append(_host_copies() - baseline)
        return made

    monkeypatch.setattr(worker_module.copy, "deepcopy", counting_deepcopy)
    devices = [torch.device("meta")] * 3
    sets = replicate({"m": loaded}, devices)
    peak.append(_host_copies() - baseline)
    assert len(peak) == 3 and max(peak) <= 2, peak  # the loaded model and one copy
    assert [next(s["m"].model.parameters()).device.type for s in sets] == ["meta"] * 3
    assert len({id(s["m"].model) for s in sets}) == 3  # each worker its own modules


def _liveness(channel) -> int:
    request = health_pb2.HealthCheckRequest(service=server.LIVENESS)
    return health_pb2_grpc.HealthStub(channel).Check(request, timeout=5).status


def test_liveness_fails_while_the_worker_makes_no_progress_and_recovers(tmp_path, tiny_checkpoint):
    """A batch stuck in the worker (the fault hook's stall stands in for a hung device) turns the
    `liveness` health name NOT_SERVING once the bound passes; readiness names are left alone; when
    the worker moves again, liveness is SERVING and the request is answered."""
    fault_file = tmp_path / "fault"
    proc = ServerProcess(tmp_path, "--models", "esm2-tiny", "--checkpoint", f"esm2-tiny={tiny_checkpoint}",
                         "--liveness-stall-seconds", "1", env={"ESM_FAULT_FILE": str(fault_file)}).wait_ready()
    try:
        assert _liveness(proc.channel) == health_pb2.HealthCheckResponse.SERVING
        fault_file.write_text("stall")
        answer = {}
        caller = threading.Thread(target=lambda: answer.update(reply=proc.stub.Encode(
            encode_request("esm2-tiny", ["MKTAYIAKQR"], include=["mean"]), timeout=60)))
        caller.start()
        wait_for(lambda: _liveness(proc.channel) == health_pb2.HealthCheckResponse.NOT_SERVING, timeout=30)
        ready = health_pb2_grpc.HealthStub(proc.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert ready.status == health_pb2.HealthCheckResponse.SERVING
        fault_file.unlink()  # the stall ends: the batch runs
        caller.join(60)
        assert "reply" in answer and len(answer["reply"].results) == 1
        wait_for(lambda: _liveness(proc.channel) == health_pb2.HealthCheckResponse.SERVING, timeout=30)
    finally:
        assert proc.stop() == 0
