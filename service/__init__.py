"""The ESM-2 server, in three layers that import only downwards:

- `service.api`: what callers see. gRPC handlers, validation, rendering, the JSON edge's
  bodies, schema and OpenAPI document, the checks made before a message is decoded.
  May import `service.engine`, `service.models` and the base modules.
- `service.engine`: how work runs. Torch-free hand-off types, the scheduling policy, the
  scheduler and router, the result cache, and the worker thread that owns a device.
  May import `service.models` and the base modules, never `service.api`.
- `service.models`: the networks themselves. The forward pass, loading fair-esm and
  Hugging Face weights, where weights come from, memory and precision checks, batch budgets.
  May import only the base modules.

Base modules, imported by every layer and importing none of the layers: `service.errors`
(every error, mapped to its status in one place), `service.metrics`, `service.request_context`
(the request being handled: its id, what the engine reported about it), `service.tracing`
(OpenTelemetry, off by default), `service.logs` (text or JSON lines carrying the request id),
`service.platforms` (the device seam: every device-specific call, the only caller of CUDA) and
`service.cgroup_limits` (the memory and CPUs this process may use, from its cgroup).
At the top, importing everything
and imported by nothing in the package: `service.server` (start-up) and `service.model_specs`
(what to serve). Beside them, `service.config` declares every setting once (flag, ESM_*
variable, type, default, bounds, help); it reads the defaults of the layers below and stays
torch-free, since the gateway reads it too. `tests/unit/test_layers.py` checks the direction.
"""
