"""Render gateway/envoy.yaml: listener, model pools, retries and limits of the gateway.

    python -m gateway.envoy_config --http-port 8080 --upstream esm2:50051 > envoy.yaml
    python -m gateway.envoy_config --pool esm2-8m=127.0.0.1:50051,127.0.0.1:50052 \\
        --pool esm2-650m=esm2-650m.esm2.svc.cluster.local:50051 > envoy.yaml
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import re
import shlex
import string
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import ConfigDict, field_validator
from pydantic_settings import NoDecode

from esm2_wire.proto import MODEL_HEADER
from service.config import Declared, JsonEdgeLimits, add_flags, from_flags, parser_for, setting

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


class EnvoySettings(JsonEdgeLimits):
    """The gateway's settings that the rendered Envoy config depends on (declared as service.config
    declares the server's; the JSON edge's limits are the server's own declaration)."""

    http_host: str = setting("0.0.0.0", help="JSON listener address")
    http_port: int = setting(8080, ge=1, le=65535, help="JSON listener port")
    # Envoy's admin interface can stop the gateway and turn on logging of every header:
    # off unless asked for, and then only on a Unix socket that only this user can open.
    admin_socket: Path | None = setting(
        None, help="serve Envoy's admin interface on this Unix socket (mode 0600); off by default")
    # A listener that serves only /healthz and is exempt from max_connections, so that
    # probes are answered while clients hold every connection; None: none.
    health_port: int | None = setting(
        None, ge=1, le=65535, help="also serve /healthz on this port, answered even when --max-connections are taken")
    # A listener that serves only GET /stats/prometheus (Envoy's stats, read through the admin
    # socket) for Prometheus; None: none. Needs admin_socket.
    stats_port: int | None = setting(
        None, ge=1, le=65535,
        help="serve Envoy's stats for Prometheus (GET /stats/prometheus, nothing else) on this port; needs --admin-socket")
    request_timeout_s: int = setting(600, ge=1, help="longest a JSON request may take, queueing and inference included")
    request_headers_timeout_s: int = setting(10, ge=1, help="a request's headers must arrive within this")
    request_receive_timeout_s: int = setting(30, ge=1, help="a whole request (headers and body) must arrive within this")
    stream_idle_timeout_s: int = setting(300, ge=1, help="a request with no bytes in either direction for this long is reset")
    connection_idle_timeout_s: int = setting(60, ge=1, help="a connection with no request for this long is closed")
    max_connections: int = setting(10000, ge=1, help="downstream connections Envoy accepts in all")
    max_path_bytes: int = setting(2048, ge=1, help="longer URL paths get 414")
    max_header_bytes: int = setting(6144, ge=1, help="request headers above this in total get 431")
    max_authorization_bytes: int = setting(1024, ge=1, help="longer Authorization headers get 401")
    # A unary try that takes longer (a hung replica) is retried on another one; set it
    # above the slowest legitimate request of the largest model on your hardware.
    per_try_timeout_s: int = setting(
        120, ge=1, help="a unary call's try on one replica; past it, the call is retried on another")
    retries: int = setting(3, ge=0, help="retries per call, each on another replica")
    # Concurrent retries allowed, as a share of the pool's active requests: a replica that dies
    # takes 1/N of them down at once, and every one of those must be retried (N >= 2).
    retry_budget_percent: int = setting(
        50, ge=0, le=100, help="concurrent retries allowed, as a share of a pool's active requests")
    max_requests_per_pool: int = setting(1024, ge=1, help="circuit breaker: concurrent requests to one pool")


class GatewayConfig(EnvoySettings):
    """What render() needs: the settings, and the pools they resolve to."""

    model_config = ConfigDict(frozen=True)

    # The default pool when `pools` is empty: one server, as a single-host gateway.
    upstream_host: str = "127.0.0.1"
    upstream_port: int = 50051
    pools: tuple[Pool, ...] = ()
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


class GatewaySettings(Declared, EnvoySettings):
    """The gateway's flags (gateway.envoy_config and gateway.launch), each with its ESM_* variable."""

    upstream: Annotated[tuple[tuple[str, int], ...] | None, NoDecode] = setting(
        None, metavar="HOST:PORT[,HOST:PORT...]",
        help="the default pool: servers for every model without a pool of its own (default 127.0.0.1:50051, "
             "or the launched server)")
    pool: Annotated[list[Pool], NoDecode] = setting(
        [], repeat=True, metavar="MODEL=HOST:PORT[,...]",
        help=f"servers of one model (repeatable; the variable is space-separated); gRPC calls name it in the "
             f"{MODEL_HEADER} header, JSON calls in the path. A DNS name is resolved to all its addresses "
             f"(STRICT_DNS)")

    @field_validator("upstream", mode="before")
    @classmethod
    def _endpoints(cls, value):
        return _parsed(endpoints, value) if isinstance(value, str) else value

    @field_validator("pool", mode="before")
    @classmethod
    def _pools(cls, value):
        if isinstance(value, str):
            value = value.split()
        return [_parsed(model_pool, v) if isinstance(v, str) else v for v in value]


def _parsed(parse, text: str):
    try:
        return parse(text)
    except argparse.ArgumentTypeError as exc:
        raise ValueError(str(exc)) from None


def add_arguments(parser: argparse.ArgumentParser, declaration: type[GatewaySettings] = GatewaySettings) -> None:
    """Gateway flags, shared with gateway.launch: made from the declaration."""
    add_flags(parser, declaration)


def config_from_args(args: GatewaySettings, upstream: tuple[tuple[str, int], ...] | None = None,
                     pools: tuple[Pool, ...] = ()) -> GatewayConfig:
    """Settings to a config; `upstream` (the launched servers) stands in for a missing --upstream."""
    default = args.upstream or upstream
    all_pools = tuple(args.pool) + tuple(pools)
    if default and all_pools:
        all_pools = all_pools + (Pool(None, tuple(default)),)
    elif default and len(default) > 1:
        all_pools = (Pool(None, tuple(default)),)
    host, port = default[0] if default else ("127.0.0.1", 50051)
    return GatewayConfig(
        **{name: getattr(args, name) for name in EnvoySettings.model_fields},
        upstream_host=host, upstream_port=port, pools=all_pools,
        descriptor=getattr(args, "descriptor", None) or DESCRIPTOR,
    )


class RenderSettings(GatewaySettings):
    """`python -m gateway.envoy_config`: the gateway's settings and where the output goes."""

    descriptor: Path | None = setting(
        None, env=False, help="descriptor set path as Envoy will see it (default: this checkout's, which must exist)")
    configmap: str | None = setting(None, env=False, metavar="NAME",
                                    help="print a Kubernetes ConfigMap NAME holding the config")


def configmap(name: str, envoy_yaml: str, command: str) -> str:
    """A Kubernetes ConfigMap holding the config, headed by the command that rendered it."""
    return (
        f"# Rendered by `{command}`; do not edit (tests/test_deploy.py re-renders and compares).\n"
        f"apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {name}\ndata:\n  envoy.yaml: |\n"
        + textwrap.indent(envoy_yaml, "    ", lambda line: line.strip() != "")
    )


def main(argv: list[str] | None = None) -> int:
    parser = parser_for(RenderSettings, prog="python -m gateway.envoy_config", description=__doc__.splitlines()[0])
    args = from_flags(RenderSettings, parser.parse_args(argv), parser)
    text = render(config_from_args(args), check_descriptor=args.descriptor is None)
    if args.configmap:
        text = configmap(args.configmap, text, "python -m gateway.envoy_config " + shlex.join(
            sys.argv[1:] if argv is None else argv))
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
