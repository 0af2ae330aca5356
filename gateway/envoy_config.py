"""Render gateway/envoy.yaml: ports, upstream and body limits of the JSON gateway.

    python -m gateway.envoy_config --http-port 8080 --upstream esm2:50051 > envoy.yaml
"""

from __future__ import annotations

import argparse
import json
import os
import string
import sys
from dataclasses import dataclass
from pathlib import Path

from service.json_limits import DEFAULT_MAX_JSON_RESPONSE_MB, DEFAULT_MAX_REQUEST_BYTES

GATEWAY_DIR = Path(__file__).resolve().parent
TEMPLATE = GATEWAY_DIR / "envoy.yaml"
LUA = GATEWAY_DIR / "edge.lua"
DESCRIPTOR = GATEWAY_DIR / "esm2_descriptor.pb"
# The server refuses JSON responses above --max-json-response-mb with a 400 that
# points to the streaming RPCs; Envoy's transcoder limit sits a little above it so
# that every response the server sends gets through whole.
RESPONSE_SLACK_BYTES = 1 << 20


@dataclass(frozen=True)
class GatewayConfig:
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 50051
    # Envoy's admin interface can stop the gateway and turn on logging of every header:
    # off unless asked for, and then only on a Unix socket that only this user can open.
    admin_socket: Path | None = None
    # A listener that serves only /healthz and is exempt from max_connections, so that
    # probes are answered while clients hold every connection; None: none.
    health_port: int | None = None
    max_json_response_mb: int = DEFAULT_MAX_JSON_RESPONSE_MB
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    request_timeout_s: int = 600
    request_headers_timeout_s: int = 10
    request_receive_timeout_s: int = 30
    stream_idle_timeout_s: int = 300
    connection_idle_timeout_s: int = 60
    max_connections: int = 10000
    max_path_bytes: int = 2048
    max_header_bytes: int = 6144
    max_authorization_bytes: int = 1024
    descriptor: Path = DESCRIPTOR


def render(config: GatewayConfig) -> str:
    if not config.descriptor.is_file():
        raise FileNotFoundError(f"{config.descriptor} is missing: run `make protos`")
    admin = ""
    if config.admin_socket is not None:
        admin = f'admin:\n  address:\n    pipe: {{path: "{Path(config.admin_socket).resolve()}", mode: 384}}  # 0600\n'
    return string.Template(TEMPLATE.read_text()).substitute(
        http_host=config.http_host,
        http_port=config.http_port,
        upstream_host=config.upstream_host,
        upstream_port=config.upstream_port,
        descriptor=config.descriptor.resolve(),
        max_request_body_bytes=config.max_request_bytes,
        max_response_body_bytes=(config.max_json_response_mb << 20) + RESPONSE_SLACK_BYTES,
        request_timeout_s=config.request_timeout_s,
        request_headers_timeout_s=config.request_headers_timeout_s,
        request_receive_timeout_s=config.request_receive_timeout_s,
        stream_idle_timeout_s=config.stream_idle_timeout_s,
        connection_idle_timeout_s=config.connection_idle_timeout_s,
        max_connections=config.max_connections,
        lua_code=json.dumps(lua_code(config)),
        admin=admin,
        health_listener=HEALTH_LISTENER.format(host=config.http_host, port=config.health_port)
        if config.health_port else "",
    )


HEALTH_LISTENER = """\
  - name: health
    address:
      socket_address: {{address: "{host}", port_value: {port}}}
    enable_reuse_port: false
    ignore_global_conn_limit: true
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: health
          request_headers_timeout: 5s
          common_http_protocol_options: {{idle_timeout: 10s}}
          route_config:
            virtual_hosts:
            - name: health
              domains: ["*"]
              routes:
              - match: {{prefix: "/"}}
                direct_response: {{status: 404, body: {{inline_string: "only /healthz is served here"}}}}
          http_filters:
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers:
              - name: ":path"
                string_match: {{exact: "/healthz"}}
              cluster_min_healthy_percentages:
                esm2_grpc: {{value: 100}}
          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""


def lua_code(config: GatewayConfig) -> str:
    code = LUA.read_text()
    for name in ("max_path_bytes", "max_header_bytes", "max_authorization_bytes"):
        code = code.replace("${%s}" % name, str(getattr(config, name)))
    return code


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
    parser.add_argument("--admin-socket", type=Path, default=d.admin_socket,
                        help="serve Envoy's admin interface on this Unix socket (mode 0600); off by default")
    parser.add_argument("--max-json-response-mb", type=int,
                        default=int(os.environ.get("ESM_MAX_JSON_RESPONSE_MB", d.max_json_response_mb)),
                        help="largest JSON response; must match the server's flag of the same name")
    parser.add_argument("--max-request-bytes", type=int, default=d.max_request_bytes,
                        help="largest (decompressed) JSON request body")
    parser.add_argument("--request-timeout-s", type=int, default=d.request_timeout_s,
                        help="longest a JSON request may take, queueing and inference included")
    parser.add_argument("--request-headers-timeout-s", type=int, default=d.request_headers_timeout_s,
                        help="a request's headers must arrive within this")
    parser.add_argument("--request-receive-timeout-s", type=int, default=d.request_receive_timeout_s,
                        help="a whole request (headers and body) must arrive within this")
    parser.add_argument("--stream-idle-timeout-s", type=int, default=d.stream_idle_timeout_s,
                        help="a request with no bytes in either direction for this long is reset")
    parser.add_argument("--connection-idle-timeout-s", type=int, default=d.connection_idle_timeout_s,
                        help="a connection with no request for this long is closed")
    parser.add_argument("--max-connections", type=int, default=d.max_connections,
                        help="downstream connections Envoy accepts in all")
    parser.add_argument("--health-port", type=int, default=d.health_port,
                        help="also serve /healthz on this port, answered even when --max-connections are taken")
    parser.add_argument("--max-path-bytes", type=int, default=d.max_path_bytes, help="longer URL paths get 414")
    parser.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                        help="request headers above this in total get 431")
    parser.add_argument("--max-authorization-bytes", type=int, default=d.max_authorization_bytes,
                        help="longer Authorization headers get 401")


def config_from_args(args: argparse.Namespace, upstream: tuple[str, int] | None = None) -> GatewayConfig:
    upstream_host, upstream_port = upstream or args.upstream or ("127.0.0.1", 50051)
    return GatewayConfig(
        http_host=args.http_host, http_port=args.http_port, upstream_host=upstream_host,
        upstream_port=upstream_port, admin_socket=args.admin_socket,
        max_json_response_mb=args.max_json_response_mb, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout_s, request_headers_timeout_s=args.request_headers_timeout_s,
        request_receive_timeout_s=args.request_receive_timeout_s, stream_idle_timeout_s=args.stream_idle_timeout_s,
        connection_idle_timeout_s=args.connection_idle_timeout_s, max_connections=args.max_connections, health_port=args.health_port,
        max_path_bytes=args.max_path_bytes, max_header_bytes=args.max_header_bytes,
        max_authorization_bytes=args.max_authorization_bytes,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.envoy_config", description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.stdout.write(render(config_from_args(parser.parse_args(argv))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
