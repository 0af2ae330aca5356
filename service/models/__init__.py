"""The networks: the ESM-2 forward pass, loading fair-esm and Hugging Face checkpoints safely,
where a model's weights are, whether it fits its device, precision support and batch budgets,
and random-weight checkpoints for tests.

May import only `service.errors`, `service.metrics` and `esm2_wire`; never `service.api` or
`service.engine`.
"""
