"""Envoy's config for the gateway, built as data and dumped as YAML: listener, model pools,
retries and limits.

    python -m gateway.envoy_config --http-port 8080 --upstream esm2:50051 > envoy.yaml
    python -m gateway.envoy_config --pool esm2-8m=127.0.0.1:50051,127.0.0.1:50052 \\
        --pool esm2-650m=esm2-650m.esm2.svc.cluster.local:50051 > envoy.yaml
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import json
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

from pydantic import ConfigDict, field_validator
from pydantic_settings import NoDecode

import yaml

from esm2_wire.proto import FLEET_MODELS_HEADER, MODEL_HEADER
from service.config import Declared, JsonEdgeLimits, add_flags, from_flags, parser_for, setting

GATEWAY_DIR = Path(__file__).resolve().parent
LUA = GATEWAY_DIR / "edge.lua"
CATALOGUE_LUA = GATEWAY_DIR / "catalogue.lua"
DESCRIPTOR = GATEWAY_DIR / "esm2_descriptor.pb"
# The server refuses JSON responses above --max-json-response-mb with a 400 that
# points to the streaming RPCs. It streams JSON bodies a result at a time (EncodeJson and
# PredictJson return a stream of HttpBody, which the transcoder passes on as it comes), so
# Envoy holds none whole; its transcoder limit, a little above the server's, is a backstop.
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
# Scans that may run for hours: their routes have an idle timeout (--stream-idle-timeout-s) instead of
# a total one, and the server sends at least one message every few seconds while passes finish.
SCORE_STREAM_METHODS = ("ScoreStream", "ScoreStreamJson")


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
    otlp_endpoint: str | None = setting(
        None, metavar="HOST:PORT",
        help="turn on OpenTelemetry tracing: Envoy starts a trace per request and sends its spans to this "
             "OTLP/gRPC collector; servers started by gateway.launch send theirs there too")
    log_format: Literal["text", "json"] = setting(
        "text", help="text, or json: Envoy's access log and its own log one JSON object per line (time, level, "
                     "logger, message, request_id; access lines add method, path, http_status, ...); "
                     "gateway.launch's lines and the servers' it starts too")

    @field_validator("otlp_endpoint", mode="after")
    @classmethod
    def _collector(cls, value):
        if value is not None:
            _parsed(host_port, collector_address(value))
        return value


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
    """Envoy's bootstrap config as YAML text."""
    if check_descriptor and not config.descriptor.is_file():
        raise FileNotFoundError(f"{config.descriptor} is missing: run `make protos`")
    if config.stats_port and config.admin_socket is None:
        raise ValueError("the stats listener (--stats-port) reads Envoy's admin socket: give --admin-socket too")
    document = bootstrap(config, config.descriptor.resolve() if check_descriptor else config.descriptor)
    return RENDERED_HEADER + dump_yaml(document)


RENDERED_HEADER = """\
# Envoy v3 config of the ESM-2 gateway, rendered by gateway/envoy_config.py
# (`python -m gateway.envoy_config --help` lists its flags; the comments there say why).
"""


def bootstrap(config: GatewayConfig, descriptor: Path) -> dict:
    """Envoy's bootstrap config as data (envoy.config.bootstrap.v3.Bootstrap)."""
    pools = config.all_pools()
    listeners = [json_listener(config, pools, descriptor)]
    if config.health_port:
        listeners.append(health_listener(config, pools))
    if config.stats_port:
        listeners.append(stats_listener(config))
    document = {
        "static_resources": {
            "listeners": listeners,
            "clusters": [cluster(config, pool) for pool in pools] + ([admin_cluster(config)] if config.stats_port else [])
                        + ([collector_cluster(config.otlp_endpoint)] if config.otlp_endpoint else []),
        },
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": _typed("envoy.extensions.resource_monitors.downstream_connections.v3."
                                   "DownstreamConnectionsConfig",
                                   max_active_downstream_connections=config.max_connections),
        }]},
    }
    if config.admin_socket is not None:
        # Envoy's admin interface can stop the gateway and turn on logging of every header:
        # only on a Unix socket that only this user can open (mode 0600).
        document["admin"] = {"address": {"pipe": {"path": str(Path(config.admin_socket).resolve()), "mode": 0o600}}}
    return document


def _typed(type_name: str, **fields) -> dict:
    """A typed_config: the message's type URL, then its fields."""
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


def _socket_address(host: str, port: int) -> dict:
    return {"socket_address": {"address": host, "port_value": port}}


