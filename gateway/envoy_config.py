"""Render gateway/envoy.yaml: listener, model pools, retries and limits of the gateway.

    python -m gateway.envoy_config --http-port 8080 --upstream esm2:50051 > envoy.yaml
    python -m gateway.envoy_config --pool esm2-8m=127.0.0.1:50051,127.0.0.1:50052 \\
        --pool esm2-650m=esm2-650m.esm2.svc.cluster.local:50051 > envoy.yaml
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import os
import re
import shlex
import string
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

from esm2_wire.proto import MODEL_HEADER
from service.api.json_limits import DEFAULT_MAX_JSON_RESPONSE_MB, DEFAULT_MAX_REQUEST_BYTES

GATEWAY_DIR = Path(__file__).resolve().parent
TEMPLATE = GATEWAY_DIR / "envoy.yaml"
LUA = GATEWAY_DIR / "edge.lua"
DESCRIPTOR = GATEWAY_DIR / "esm2_descriptor.pb"
# The server refuses JSON responses above --max-json-response-mb with a 400 that
# points to the streaming RPCs; Envoy's transcoder limit sits a little above it so
# that every response the server sends gets through whole.
RESPONSE_SLACK_BYTES = 1 << 20


# Model servers behind the gateway. Every pool is one Envoy cluster.
HEALTH_CHECK_INTERVAL_S = 1
# The servers' drain window (--drain-seconds) must exceed what Envoy needs to see a
# NOT_SERVING replica: UNHEALTHY_THRESHOLD failed checks, INTERVAL apart (plus jitter).
UNHEALTHY_THRESHOLD = 2

SERVICE_PATH = "/esm.v1.Esm2Service/"
# The transcoder turns a JSON path (which names the model) into a gRPC method path and matches
# routes again; the path it was given stays in this header.
JSON_PATH_HEADER = "x-envoy-original-path"
STREAM_METHODS = ("EncodeStream", "PredictStream")


@dataclass(frozen=True)
class Pool:
    """Replicas serving one model (or, with model None, the default pool for everything else).

    Endpoints are `host:port`; a DNS name (a Kubernetes headless Service) is resolved
    with STRICT_DNS, one upstream host per address.
    """

    model: str | None
    endpoints: tuple[tuple[str, int], ...]

    @property
    def cluster(self) -> str:
        return "esm2_grpc" if self.model is None else f"pool_{self.model}"


@dataclass(frozen=True)
class GatewayConfig:
    http_host: str = "0.0.0.0"
    http_port: int = 8080
    # The default pool when `pools` is empty: one server, as a single-host gateway.
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 50051
    # Envoy's admin interface can stop the gateway and turn on logging of every header:
    # off unless asked for, and then only on a Unix socket that only this user can open.
    admin_socket: Path | None = None
    # A listener that serves only /healthz and is exempt from max_connections, so that
    # probes are answered while clients hold every connection; None: none.
    health_port: int | None = None
    # A listener that serves only GET /stats/prometheus (Envoy's stats, read through the admin
    # socket) for Prometheus; None: none. Needs admin_socket.
    stats_port: int | None = None
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
    pools: tuple[Pool, ...] = ()
    # A unary try that takes longer (a hung replica) is retried on another one; set it
    # above the slowest legitimate request of the largest model on your hardware.
    per_try_timeout_s: int = 120
    retries: int = 3
    # Concurrent retries allowed, as a share of the pool's active requests: a replica that dies
    # takes 1/N of them down at once, and every one of those must be retried (N >= 2).
    retry_budget_percent: int = 50
    max_requests_per_pool: int = 1024  # circuit breaker: concurrent requests to one pool
    descriptor: Path = DESCRIPTOR

    def all_pools(self) -> tuple[Pool, ...]:
        return self.pools or (Pool(None, ((self.upstream_host, self.upstream_port),)),)


def render(config: GatewayConfig, check_descriptor: bool = True) -> str:
    if check_descriptor and not config.descriptor.is_file():
        raise FileNotFoundError(f"{config.descriptor} is missing: run `make protos`")
    if config.stats_port and config.admin_socket is None:
        raise ValueError("the stats listener (--stats-port) reads Envoy's admin socket: give --admin-socket too")
    admin = ""
    if config.admin_socket is not None:
        admin = f'admin:\n  address:\n    pipe: {{path: "{Path(config.admin_socket).resolve()}", mode: 384}}  # 0600\n'
    pools = config.all_pools()
    # /healthz is healthy while every pool has a healthy replica.
    healthy = "".join(f"                {p.cluster}: {{value: 1}}\n" for p in pools)
    return string.Template(TEMPLATE.read_text()).substitute(
        http_host=config.http_host,
        http_port=config.http_port,
        descriptor=config.descriptor if not check_descriptor else config.descriptor.resolve(),
        max_request_body_bytes=config.max_request_bytes,
        max_response_body_bytes=(config.max_json_response_mb << 20) + RESPONSE_SLACK_BYTES,
        routes=render_routes(config, pools),
        retry_policy=render_vhost_retry_policy(config),
        healthy_percentages=healthy,
        clusters="".join(render_cluster(config, p) for p in pools)
        + (ADMIN_CLUSTER.format(socket=Path(config.admin_socket).resolve()) if config.stats_port else ""),
        request_timeout_s=config.request_timeout_s,
        request_headers_timeout_s=config.request_headers_timeout_s,
        request_receive_timeout_s=config.request_receive_timeout_s,
        stream_idle_timeout_s=config.stream_idle_timeout_s,
        connection_idle_timeout_s=config.connection_idle_timeout_s,
        max_connections=config.max_connections,
        lua_code=json.dumps(lua_code(config)),
        admin=admin,
        side_listeners=side_listeners(config, healthy),
    )


# ---- routes -------------------------------------------------------------------------
# gRPC statuses (and transport failures) that say "this replica could not take it, another may":
# all our RPCs are idempotent reads of a model, so a retry never duplicates an effect.
RETRY_ON = "unavailable,resource-exhausted,cancelled,reset,connect-failure,refused-stream"


def _retry_policy(config: GatewayConfig, per_try_timeout: bool) -> str:
    # Envoy retries only while no response header has gone downstream: a stream is
    # retried before its first message, never after.
    timeout = f"\n    per_try_timeout: {config.per_try_timeout_s}s" if per_try_timeout else ""
    return f"""\
  retry_policy:
    retry_on: "{RETRY_ON}"
    num_retries: {config.retries}{timeout}
    retry_back_off: {{base_interval: 0.025s, max_interval: 0.25s}}
    # The server's queue-full answer carries retry-after (seconds).
    rate_limited_retry_back_off:
      reset_headers: [{{name: retry-after, format: SECONDS}}]
      max_interval: 1s
    # Every retry goes to a replica this request has not tried yet.
    retry_host_predicate:
    - name: envoy.retry_host_predicates.previous_hosts
      typed_config:
        "@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate
    host_selection_retry_max_attempts: 5
