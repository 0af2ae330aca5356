"""The benchmark report finds its cases through the same label builders the runner records under."""

from bench import cases, report
from bench.cases import Measurement


def _measured(case: str, residues_per_s: float, padding=None) -> Measurement:
    m = Measurement("esm2-150m", case, residues=int(residues_per_s), padding=padding or [])
    m.add(1.0, 1.0)
    return m


def test_every_target_finds_the_cases_the_runner_records():
    measurements = [
        _measured(cases.BASELINE_MEAN, 1000),
        _measured(cases.BASELINE_CONTACTS, 100),
        _measured(cases.forward_fast_case(), 2000),
        _measured(cases.grpc_mean_case(8, 8), 1500, padding=[0.95]),
        _measured(cases.grpc_mean_case(8, 8, "exact"), 1000),
        _measured(cases.grpc_mean_case(32, 1), 1400, padding=[0.97]),
        _measured(cases.json_case("mean"), 1200),
        _measured(cases.stream_case("contacts"), 150),
    ]
    measurements[2].flops = 1e9
    checks = {c["target"]: c["value"] for c in report.targets(measurements, matmul_flops=1e9)}
    assert checks == {
        "gRPC 8x8 mean, default settings / baseline": 1.5,
        "gRPC 8x8 mean, --attention exact / baseline": 1.0,
        "gRPC 32 clients x 1 item / 8x8": 1400 / 1500,
        "JSON via Envoy 8x8 mean / gRPC 8x8 mean": 1200 / 1500,
        "padding efficiency, 8 clients x 8 items": 0.95,
        "padding efficiency, 32 clients x 1 items": 0.97,
        f"model FLOPs utilisation, {cases.grpc_mean_case(8, 8)}": 0.0,
        f"model FLOPs utilisation, {cases.forward_fast_case()}": 1.0,
    }
    by_case = {m.case: m for m in measurements}
    assert report._baseline_for(by_case[cases.stream_case("contacts")], by_case).case == cases.BASELINE_CONTACTS
    assert report._baseline_for(by_case[cases.json_case("mean")], by_case).case == cases.BASELINE_MEAN


def test_service_is_compared_with_the_best_peer():
    measurements = [_measured(cases.BASELINE_MEAN, 1000), _measured(cases.BEST_STOCK, 1500),
                    _measured(cases.HF_MEAN, 2000), _measured(cases.grpc_mean_case(8, 8), 2400)]
    checks = {c["target"]: c for c in report.targets(measurements, matmul_flops=1e9)}
    best = checks["gRPC 8x8 mean, default settings / best peer (HF transformers EsmModel sdpa)"]
    assert best["value"] == 1.2 and best["threshold"] == 1.1 and best["met"]
    assert "| **1.20** |" in "\n".join(report.peer_table({"esm2-150m": {m.case: m for m in measurements}}))