def _seconds(value: float) -> str:
    return f"{value}s"


HCM = "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"
# Envoy's headers stay on (no suppress_envoy_headers): the servers read x-envoy-expected-rq-timeout-ms,
# the route's timeout or a unary route's per-try timeout, as the deadline of a call that has no gRPC
# deadline (every JSON call), and refuse at once what cannot finish before it (docs/how-it-works.md, "Admission").
ROUTER_FILTER = {"name": "envoy.filters.http.router",
                 "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router")}


def _connection_manager(**fields) -> dict:
    return {"filters": [{"name": "envoy.filters.network.http_connection_manager",
                         "typed_config": _typed(HCM, **fields)}]}


# ---- the JSON and gRPC listener ------------------------------------------------------
# HTTP/JSON on the listener is transcoded to gRPC calls on the servers; gRPC callers use the
# same port (h2c), their requests pass through untouched.
# upstream= is the replica of the last try and tries= how many there were: a failure after retries
# says which replica each caller's answer came from (or failed on).
# The method and path are the client's, as edge.lua recorded them (percent-encoded where a byte
# could break the quoted field); a request Envoy answers before edge.lua is logged as it came.
ACCESS_LOG_FORMAT = ('[%START_TIME%] "%REQ(X-ESM-CLIENT-METHOD?:METHOD)% %REQ(X-ESM-CLIENT-PATH?:PATH)%" %RESPONSE_CODE% '
                     "%RESPONSE_FLAGS% in=%BYTES_RECEIVED% out=%BYTES_SENT% %DURATION%ms id=%REQ(X-REQUEST-ID)% "
                     "upstream=%UPSTREAM_HOST% tries=%UPSTREAM_REQUEST_ATTEMPT_COUNT%\n")


# --log-format json: the same facts as one JSON object per line, in the server's field names
# (service/logs.py: time, level, logger, message, request_id); Envoy escapes every value.
_CLIENT_REQUEST = "%REQ(X-ESM-CLIENT-METHOD?:METHOD)% %REQ(X-ESM-CLIENT-PATH?:PATH)%"
ACCESS_LOG_JSON = {
    "time": "%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%", "level": "INFO", "logger": "envoy.access",
    "message": f"{_CLIENT_REQUEST} %RESPONSE_CODE%", "request_id": "%REQ(X-REQUEST-ID)%",
    "method": "%REQ(X-ESM-CLIENT-METHOD?:METHOD)%", "path": "%REQ(X-ESM-CLIENT-PATH?:PATH)%",
    "http_status": "%RESPONSE_CODE%", "response_flags": "%RESPONSE_FLAGS%", "bytes_in": "%BYTES_RECEIVED%",
    "bytes_out": "%BYTES_SENT%", "duration_ms": "%DURATION%", "upstream": "%UPSTREAM_HOST%",
    "tries": "%UPSTREAM_REQUEST_ATTEMPT_COUNT%",
}
# Envoy's own log lines under --log-format json (its --log-format flag: %j is the message, JSON-escaped).
# A command-line flag rather than the bootstrap's application_log_config, which takes effect only
# once the config is read: the lines before it would still be text.
ENVOY_JSON_LOG_FORMAT = '{"time":"%Y-%m-%dT%T.%eZ","level":"%l","logger":"envoy.%n","message":"%j","request_id":"-"}'


def access_log_format(config: GatewayConfig) -> dict:
    if config.log_format == "json":
        return {"json_format": ACCESS_LOG_JSON}
    return {"text_format_source": {"inline_string": ACCESS_LOG_FORMAT}}