"""


def _route(name: str, match: str, cluster: str, config: GatewayConfig, stream: bool) -> str:
    # Unary calls take the virtual host's retry policy; streams their own, without a per-try
    # timeout (a stream of thousands of sequences runs long).
    policy = textwrap.indent(_retry_policy(config, per_try_timeout=False), "  ") if stream else ""
    return f"""\
- name: {name}
  match:
{textwrap.indent(match, "    ")}  route:
    cluster: {cluster}
    timeout: {config.request_timeout_s}s
{policy}"""


def render_routes(config: GatewayConfig, pools: tuple[Pool, ...]) -> str:
    """Per model: its JSON paths and its gRPC calls (by header); the rest to the fallback pool."""
    routes = []
    streams = "|".join(STREAM_METHODS)
    for pool in pools:
        if pool.model is None:
            continue
        model = re.escape(pool.model)
        header = f"headers:\n- name: {MODEL_HEADER}\n  string_match: {{exact: {_quote(pool.model)}}}\n"
        # JSON paths name the model. Envoy's regexes match whole values.
        json_path = _quote(f"/api/v3/(schema/)?{model}/.*")
        routes.append(_route(
            f"{pool.model}_json",
            f"prefix: /\nheaders:\n- name: {JSON_PATH_HEADER}\n  string_match: {{safe_regex: {{regex: {json_path}}}}}\n",
            pool.cluster, config, stream=False))
        routes.append(_route(
            f"{pool.model}_grpc_stream",
            f"safe_regex: {{regex: {_quote('^' + re.escape(SERVICE_PATH) + f'({streams})$')}}}\n{header}",
            pool.cluster, config, stream=True))
        routes.append(_route(f"{pool.model}_grpc", f"prefix: /\n{header}", pool.cluster, config,
                             stream=False))
    # Everything else (ListModels, calls without the header, unknown models) goes to the default
    # pool, or to the first model's pool: the server answers an unknown model with its 404.
    fallback = next((p for p in pools if p.model is None), pools[0])
    routes.append(_route(
        "fallback_stream",
        f"safe_regex: {{regex: {_quote('^' + re.escape(SERVICE_PATH) + f'({streams})$')}}}\n",
        fallback.cluster, config, stream=True))
    routes.append(_route("fallback", "prefix: /\n", fallback.cluster, config, stream=False))
    return textwrap.indent("".join(routes), " " * 14)


def render_vhost_retry_policy(config: GatewayConfig) -> str:
    return textwrap.indent(_retry_policy(config, per_try_timeout=True), " " * 12)


def _quote(text: str) -> str:
    return json.dumps(text)  # a JSON string is a YAML double-quoted scalar


# ---- clusters -----------------------------------------------------------------------
def render_cluster(config: GatewayConfig, pool: Pool) -> str:
    static = all(_is_ip(host) for host, _ in pool.endpoints)
    endpoints = "".join(
        f"""\
        - endpoint:
            address:
              socket_address: {{address: {_quote(host)}, port_value: {port}}}
