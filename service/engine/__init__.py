"""How work runs: the hand-off types, the scheduling policy, the per-model scheduler and the
router over them, the result cache, and the worker thread that owns a device and runs the
forward pass.

May import `service.models`, `service.errors`, `service.metrics` and `esm2_wire`; never
`service.api`.
"""
