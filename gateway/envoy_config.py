"""Render gateway/envoy.yaml: ports, upstream and body limits of the JSON gateway.

    python -m gateway.envoy_config --http-port 8080 --upstream esm2:50051 > envoy.yaml
"""

from __future__ import annotations

import argparse
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from service.json_limits import DEFAULT_MAX_JSON_RESPONSE_MB

GATEWAY_DIR = Path(__file__).resolve().parent
TEMPLATE = GATEWAY_DIR / "envoy.yaml"
DESCRIPTOR = GATEWAY_DIR / "esm2_descriptor.pb"
# The server refuses JSON responses above --max-json-response-mb with a 400 that
# points to the streaming RPCs; Envoy's transcoder limit sits a little above it so
# that every response the server sends gets through whole.
RESPONSE_SLACK_BYTES = 1 << 20
# 8 predict items of 2048 tokens written as `<mask>` are ~100 KB; gzip bodies are
# limited after decompression.
DEFAULT_MAX_REQUEST_BYTES = 4 << 20


@dataclass(frozen=True)
class GatewayConfig:
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 50051
    admin_host: str = "127.0.0.1"
    admin_port: int | None = 9901  # None: no admin interface
    max_json_response_mb: int = DEFAULT_MAX_JSON_RESPONSE_MB
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout_s: int = 600
    descriptor: Path = DESCRIPTOR


def render(config: GatewayConfig) -> str:
    if not config.descriptor.is_file():
        raise FileNotFoundError(f"{config.descriptor} is missing: run `make protos`")
    admin = ""
    if config.admin_port is not None:
        admin = (
            "admin:\n  address:\n"
            f'    socket_address: {{address: "{config.admin_host}", port_value: {config.admin_port}}}\n'
        )
    return string.Template(TEMPLATE.read_text()).substitute(
        http_host=config.http_host,
        http_port=config.http_port,
        upstream_host=config.upstream_host,
        upstream_port=config.upstream_port,
        descriptor=config.descriptor.resolve(),
        max_request_body_bytes=config.max_request_bytes,
        max_response_body_bytes=(config.max_json_response_mb << 20) + RESPONSE_SLACK_BYTES,
        request_timeout_s=config.request_timeout_s,
        admin=admin,
    )


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Gateway flags, shared with gateway.launch."""
    d = GatewayConfig()
    parser.add_argument("--http-host", default=d.http_host, help="JSON listener address")
    parser.add_argument("--http-port", type=int, default=d.http_port, help="JSON listener port")
    parser.add_argument("--upstream", type=host_port, metavar="HOST:PORT",
                        help="gRPC server to transcode to (default 127.0.0.1:50051, or the launched server)")
    parser.add_argument("--admin-port", type=int, default=d.admin_port,
                        help="Envoy admin port on 127.0.0.1 (0 picks a free one, -1 disables)")
    parser.add_argument("--max-json-response-mb", type=int,
                        default=int(os.environ.get("ESM_MAX_JSON_RESPONSE_MB", d.max_json_response_mb)),
                        help="largest JSON response; must match the server's flag of the same name")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help="largest (decompressed) JSON request body")
    parser.add_argument("--request-timeout-s", type=int, default=d.request_timeout_s)


def config_from_args(args: argparse.Namespace, upstream: tuple[str, int] | None = None) -> GatewayConfig:
    upstream_host, upstream_port = upstream or args.upstream or ("127.0.0.1", 50051)
    return GatewayConfig(
        http_host=args.http_host, http_port=args.http_port, upstream_host=upstream_host,
        upstream_port=upstream_port, admin_port=None if args.admin_port < 0 else args.admin_port,
        max_json_response_mb=args.max_json_response_mb, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout_s,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.envoy_config", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.stdout.write(render(config_from_args(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