""" for host, port in pool.endpoints)
    return f"""\
  - name: {pool.cluster}
    type: {"STATIC" if static else "STRICT_DNS"}
    connect_timeout: 5s
    per_connection_buffer_limit_bytes: 4194304
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config:
          http2_protocol_options:
            initial_stream_window_size: 16777216
            initial_connection_window_size: 33554432
    # Requests queue on the server, so the replica with the fewest in flight is the least loaded.
    lb_policy: LEAST_REQUEST
    load_assignment:
      cluster_name: {pool.cluster}
      endpoints:
      - lb_endpoints:
{endpoints}    # The server answers health per model name; "" is the whole server.
    health_checks:
    - timeout: 5s
      interval: {HEALTH_CHECK_INTERVAL_S}s
      no_traffic_interval: {HEALTH_CHECK_INTERVAL_S}s
      interval_jitter: 0.1s
      unhealthy_threshold: {UNHEALTHY_THRESHOLD}
      healthy_threshold: 1
      grpc_health_check: {{service_name: {_quote(pool.model or "")}}}
    # Connection failures and resets eject a replica at once, before health checks notice;
    # queue-full (429) and caller errors (4xx) never do.
    outlier_detection:
      split_external_local_origin_errors: true
      consecutive_local_origin_failure: 2
      consecutive_gateway_failure: 3
      consecutive_5xx: 5
      interval: 1s
      base_ejection_time: 5s
      max_ejection_percent: 50
    circuit_breakers:
      thresholds:
      - priority: DEFAULT
        max_connections: {config.max_requests_per_pool}
        max_pending_requests: {config.max_requests_per_pool}
        max_requests: {config.max_requests_per_pool}
        retry_budget:
          budget_percent: {{value: {config.retry_budget_percent}}}
          min_retry_concurrency: 8
