"""The generated esm.v1 stubs (built from protos/ by the package build or `make protos`)."""

try:
    from esm2_wire.gen.esm.v1 import esm2_pb2 as pb
    from esm2_wire.gen.esm.v1 import esm2_pb2_grpc as pb_grpc
except ImportError as exc:  # pragma: no cover - a setup problem, not a code path
    raise ImportError("generated gRPC stubs are missing: run `make protos` (or pip install the package)") from exc

__all__ = ["FLEET_MODELS_HEADER", "MODEL_HEADER", "pb", "pb_grpc"]

# Request metadata naming the model of a gRPC call. Envoy routes calls to the model's pool by
# it (the body is not visible to routing); esm2_client sends it on every call.
MODEL_HEADER = "x-esm-model"
# Request metadata that Envoy sets (over anything a caller sent) on every call it forwards: the
# models of its per-model pools, comma-separated. A server names them, with its own, when a call
# asks for a model it does not serve, so that the 404 lists every model the gateway serves.
FLEET_MODELS_HEADER = "x-esm-fleet-models"
