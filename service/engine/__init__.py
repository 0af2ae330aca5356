"""How work runs: the hand-off types, the scheduling policy, the per-model scheduler and the
router over them, the result cache, and the worker thread that owns a device and runs the
forward pass.

The scheduler (`scheduler`) composes three pieces with one job each: `intake` (queue entries,
merging identical items, the result cache, the queue bound), `policy` (pure functions: what
runs next, which entries form a batch, the batch budget) and `dispatch` (worker slots, running
work between a long batch's layers through the worker's layer hook, worker loss). All but
`worker` are torch-free.

May import `service.models`, `service.errors`, `service.metrics` and `esm2_wire`; never
`service.api`.
"""