"""


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


# Listeners beside the API's, outside its connection cap (ignore_global_conn_limit), each
# serving one thing and 404 for the rest: /healthz (--health-port) and Envoy's stats (--stats-port).
SIDE_LISTENER = """\
  - name: {name}
    address:
      socket_address: {{address: "{host}", port_value: {port}}}
    enable_reuse_port: false
    ignore_global_conn_limit: true
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {name}
          request_headers_timeout: 5s
          common_http_protocol_options: {{idle_timeout: {idle_timeout_s}s}}
          route_config:
            virtual_hosts:
            - name: {name}
              domains: ["*"]
              routes:
{routes}              - match: {{prefix: "/"}}
                direct_response: {{status: 404, body: {{inline_string: "only {served} is served here"}}}}
          http_filters:
{filters}          - name: envoy.filters.http.router
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
"""

HEALTH_FILTER = """\
          - name: envoy.filters.http.health_check
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.health_check.v3.HealthCheck
              pass_through_mode: false
              headers:
              - name: ":path"
                string_match: {exact: "/healthz"}
              cluster_min_healthy_percentages:
"""

# The admin interface itself stays on its Unix socket (it can stop Envoy and change logging);
# the stats listener forwards exactly one read-only page of it, for Prometheus.
STATS_ROUTE = """\
              - match:
                  path: "/stats/prometheus"
                  headers: [{name: ":method", string_match: {exact: GET}}]
                route: {cluster: envoy_admin, timeout: 10s}
"""


def side_listeners(config: GatewayConfig, healthy: str) -> str:
    health = SIDE_LISTENER.format(name="health", host=config.http_host, port=config.health_port, idle_timeout_s=10,
                                  routes="", served="/healthz", filters=HEALTH_FILTER + healthy)
    stats = SIDE_LISTENER.format(name="stats", host=config.http_host, port=config.stats_port, idle_timeout_s=60,
                                 routes=STATS_ROUTE, served="GET /stats/prometheus", filters="")
    return (health if config.health_port else "") + (stats if config.stats_port else "")


ADMIN_CLUSTER = """\
  - name: envoy_admin
    type: STATIC
    connect_timeout: 1s
    load_assignment:
      cluster_name: envoy_admin
      endpoints:
      - lb_endpoints:
        - endpoint:
            address:
              pipe: {{path: "{socket}"}}
"""


def lua_code(config: GatewayConfig) -> str:
    code = LUA.read_text()
    for name in ("max_path_bytes", "max_header_bytes", "max_authorization_bytes"):
        code = code.replace("${%s}" % name, str(getattr(config, name)))
    return code


def host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host.strip("[]"), int(port)


def endpoints(text: str) -> tuple[tuple[str, int], ...]:
    return tuple(host_port(part) for part in text.split(",") if part.strip())


def model_pool(text: str) -> Pool:
    model, sep, rest = text.partition("=")
    if not sep or not model.strip():
        raise argparse.ArgumentTypeError(f"expected MODEL=HOST:PORT[,HOST:PORT...], got {text!r}")
    return Pool(model.strip(), endpoints(rest))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Gateway flags, shared with gateway.launch."""
    d = GatewayConfig()
    parser.add_argument("--http-host", default=d.http_host, help="JSON listener address")
    parser.add_argument("--http-port", type=int, default=d.http_port, help="JSON listener port")
    parser.add_argument("--upstream", type=endpoints, metavar="HOST:PORT[,HOST:PORT...]",
                        help="the default pool: servers for every model without a pool of its own "
                             "(default 127.0.0.1:50051, or the launched server)")
    parser.add_argument("--pool", type=model_pool, action="append", default=[], metavar="MODEL=HOST:PORT[,...]",
                        help=f"servers of one model (repeatable); gRPC calls name it in the {MODEL_HEADER} header, "
                             "JSON calls in the path. A DNS name is resolved to all its addresses (STRICT_DNS)")
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
    parser.add_argument("--stats-port", type=int, default=d.stats_port,
                        help="serve Envoy's stats for Prometheus (GET /stats/prometheus, nothing else) on this port; "
                             "needs --admin-socket")
    parser.add_argument("--max-path-bytes", type=int, default=d.max_path_bytes, help="longer URL paths get 414")
    parser.add_argument("--max-header-bytes", type=int, default=d.max_header_bytes,
                        help="request headers above this in total get 431")
    parser.add_argument("--max-authorization-bytes", type=int, default=d.max_authorization_bytes,
                        help="longer Authorization headers get 401")
    parser.add_argument("--per-try-timeout-s", type=int, default=d.per_try_timeout_s,
                        help="a unary call's try on one replica; past it, the call is retried on another")
    parser.add_argument("--retries", type=int, default=d.retries, help="retries per call, each on another replica")
    parser.add_argument("--retry-budget-percent", type=int, default=d.retry_budget_percent,
                        help="concurrent retries allowed, as a share of a pool's active requests")
    parser.add_argument("--max-requests-per-pool", type=int, default=d.max_requests_per_pool,
                        help="circuit breaker: concurrent requests to one pool")


