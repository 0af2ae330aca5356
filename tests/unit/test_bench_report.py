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
    best = checks["gRPC 8x8 mean, default settings / best peer (HF transformers EsmModel sdpa), "
                  "median of the back-to-back pairs"]
    assert best["value"] == 1.2 and best["threshold"] == 1.1 and best["met"]
    assert "| **1.20** (1.20-1.20) |" in "\n".join(report.peer_table({"esm2-150m": {m.case: m for m in measurements}}))


def test_the_ratio_pairs_each_repeat_with_its_own_peer_run():
    """The machine slowed down in the second repeat: the pairs say 1.25 each time; the ratio of
    medians taken across repeats would not."""
    peer = Measurement("esm2-8m", cases.HF_MEAN, residues=1000)
    service = Measurement("esm2-8m", cases.grpc_mean_case(8, 8), residues=1000)
    for peer_s, service_s in ((1.0, 0.8), (2.0, 1.6), (1.1, 0.88)):
        peer.add(peer_s, peer_s)
        service.add(service_s, service_s)
    assert [round(r, 6) for r in report.paired_ratios(service, peer)] == [1.25, 1.25, 1.25]
    [check] = [c for c in report.targets([peer, service], matmul_flops=1e9) if "best peer" in c["target"]]
    assert round(check["value"], 6) == 1.25
