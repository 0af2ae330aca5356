"""The generated esm.v1 stubs (built from protos/ by the package build or `make protos`)."""

try:
    from esm2_wire.gen.esm.v1 import esm2_pb2 as pb
    from esm2_wire.gen.esm.v1 import esm2_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - a setup problem, not a code path
    raise ImportError("generated gRPC stubs are missing: run `make protos` (or pip install the package)") from exc

__all__ = ["pb", "pb_grpc"]