def config_from_args(args: argparse.Namespace, upstream: tuple[tuple[str, int], ...] | None = None,
                     pools: tuple[Pool, ...] = ()) -> GatewayConfig:
    """Flags to a config; `upstream` (the launched servers) stands in for a missing --upstream."""
    default = args.upstream or upstream
    all_pools = tuple(args.pool) + tuple(pools)
    if default and all_pools:
        all_pools = all_pools + (Pool(None, tuple(default)),)
    elif default and len(default) > 1:
        all_pools = (Pool(None, tuple(default)),)
    host, port = default[0] if default else ("127.0.0.1", 50051)
    return GatewayConfig(
        http_host=args.http_host, http_port=args.http_port, upstream_host=host, upstream_port=port,
        pools=all_pools, admin_socket=args.admin_socket,
        max_json_response_mb=args.max_json_response_mb, max_request_bytes=args.max_request_bytes,
        request_timeout_s=args.request_timeout_s, request_headers_timeout_s=args.request_headers_timeout_s,
        request_receive_timeout_s=args.request_receive_timeout_s, stream_idle_timeout_s=args.stream_idle_timeout_s,
        connection_idle_timeout_s=args.connection_idle_timeout_s, max_connections=args.max_connections,
        health_port=args.health_port, stats_port=args.stats_port, max_path_bytes=args.max_path_bytes, max_header_bytes=args.max_header_bytes,
        max_authorization_bytes=args.max_authorization_bytes, per_try_timeout_s=args.per_try_timeout_s,
        retries=args.retries, retry_budget_percent=args.retry_budget_percent,
        max_requests_per_pool=args.max_requests_per_pool,
        descriptor=getattr(args, "descriptor", None) or DESCRIPTOR,
    )


def configmap(name: str, envoy_yaml: str, command: str) -> str:
    """A Kubernetes ConfigMap holding the config, headed by the command that rendered it."""
    return (
        f"# Rendered by `{command}`; do not edit (tests/test_deploy.py re-renders and compares).\n"
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  envoy.yaml: |\n"
        + textwrap.indent(envoy_yaml, "    ", lambda line: line.strip() != "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gateway.envoy_config", description=__doc__.splitlines()[0])
    add_arguments(parser)
    parser.add_argument("--descriptor", type=Path, default=None,
                        help="descriptor set path as Envoy will see it (default: this checkout's, which must exist)")
    parser.add_argument("--configmap", metavar="NAME", help="print a Kubernetes ConfigMap NAME holding the config")
    args = parser.parse_args(argv)
    text = render(config_from_args(args), check_descriptor=args.descriptor is None)
    if args.configmap:
        text = configmap(args.configmap, text, "python -m gateway.envoy_config " + shlex.join(
            sys.argv[1:] if argv is None else argv))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
