"""JSON REST gateway: Envoy config rendering and the server+Envoy launcher."""
