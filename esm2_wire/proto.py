"""The generated esm.v1 stubs (built from protos/ by the package build or `make protos`)."""

try:
    from esm2_wire.gen.esm.v1 import esm2_pb2 as pb
    from esm2_wire.gen.esm.v1 import esm2_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - a setup problem, not a code path
    raise ImportError("generated gRPC stubs are missing: run `make protos` (or pip install the package)") from exc

__all__ = ["MODEL_HEADER", "pb", "pb_grpc"]

# Request metadata naming the model of a gRPC call. Envoy routes calls to the model's pool by
# it (the body is not visible to routing); esm2_client sends it on every call.
MODEL_HEADER = "x-esm-model"