def json_listener(config: GatewayConfig, pools: tuple[Pool, ...], descriptor: Path) -> dict:
    return {
        "name": "json_api",
        "address": _socket_address(config.http_host, config.http_port),
        # The flow-control watermark per downstream connection: past it, Envoy stops reading
        # from the replica for that caller (JSON bodies stream through, a result at a time).
        "per_connection_buffer_limit_bytes": 4194304,
        # A second gateway on the same port fails with "address in use" instead of
        # silently taking half of the connections.
        "enable_reuse_port": False,
        "filter_chains": [_connection_manager(
            stat_prefix="json_api",
            codec_type="AUTO",
            # Slow or idle clients cannot hold connections: the headers must arrive within
            # request_headers_timeout, the whole request within request_timeout, a stream may sit
            # silent for stream_idle_timeout and a connection without requests for idle_timeout
            # (docs/security.md).
            request_headers_timeout=_seconds(config.request_headers_timeout_s),
            request_timeout=_seconds(config.request_receive_timeout_s),
            stream_idle_timeout=_seconds(config.stream_idle_timeout_s),
            common_http_protocol_options={"idle_timeout": _seconds(config.connection_idle_timeout_s),
                                          "max_headers_count": 100},
            # Larger headers get 431 here; the Lua filter answers 431 from max_header_bytes on,
            # so nothing reaches gRPC's 8 KiB metadata limit (429).
            max_request_headers_kb=8,
            access_log=[{
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed("envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                                       log_format=access_log_format(config)),
            }],
            route_config={"name": "esm2", "virtual_hosts": [{
                "name": "esm2",
                "domains": ["*"],
                "retry_policy": retry_policy(config, per_try_timeout=True),
                **fleet_models_header(pools),
                "routes": routes(config, pools),
            }]},
            local_reply_config=LOCAL_REPLIES,
            **request_id_settings(),
            **tracing_settings(config),
            http_filters=[
                # /healthz answers from Envoy: 200 while every pool has a replica passing health checks.
                _health_check_filter(pools),
                # Before the transcoder, so that it compresses the transcoded JSON.
                _COMPRESSOR_FILTER,
                # Content type and encoding, header and path sizes, error bodies: gateway/edge.lua.
                # BioLM's client gzips request bodies: they pass through compressed and the server
                # inflates them, bounded (no decompressor here: its failures truncated bodies and hung).
                {"name": "envoy.filters.http.lua",
                 "typed_config": _typed("envoy.extensions.filters.http.lua.v3.Lua",
                                        default_source_code={"inline_string": lua_code(config)})},
                _transcoder_filter(config, descriptor),
                # After the transcoder, so that it sees gRPC from JSON and gRPC callers alike.
                *([CATALOGUE_FILTER] if len(pools) > 1 else []),
                ROUTER_FILTER,
            ],
        )],
    }


def _json_error(message: str) -> dict:
    return {"json_format": {"detail": message, "errors": [], "status_code": "%RESPONSE_CODE%",
                            "code": "%RESPONSE_CODE_DETAILS%", "message": message,
                            "request_id": "%REQ(X-REQUEST-ID)%"}}


# ---- request ids and traces ------------------------------------------------------------
# Every request gets an x-request-id: the caller's when it is valid (at most 128 letters, digits
# and . _ : -, starting with a letter or digit; service/request_context.py has the same rule),
# else one Envoy makes. Envoy itself either keeps any caller value (preserve_external_request_id:
# echoed raw, however long or odd) or none. So before anything else reads the headers, an early
# header mutation moves the caller's value aside (CALLER_REQUEST_ID_HEADER) and Envoy makes a
# fresh UUID; edge.lua, the first filter, puts the caller's value back if it is valid, and drops
# it otherwise. The id goes to the servers, into Envoy's access log, every response's headers
# (always_set_request_id_in_response) and the JSON error bodies Envoy makes (LOCAL_REPLIES).
CALLER_REQUEST_ID_HEADER = "x-esm-caller-request-id"


def request_id_settings() -> dict:
    return {
        "early_header_mutation_extensions": [{
            "name": "envoy.http.early_header_mutation.header_mutation",
            "typed_config": _typed(
                "envoy.extensions.http.early_header_mutation.header_mutation.v3.HeaderMutation",
                mutations=[
                    # edge.lua's record of the client's method and path (the access log's): never a caller's.
                    {"remove": "x-esm-client-method"},
                    {"remove": "x-esm-client-path"},
                    {"remove": CALLER_REQUEST_ID_HEADER},
                    {"append": {"header": {"key": CALLER_REQUEST_ID_HEADER, "value": "%REQ(x-request-id)%"},
                                "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}},
                    {"remove": "x-request-id"},
                ]),
        }],
        "always_set_request_id_in_response": True,
        # Plain UUIDs: Envoy would otherwise rewrite a digit of its ids to carry the trace decision.
        "request_id_extension": {"typed_config": _typed("envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
                                                        pack_trace_reason=False,
                                                        use_request_id_for_trace_sampling=False)},
    }


COLLECTOR_CLUSTER = "otlp_collector"


def collector_address(endpoint: str) -> str:
    """host:port of an OTLP endpoint given as host:port or http://host:port."""
    return re.sub(r"^[a-z]+://", "", endpoint).rstrip("/")


def tracing_settings(config: GatewayConfig) -> dict:
    """Envoy's OpenTelemetry tracer (off without --otlp-endpoint): a span per request, its W3C
    traceparent sent upstream, where the servers continue the trace (service/tracing.py)."""
    if not config.otlp_endpoint:
        return {}
    return {"tracing": {"provider": {
        "name": "envoy.tracers.opentelemetry",
        "typed_config": _typed("envoy.config.trace.v3.OpenTelemetryConfig",
                               grpc_service={"envoy_grpc": {"cluster_name": COLLECTOR_CLUSTER}, "timeout": "1s"},
                               service_name="esm2-gateway"),
    }}}


def collector_cluster(endpoint: str) -> dict:
    host, port = host_port(collector_address(endpoint))
    return {"name": COLLECTOR_CLUSTER, "type": "STATIC" if _is_ip(host) else "STRICT_DNS", "connect_timeout": "1s",
            "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}})},
            "load_assignment": {"cluster_name": COLLECTOR_CLUSTER, "endpoints": [{"lb_endpoints": [
                {"endpoint": {"address": _socket_address(host, port)}}]}]}}


def _cel_filter(expression: str) -> dict:
    return {"extension_filter": {
        "name": "envoy.access_loggers.extension_filters.cel",
        "typed_config": _typed("envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter",
                               expression=expression)}}


def _status_filter(status: int) -> dict:
    return {"status_code_filter": {"comparison": {
        "op": "EQ", "value": {"default_value": status, "runtime_key": f"esm_local_reply_{status}"}}}}


# Every reply Envoy makes itself (unknown path, body too large, upstream down, timeout, Lua
# checks) is JSON in BioLM's error shape, like the server's errors.
LOCAL_REPLIES = {
    "mappers": [
        # Upstream unavailable: a retry later may succeed.
        {"filter": _status_filter(503),
         "headers_to_add": [{"header": {"key": "retry-after", "value": "1"},
                             "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]},
        # Replies Envoy makes with an empty body.
        {"filter": _status_filter(403), "body": {"inline_string": "upgrade requests (websocket, h2c) are not supported"}},
        {"filter": _cel_filter("response.code_details == 'missing_host_header'"),
         "body": {"inline_string": "the request has no Host header"}},
        {"filter": _cel_filter("response.code_details == 'path_normalization_failed'"),
         "body": {"inline_string": "the URL path is malformed: it must be an absolute path without '#' "
                                   "fragments or '..' above the root"}},
        {"filter": {"response_flag_filter": {"flags": ["DPE"]}},
         "body_format_override": _json_error("malformed HTTP request: %RESPONSE_CODE_DETAILS%")},
    ],
    "body_format": _json_error("%LOCAL_REPLY_BODY%"),
}


def _health_check_filter(pools: tuple[Pool, ...]) -> dict:
    """/healthz, answered by Envoy: healthy while every pool has a healthy replica."""
    return {"name": "envoy.filters.http.health_check",
            "typed_config": _typed("envoy.extensions.filters.http.health_check.v3.HealthCheck",
                                   pass_through_mode=False,
                                   headers=[{"name": ":path", "string_match": {"exact": "/healthz"}}],
                                   cluster_min_healthy_percentages={p.cluster: {"value": 1} for p in pools})}


_COMPRESSOR_FILTER = {
    "name": "envoy.filters.http.compressor",
    "typed_config": _typed(
        "envoy.extensions.filters.http.compressor.v3.Compressor",
        response_direction_config={"common_config": {"min_content_length": 256}},
        compressor_library={"name": "gzip", "typed_config": _typed(
            "envoy.extensions.compression.gzip.compressor.v3.Gzip",
            # Envoy's zlib-ng at level 1 squeezes float text ~1.5x at a few hundred MB/s;
            # level 2 and up reach ~2.3x but run at ~40 MB/s, slower than a LAN.
            compression_level="BEST_SPEED", window_bits=15, memory_level=9, chunk_size=65536)}),
}


TRANSCODER_FILTER_NAME = "envoy.filters.http.grpc_json_transcoder"


def _transcoder_filter(config: GatewayConfig, descriptor: Path) -> dict:
    return {"name": TRANSCODER_FILTER_NAME, "typed_config": _typed(
        "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
        proto_descriptor=str(descriptor),
        services=["esm.v1.Esm2Service"],
        print_options={"add_whitespace": False, "always_print_primitive_fields": True,
                       "preserve_proto_field_names": True},
        # gRPC errors become HTTP statuses with a google.rpc.Status JSON body (edge.lua rewrites it).
        convert_grpc_status=True,
        request_validation_options={"reject_unknown_method": True, "reject_unknown_query_parameters": True,
                                    "reject_binding_body_field_collisions": True},
        max_request_body_size=config.max_request_bytes,
        # The server refuses larger JSON responses with a 400 that points to the streaming RPCs
        # (a backstop: JSON bodies stream through, see RESPONSE_SLACK_BYTES).
        max_response_body_size=(config.max_json_response_mb << 20) + RESPONSE_SLACK_BYTES,
    )}


def _side_listener(config: GatewayConfig, name: str, port: int, idle_timeout: str, served: str,
                   routes: list[dict], filters: list[dict]) -> dict:
    """A listener beside the API's, outside its connection cap (ignore_global_conn_limit), serving
    one thing and 404 for the rest."""
    return {
        "name": name,
        "address": _socket_address(config.http_host, port),
        "enable_reuse_port": False,
        "ignore_global_conn_limit": True,
        "filter_chains": [_connection_manager(
            stat_prefix=name,
            request_headers_timeout="5s",
            common_http_protocol_options={"idle_timeout": idle_timeout},
            route_config={"virtual_hosts": [{
                "name": name, "domains": ["*"],
                "routes": [*routes, {"match": {"prefix": "/"},
                                     "direct_response": {"status": 404,
                                                         "body": {"inline_string": f"only {served} is served here"}}}],
            }]},
            http_filters=[*filters, ROUTER_FILTER],
        )],
    }


def health_listener(config: GatewayConfig, pools: tuple[Pool, ...]) -> dict:
    """--health-port: /healthz alone, so that probes are answered while clients hold every connection."""
    return _side_listener(config, "health", config.health_port, "10s", "/healthz", [], [_health_check_filter(pools)])


def stats_listener(config: GatewayConfig) -> dict:
    """--stats-port: Envoy's stats for Prometheus. The admin interface itself stays on its Unix socket
    (it can stop Envoy and change logging); this forwards exactly one read-only page of it."""
    route = {"match": {"path": "/stats/prometheus", "headers": [{"name": ":method", "string_match": {"exact": "GET"}}]},
             "route": {"cluster": "envoy_admin", "timeout": "10s"}}
    return _side_listener(config, "stats", config.stats_port, "60s", "GET /stats/prometheus", [route], [])


def admin_cluster(config: GatewayConfig) -> dict:
    """The admin socket as a cluster, for the stats listener."""
    return {"name": "envoy_admin", "type": "STATIC", "connect_timeout": "1s",
            "load_assignment": {"cluster_name": "envoy_admin", "endpoints": [{"lb_endpoints": [{"endpoint": {
                "address": {"pipe": {"path": str(Path(config.admin_socket).resolve())}}}}]}]}}


# ---- routes -------------------------------------------------------------------------
# What a retry on another replica can fix: the replica is gone or going (connect failure, reset,
# refused stream; UNAVAILABLE from a draining server or a lost worker; CANCELLED when a stopping
# server cuts its calls). All our RPCs are idempotent reads of a model, so a retry never
# duplicates an effect. Not RESOURCE_EXHAUSTED (HTTP 429): a full queue or response budget is
# load, which retries only add to; the caller gets it at once, with its Retry-After.
RETRY_ON = "unavailable,cancelled,reset,connect-failure,refused-stream"


def retry_policy(config: GatewayConfig, per_try_timeout: bool) -> dict:
    # Envoy retries only while no response header has gone downstream: a stream is
    # retried before its first message, never after.
    policy = {"retry_on": RETRY_ON, "num_retries": config.retries}
    if per_try_timeout:
        policy["per_try_timeout"] = _seconds(config.per_try_timeout_s)
    return {
        **policy,
        # A retry goes to another replica, so it need not wait out a retry-after (a lost worker's
        # UNAVAILABLE carries one, meant for the caller).
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
        # Every retry goes to a replica this request has not tried yet.
        "retry_host_predicate": [{
            "name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
        }],
        "host_selection_retry_max_attempts": 5,
    }


def _route(config: GatewayConfig, name: str, match: dict, cluster_name: str, stream: bool) -> dict:
    route = {"cluster": cluster_name, "timeout": _seconds(config.request_timeout_s)}
    if stream:
        # Unary calls take the virtual host's retry policy; streams their own, without a per-try
        # timeout (a stream of thousands of sequences runs long).
        route["retry_policy"] = retry_policy(config, per_try_timeout=False)
    return {"name": name, "match": match, "route": route}


def _idle_route(config: GatewayConfig, name: str, match: dict, cluster_name: str) -> dict:
    """A streaming route with no total timeout, only an idle one (ScoreStream and its JSON twin): Envoy
    then sends no x-envoy-expected-rq-timeout-ms, so the server admits the scan by its work alone."""
    route = _route(config, name, match, cluster_name, stream=True)
    route["route"].update(timeout="0s", idle_timeout=_seconds(config.stream_idle_timeout_s))
    return route


def _regex(pattern: str) -> dict:
    return {"safe_regex": {"regex": pattern}}  # Envoy's regexes match whole values


def routes(config: GatewayConfig, pools: tuple[Pool, ...]) -> list[dict]:
    """Per model: its JSON paths and its gRPC calls (by header); the rest to the fallback pool."""
    found = []
    stream_path = "^" + re.escape(SERVICE_PATH) + f"({'|'.join(STREAM_METHODS)})$"
    scan_path = "^" + re.escape(SERVICE_PATH) + f"({'|'.join(SCORE_STREAM_METHODS)})$"
    for pool in pools:
        if pool.model is None:
            continue
        by_header = [{"name": MODEL_HEADER, "string_match": {"exact": pool.model}}]
        # JSON paths name the model.
        json_path = [{"name": JSON_PATH_HEADER,
                      "string_match": _regex(f"/api/v3/(schema/)?{re.escape(pool.model)}/.*")}]
        found += [
            # Copies of the header matchers: a shared list would be dumped as a YAML anchor and alias.
            _idle_route(config, f"{pool.model}_json_scan", {**_regex(scan_path), "headers": copy.deepcopy(json_path)},
                        pool.cluster),
            _idle_route(config, f"{pool.model}_grpc_scan", {**_regex(scan_path), "headers": copy.deepcopy(by_header)},
                        pool.cluster),
            _route(config, f"{pool.model}_json", {"prefix": "/", "headers": json_path}, pool.cluster, stream=False),
            _route(config, f"{pool.model}_grpc_stream", {**_regex(stream_path), "headers": by_header}, pool.cluster,
                   stream=True),
            _route(config, f"{pool.model}_grpc", {"prefix": "/", "headers": by_header}, pool.cluster, stream=False),
        ]
    # Everything else (ListModels, calls without the header, unknown models) goes to the default
    # pool, or to the first model's pool: the server answers an unknown model with its 404.
    fallback = fallback_pool(pools)
    found[:0] = [*short_path_redirects(), docs_route(config, fallback)]
    if len(pools) > 1:
        found.insert(0, catalogue_route(config, pools, fallback))
    return found + [
        _idle_route(config, "fallback_scan", _regex(scan_path), fallback.cluster),
        _route(config, "fallback_stream", _regex(stream_path), fallback.cluster, stream=True),
        _route(config, "fallback", {"prefix": "/"}, fallback.cluster, stream=False),
    ]


# The docs page (GET /api/v3/docs: Swagger UI, service/api/docs_page.py) and the playground
# (GET /api/v3/ui, service/api/playground_page.py) run scripts in the browser: they may load
# scripts, styles and images from this origin only, call this origin only ("try it out", the
# playground's requests), and nothing may frame them. Their files have no inline script or style.
DOCS_CONTENT_SECURITY_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
                                "connect-src 'self'; font-src 'self'; base-uri 'none'; form-action 'none'; "
                                "frame-ancestors 'none'")
DOCS_HEADERS = {"content-security-policy": DOCS_CONTENT_SECURITY_POLICY, "x-content-type-options": "nosniff",
                "referrer-policy": "no-referrer", "x-frame-options": "DENY"}


PAGE_METHODS = ("GetDocsPage", "GetPlaygroundPage")
# Short addresses a person types: the site's root and /ui open the playground, /docs the docs page.
SHORT_PATHS = {"/api/v3/ui": ("/", "/ui", "/ui/"), "/api/v3/docs": ("/docs", "/docs/")}


def docs_route(config: GatewayConfig, fallback: Pool) -> dict:
    page_paths = _regex("^" + re.escape(SERVICE_PATH) + f"({'|'.join(PAGE_METHODS)})$")
    route = _route(config, "docs", page_paths, fallback.cluster, stream=False)
    route["response_headers_to_add"] = [{"header": {"key": key, "value": value},
                                         "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}
                                        for key, value in DOCS_HEADERS.items()]
    return route


def short_path_redirects() -> list[dict]:
    """A 302 from each short path to its page, for GET and HEAD (the query string, if any, is
    dropped). The transcoder is off on these routes: it would answer them 404, as paths of no method."""
    method = {"name": ":method", "string_match": _regex("GET|HEAD")}
    return [{"name": f"redirect{target.replace('/', '_')}",
             "match": {**_regex("(" + "|".join(re.escape(path) for path in paths) + ")"), "headers": [method]},
             "redirect": {"path_redirect": target, "response_code": "FOUND", "strip_query": True},
             "typed_per_filter_config": {TRANSCODER_FILTER_NAME: _typed("envoy.config.route.v3.FilterConfig",
                                                                         disabled=True)}}
            for target, paths in SHORT_PATHS.items()]


def fallback_pool(pools: tuple[Pool, ...]) -> Pool:
    return next((p for p in pools if p.model is None), pools[0])


# ---- one catalogue across pools -----------------------------------------------------------
# Each server knows its own models, Envoy knows its pools, and neither knows the other's half.
# ListModels (GET /api/v3/models) needs every pool's own ModelInfo (device, readiness, budget):
# a Lua filter after the transcoder asks every other pool and merges the answers (protobuf
# concatenation of ListModelsResponse; catalogue.lua). An unknown model's 404 comes from the
# server that got the call, which alone reads the model out of a gRPC body: Envoy tells it the
# models of its per-model pools in a request header, and it names them beside its own.
CATALOGUE_FILTER_NAME = "esm.catalogue"
CATALOGUE_FILTER = {"name": CATALOGUE_FILTER_NAME,
                    "typed_config": _typed("envoy.extensions.filters.http.lua.v3.Lua")}  # code per route
CATALOGUE_TIMEOUT_MS = 5000


def catalogue_route(config: GatewayConfig, pools: tuple[Pool, ...], fallback: Pool) -> dict:
    """ListModels, whatever model header it carries: the fallback pool answers, the catalogue filter
    adds the other pools' models."""
    route = _route(config, "catalogue", {"path": SERVICE_PATH + "ListModels"}, fallback.cluster, stream=False)
    others = [p for p in pools if p is not fallback]
    table = ", ".join(f"{{cluster = {_lua_string(p.cluster)}, model = {_lua_string(p.model)}}}" for p in others)
    code = (CATALOGUE_LUA.read_text()
            .replace("${other_pools}", f"{{{table}}}")
            .replace("${answering_model}", _lua_string(fallback.model))
            .replace("${timeout_ms}", str(CATALOGUE_TIMEOUT_MS)))
    route["typed_per_filter_config"] = {CATALOGUE_FILTER_NAME: _typed(
        "envoy.extensions.filters.http.lua.v3.LuaPerRoute", source_code={"inline_string": code})}
    return route


def _lua_string(text: str | None) -> str:
    return "nil" if text is None else json.dumps(text)  # names are ASCII: a JSON string is a Lua string


def fleet_models_header(pools: tuple[Pool, ...]) -> dict:
    """The virtual host's FLEET_MODELS_HEADER: set on every forwarded call (over a caller's), or removed."""
    models = [p.model for p in pools if p.model is not None]
    if not models:
        return {"request_headers_to_remove": [FLEET_MODELS_HEADER]}
    return {"request_headers_to_add": [{"header": {"key": FLEET_MODELS_HEADER, "value": ",".join(models)},
                                        "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}]}


# ---- clusters -----------------------------------------------------------------------
# Upstream HTTP/2 flow control: one caller's unread response must never stall another's.
# Envoy multiplexes many callers' streams on one connection per replica. A stream whose caller
# does not read keeps the bytes it has received unacknowledged, and those count against the
# connection's window as well as the stream's: with 16 MiB stream windows on a 32 MiB connection
# window, two or three unread EncodeStream calls (146 MB each) used up the whole connection window
# and every other call on that connection (JSON or gRPC) waited for the 300 s stream idle timeout
# (issue 16, attack 1). So the connection window is sized to hold every stream's full window at
# once: UPSTREAM_STREAMS_PER_CONNECTION streams of UPSTREAM_STREAM_WINDOW_BYTES each, and Envoy
# opens another connection to the replica when a connection has that many streams. However many
# streams stop reading, each can take only its own window, never the others'.
# The stream window is also what Envoy holds per unread stream on the upstream side (plus the
# downstream connection's buffer). 1 MiB keeps up with the server on loopback and a LAN
# (BENCHMARKS.md, "Streaming through the gateway": within noise of 16 MiB); it is a
# bandwidth-delay product of 8 Gbit/s x 1 ms.
UPSTREAM_STREAM_WINDOW_BYTES = 1 << 20
UPSTREAM_STREAMS_PER_CONNECTION = 100
UPSTREAM_HTTP2 = {
    "max_concurrent_streams": UPSTREAM_STREAMS_PER_CONNECTION,
    "initial_stream_window_size": UPSTREAM_STREAM_WINDOW_BYTES,
    "initial_connection_window_size": UPSTREAM_STREAM_WINDOW_BYTES * (UPSTREAM_STREAMS_PER_CONNECTION + 1),
}


def cluster(config: GatewayConfig, pool: Pool) -> dict:
    """One pool: its replicas, how Envoy balances over them, checks their health, ejects them."""
    static = all(_is_ip(host) for host, _ in pool.endpoints)
    limit = config.max_requests_per_pool
    return {
        "name": pool.cluster,
        "type": "STATIC" if static else "STRICT_DNS",
        "connect_timeout": "5s",
        "per_connection_buffer_limit_bytes": 4194304,
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            explicit_http_config={"http2_protocol_options": UPSTREAM_HTTP2})},
        # Requests queue on the server, so the replica with the fewest in flight is the least loaded.
        "lb_policy": "LEAST_REQUEST",
        # Only healthy replicas get traffic, however few are left. With Envoy's default panic
        # threshold (50%), a pool with fewer than half of its hosts healthy is balanced over all of
        # them, the dead ones included: with one replica of three left, 44% of requests failed with
        # "connection refused". At 0 a pool with no healthy host answers at once: 503 with
        # retry-after and the JSON error body (LOCAL_REPLIES), and retries never pick a host that
        # failed its health checks or was ejected.
        # Health changes reach the balancer at once. Envoy's default merges them for up to 1 s
        # (update_merge_window, meant for clusters of thousands): /clusters showed every replica
        # healthy while the balancer still sent all traffic to the first one, and when that one was
        # SIGKILLed, retries had no other host to go to and ~40% of calls failed for 0.6 s. A pool
        # of replicas changes rarely, so applying each change costs nothing.
        "common_lb_config": {"healthy_panic_threshold": {"value": 0}, "update_merge_window": "0s"},
        "load_assignment": {"cluster_name": pool.cluster, "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": _socket_address(host, port)}} for host, port in pool.endpoints]}]},
        # The server answers health per model name; "" is the whole server.
        "health_checks": [{
            "timeout": "5s",
            "interval": _seconds(HEALTH_CHECK_INTERVAL_S),
            "no_traffic_interval": _seconds(HEALTH_CHECK_INTERVAL_S),
            "interval_jitter": "0.1s",
            "unhealthy_threshold": UNHEALTHY_THRESHOLD,
            "healthy_threshold": 1,
            "grpc_health_check": {"service_name": pool.model or ""},
        }],
        # Connection failures and resets eject a replica at once, before health checks notice;
        # queue-full (429) and caller errors (4xx) never do.
        "outlier_detection": {
            "split_external_local_origin_errors": True,
            "consecutive_local_origin_failure": 2,
            "consecutive_gateway_failure": 3,
            "consecutive_5xx": 5,
            "interval": "1s",
            "base_ejection_time": "5s",
            "max_ejection_percent": 50,
        },
        "circuit_breakers": {"thresholds": [{
            "priority": "DEFAULT",
            "max_connections": limit,
            "max_pending_requests": limit,
            "max_requests": limit,
            "retry_budget": {"budget_percent": {"value": config.retry_budget_percent}, "min_retry_concurrency": 8},
        }]},
    }


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def lua_code(config: GatewayConfig) -> str:
    code = LUA.read_text()
    for name in ("max_path_bytes", "max_header_bytes", "max_authorization_bytes"):
        code = code.replace("${%s}" % name, str(getattr(config, name)))
    return code


# ---- YAML ---------------------------------------------------------------------------
class _Dumper(yaml.SafeDumper):
    """Block style; text of several lines (the Lua code, the access log line) as a literal block."""


def _represent_str(dumper: yaml.SafeDumper, text: str) -> yaml.ScalarNode:
    style = "|" if "\n" in text.rstrip("\n") else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", text, style=style)


_Dumper.add_representer(str, _represent_str)


def dump_yaml(document) -> str:
    return yaml.dump(document, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=1 << 16,
                     allow_unicode=True)


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
    return (f"# Rendered by `{command}`; do not edit (tests/test_deploy.py re-renders and compares).\n"
            + dump_yaml({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": name},
                         "data": {"envoy.yaml": envoy_yaml}}))


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
