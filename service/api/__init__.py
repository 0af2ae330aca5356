"""What callers see: gRPC handlers, request validation, rendering (protos, stream chunks, JSON),
the JSON edge's bodies, schema and OpenAPI document, and the checks made before a request
message is decoded (size, metadata, API keys).

May import `service.engine`, `service.models`, `service.errors`, `service.metrics` and
`esm2_wire`; nothing imports it but `service.server`.
"""
