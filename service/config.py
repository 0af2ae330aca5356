"""Every setting of the server, declared once: flag, ESM_* variable, type, default, bounds, help.

    python -m service.config --markdown                           # the docs' server table
    python -m service.config --markdown gateway.launch:LaunchSettings  # ... and the gateway's

A setting is a pydantic field made by `setting()`. pydantic-settings reads its environment
variable (ESM_ plus the field name in capitals); `add_flags` builds its argparse flag from the
same field, and `from_flags` lets the flags given win over the environment, then validates
the lot, so a bad value stops start-up with one message naming the flag and the variable.
`--help` and the settings tables of docs/configuration.md are made from the declaration too.

The per-model settings (`ModelSettings`) are a subset: the flags give every model's
defaults, and a models file (service.model_specs) sets them per model under the same
names, validated by the same fields. `JsonEdgeLimits` is shared with the gateway
(gateway.envoy_config), which must agree with the server on them.

Torch-free on purpose: the gateway reads this declaration, and it never loads a model.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from pathlib import Path
from typing import Annotated, Any, Literal, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, NoDecode, PydanticBaseSettingsSource, SettingsConfigDict

from esm2_wire.vocabulary import Limits
from service.api import json_limits, request_guard, response_memory, scoring
from service.engine import result_cache
from service.engine.policy import DEVICE_DEFAULTS, device_defaults
from service.engine.scheduler import BatchLimits

ENV_PREFIX = "ESM_"
# grpc's own metadata limit (soft and hard alike): above everything a gateway forwards (Envoy's
# default header limit is 60 KiB), so that RequestGuard, not grpc's RESOURCE_EXHAUSTED, answers.
GRPC_METADATA_CEILING_BYTES = 256 << 10
PRECISIONS = ("auto", "fp32", "fp16", "bf16", "int8")  # service.models.precision resolves auto; AUTOCAST_DTYPES the rest
BATCH_TOKEN_MODES = ("device", "sweep")  # service.models.batch_budget says what each means


def setting(default: Any, help: str, *, flag: str | None = "", env: bool = True, repeat: bool = False,
            switch: bool = False, hidden: bool = False, metavar: str | None = None, **bounds) -> Any:
    """One declared setting. flag: "" derives --field-name, None means environment only (a secret
    would show in `ps`); env=False: flag only. bounds are pydantic's (ge, le, gt, ...)."""
    return Field(default, description=help, json_schema_extra={
        "flag": flag, "env": env, "repeat": repeat, "switch": switch, "hidden": hidden, "metavar": metavar,
    }, **bounds)


def _meta(info: FieldInfo) -> dict:
    return info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}


def flag_of(name: str, info: FieldInfo) -> str | None:
    flag = _meta(info).get("flag", "")
    return None if flag is None else flag or "--" + name.replace("_", "-")


def env_of(name: str, info: FieldInfo) -> str | None:
    return ENV_PREFIX + name.upper() if _meta(info).get("env", True) else None


def where(cls: type[BaseModel], name: str) -> str:
    """How a user sets `name`: its flag and its variable, e.g. `--port (ESM_PORT)`."""
    info = cls.model_fields[name]
    flag, env = flag_of(name, info), env_of(name, info)
    return f"{flag} ({env})" if flag and env else flag or env or name


class _DeclaredEnv(EnvSettingsSource):
    """The environment, minus settings declared flag-only."""

    def get_field_value(self, field: FieldInfo, field_name: str):
        if not _meta(field).get("env", True):
            return None, field_name, False
        return super().get_field_value(field, field_name)


class Declared(BaseSettings):
    """Base of a declaration: ESM_* variables, empty ones ignored, flags (init values) first."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_ignore_empty=True, extra="ignore")

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings, dotenv_settings,
                                   file_secret_settings) -> tuple[PydanticBaseSettingsSource, ...]:
        return init_settings, _DeclaredEnv(settings_cls, env_prefix=ENV_PREFIX, env_ignore_empty=True)


def ordered(cls: type[BaseModel]) -> list[tuple[str, FieldInfo]]:
    """The settings of `cls`, its own first, then those of its bases (per-model, JSON edge)."""
    names = [n for base in cls.__mro__ for n in vars(base).get("__annotations__", {}) if n in cls.model_fields]
    return [(n, cls.model_fields[n]) for n in dict.fromkeys(names)]


def _metavar(info: FieldInfo) -> str:
    choices = get_args(info.annotation)
    if get_origin(info.annotation) is Literal:
        return "{" + ",".join(choices) + "}"
    kinds = {int: "N", float: "X", Path: "PATH"}
    return next((kinds[t] for t in (info.annotation, *choices) if t in kinds), "TEXT")


def env_only_epilog(cls: type[BaseModel]) -> str:
    """--help's word on the settings that have a variable but no flag."""
    lines = [f"{env_of(n, i)}: {i.description}" for n, i in ordered(cls) if flag_of(n, i) is None]
    return "environment only:\n  " + "\n  ".join(lines) if lines else ""


def parser_for(cls: type[BaseModel], **kwargs) -> argparse.ArgumentParser:
    """An argparse parser of `cls`'s flags, its --help listing the environment-only settings too."""
    parser = argparse.ArgumentParser(epilog=env_only_epilog(cls), formatter_class=argparse.RawDescriptionHelpFormatter,
                                     **kwargs)
    add_flags(parser, cls)
    return parser


def add_flags(parser: argparse.ArgumentParser, cls: type[BaseModel]) -> None:
    """One argparse flag per declared setting that has one. Defaults are SUPPRESSed: a flag not
    given leaves its setting to the environment, then to the declared default."""
    for name, info in ordered(cls):
        flag = flag_of(name, info)
        if flag is None:
            continue
        meta = _meta(info)
        env = env_of(name, info)
        default = info.get_default(call_default_factory=True)
        shown = "" if default in (None, [], ()) else f"; default {default}"
        help_text = argparse.SUPPRESS if meta.get("hidden") else (
            f"{info.description} ({env or 'no variable'}{shown})")
        kwargs: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        if meta.get("switch"):
            kwargs["action"] = "store_true"
        else:
            kwargs["metavar"] = meta.get("metavar") or _metavar(info)
            if meta.get("repeat"):
                kwargs["action"] = "append"
        parser.add_argument(flag, **kwargs)


def describe(exc: ValidationError, cls: type[BaseModel]) -> str:
    """A validation failure as `--flag (ESM_VAR) = value: problem`, one per setting."""
    lines = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else ""
        label = where(cls, name) if name in cls.model_fields else name or cls.__name__
        shown = "" if error["type"] == "missing" else f" = {error.get('input')!r}"
        lines.append(f"{label}{shown}: {error['msg'].removeprefix('Value error, ')}")
    return "; ".join(lines)


def from_flags(cls: type[Declared], namespace: argparse.Namespace, parser: argparse.ArgumentParser):
    """The settings: flags given in `namespace` win over the environment; errors end in parser.error."""
    given = {k: v for k, v in vars(namespace).items() if k in cls.model_fields}
    try:
        return cls(**given)
    except ValidationError as exc:
        parser.error(describe(exc, cls))


def markdown_table(cls: type[BaseModel]) -> str:
    """The docs' table of `cls` (docs/configuration.md): every setting but the hidden test aids."""
    rows = ["| flag | environment | default | meaning |", "| --- | --- | --- | --- |"]
    for name, info in ordered(cls):
        if _meta(info).get("hidden"):
            continue
        default = info.get_default(call_default_factory=True)
        default = "" if default in (None, [], ()) else f"`{default}`"
        flag, env = flag_of(name, info), env_of(name, info)
        rows.append(f"| {f'`{flag}`' if flag else ''} | {f'`{env}`' if env else ''} | {default} | "
                    f"{info.description.replace('|', '/')} |")
    return "\n".join(rows) + "\n"


def _device_default(name: str) -> str:
    """A per-device default as --help and the docs say it: `0.92 on cpu, 0.75 on cuda`."""
    return ", ".join(f"{getattr(d, name):,} on {device}" for device, d in DEVICE_DEFAULTS.items())


def parse_batch_tokens(value: Any) -> str:
    """A max_batch_tokens value: a number of tokens, 'device' or 'sweep' (as text)."""
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ValueError("has the wrong type: expected a number of tokens, 'device' or 'sweep'")
    text = str(value)
    if text in BATCH_TOKEN_MODES:
        return text
    try:
        tokens = int(text)
    except ValueError:
        raise ValueError(f"expected a number of tokens, 'device' or 'sweep', not {text!r}") from None
    if tokens < 1:
        raise ValueError(f"must be at least 1 token, not {tokens}")
    return str(tokens)


class JsonEdgeLimits(BaseModel):
    """Limits of the JSON path that the server and the gateway (Envoy) both enforce: one
    declaration, read by both, so that they agree."""

    max_json_response_mb: int = setting(
        json_limits.DEFAULT_MAX_JSON_RESPONSE_MB, ge=1,
        help="largest JSON response; bigger ones get INVALID_ARGUMENT (HTTP 400) naming EncodeStream")
    max_request_bytes: int = setting(
        json_limits.DEFAULT_MAX_REQUEST_BYTES, ge=1,
        help="largest JSON request body after gzip decompression (HTTP 413 above)")


class ModelSettings(BaseModel):
    """The per-model settings: flags give every model's defaults, a models file's [models.NAME]
    tables set them per model under these names."""

    device: str = setting("auto", help="auto, cpu, cuda or cuda:N; a comma-separated list (cuda:0,cuda:1) "
                                       "runs one worker per device")
    precision: Literal["auto", "fp32", "fp16", "bf16", "int8"] = setting(
        "auto", help="auto: bf16 on a CUDA device with native bf16 (compute capability 8.0+), else fp32; fp32 "
                     "(equal to fair-esm) or fp16/bf16 autocast; bf16/fp16 only where the device has native "
                     "instructions for it (CPU bf16: AVX512_BF16 or AMX; CUDA bf16: capability 8.0+), else refused; "
                     "int8 (CPU only, refused on GPUs): int8 Linear layers, faster, within BENCHMARKS.md's "
                     "accuracy tables")
    attention: Literal["fast", "exact"] = setting(
        "fast", help="fast: fused SDPA when no attention maps are needed; exact: fair-esm's own attention")
    layout: Literal["auto", "padded", "packed"] = setting(
        "auto", help="packed: batches without attention maps run unpadded, attention per sequence (varlen flash "
                     "attention on CUDA); padded: rows padded to the batch's longest; auto (default): packed on "
                     "CPUs, where it measured faster, padded on GPUs, where packed is not measured yet (BENCHMARKS.md)")
    max_batch_tokens: str = setting(
        "device", metavar="N|device|sweep", help="padded tokens per batch: a number, 'device' (the measured default for the device "
                       "type, 1024 on CPU, 8192 on CUDA) or 'sweep' (time the candidates at start-up)")
    # The scheduler's defaults are its own (service.engine.scheduler.BatchLimits explains each).
    max_batch_size: int = setting(BatchLimits.max_batch_size, ge=1, help="items per batch")
    max_wait_ms: float = setting(BatchLimits.max_wait_s * 1000, ge=0,
                                 help="how long an idle worker waits to fill a batch")
    max_queue_items: int = setting(BatchLimits.max_queue_items, ge=1,
                                   help="queued items before RESOURCE_EXHAUSTED; at least --max-items")
    max_queue_work: int = setting(
        int(BatchLimits.max_queue_work), ge=1,
        help="estimated work queued for the model, in work units (an item of n tokens is n x (1 + n/1024), x3 "
             "with attention maps, x the share of layers it needs); a request whose own work is over it gets "
             "INVALID_ARGUMENT, one that the queued work pushes over it RESOURCE_EXHAUSTED (HTTP 429)")
    min_padding_efficiency: float | None = setting(
        None, ge=0, le=1,
        help="a batch grows only while this share of what it computes is useful: real residues, not padding, "
             "through the layers each item needs (default per device: "
             f"{_device_default('min_padding_efficiency')})")
    max_batch_token_pairs: int | None = setting(
        None, ge=1,
        help="batch size x longest item squared (x3 with attention maps), the attention's work; a longer "
             f"item runs alone (default per device: {_device_default('max_batch_token_pairs')})")
    aging: float = setting(BatchLimits.aging, ge=0,
                           help="an item is due at arrival + this x its estimated run time; the item due first "
                                "runs next (0: first come, first served)")

    @field_validator("max_batch_tokens", mode="before")
    @classmethod
    def _batch_tokens(cls, value):
        return parse_batch_tokens(value)

    def batch_limits(self, batch_tokens: int, device_type: str = "cpu") -> BatchLimits:
        """The scheduler's limits: these settings, the budget chosen on the model's device and
        the device type's defaults for what was not set."""
        defaults = device_defaults(device_type)
        return BatchLimits(
            max_batch_tokens=batch_tokens, max_batch_size=self.max_batch_size, max_wait_s=self.max_wait_ms / 1000,
            max_queue_items=self.max_queue_items, max_queue_work=float(self.max_queue_work),
            min_padding_efficiency=(defaults.min_padding_efficiency if self.min_padding_efficiency is None
                                    else self.min_padding_efficiency),
            max_batch_token_pairs=(defaults.max_batch_token_pairs if self.max_batch_token_pairs is None
                                   else self.max_batch_token_pairs),
            aging=self.aging, packed=self.packed_layout(device_type))

    def packed_layout(self, device_type: str) -> bool:
        """Whether batches without attention maps run unpadded on this device type: read by the
        scheduler (BatchLimits.packed) and the worker alike. The packed forward is the fast
        attention path's: with exact attention every batch runs padded."""
        return resolve_layout(self.layout, device_type) == "packed" and self.attention == "fast"


def resolve_layout(layout: str, device_type: str) -> str:
    """The batch layout a model runs with on a device type: `auto` is packed on CPUs (the quiet
    run in BENCHMARKS.md, "Packed vs padded forward": 1.03-1.10x the padded path there) and padded
    on GPUs until packed is measured on one; an explicit choice is kept."""
    if layout != "auto":
        return layout
    return "packed" if device_type == "cpu" else "padded"


MODEL_KEYS = ("source", *ModelSettings.model_fields)  # a models file's keys


class ModelSpec(ModelSettings):
    """One served model: its name, where its weights are, and its settings."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str
    source: str | None = None  # None: the standard fair-esm name


class ServerSettings(Declared, ModelSettings, JsonEdgeLimits):
    """`python -m service.server`'s settings."""

    host: str = setting("0.0.0.0", help="gRPC listener address")
    port: int = setting(50051, ge=0, le=65535, help="gRPC port (0 picks a free one)")
    models: str | None = setting(None, help="comma-separated served models (default esm2-8m)")
    models_file: Path | None = setting(
        None, metavar="PATH",
        help="TOML file of served models, each with its source, device, precision and batch budget "
             "(instead of --models/--checkpoint)")
    model_dir: Path | None = setting(None, metavar="DIR", help="directory of fair-esm .pt files")
    checkpoints: Annotated[list[str], NoDecode] = setting(
        [], flag="--checkpoint", repeat=True, metavar="NAME=SOURCE",
        help="where a model's weights are: a fair-esm .pt file, a Hugging Face save_pretrained directory or "
             "hf:org/name[@revision] (repeatable; the variable is comma-separated)")
    offline: bool = setting(False, switch=True, help="never download missing checkpoints (variable: 1 or true)")
    assume_available_memory_gib: float | None = setting(
        None, ge=0, help="check models against this much memory per device instead of what the device reports "
                         "(0: what the device reports)")
    max_items: int = setting(Limits.max_items, ge=1, help="items per request")
    max_sequence_length: int = setting(Limits.max_sequence_length, ge=1, help="residues per sequence")
    max_windowed_residues: int = setting(
        Limits.max_windowed_residues, ge=0,
        help="residues per sequence in windowed mode (params.window, our extension: longer proteins cut into "
             "overlapping windows, outputs stitched); 0 turns windowed mode off (suggested: 40000)")
    max_score_mutations: int = setting(
        scoring.DEFAULT_MAX_MUTATIONS, ge=1,
        help="mutations per Score request, over all its variants and items (more is INVALID_ARGUMENT)")
    max_score_passes: int = setting(
        scoring.DEFAULT_MAX_PASSES, ge=1,
        help="forward passes one Score request may cost (masked_marginal: one per mutated position; "
             "wt_marginal: one per item; pll: one per scored position of the wild type and of each variant); "
             "also at most the model's --max-queue-items; more is INVALID_ARGUMENT")
    batch_sweep_seconds: float = setting(20.0, gt=0, help="time bound of one model's --max-batch-tokens sweep")
    cache_mb: int = setting(result_cache.DEFAULT_CACHE_MB, ge=0,
                            help="result cache size in MiB (0 turns it off); identical items in flight are "
                                 "always merged")
    max_unary_response_mb: int = setting(
        json_limits.DEFAULT_MAX_UNARY_RESPONSE_MB, ge=1,
        help="largest Encode/Predict response (MiB); bigger ones get INVALID_ARGUMENT naming EncodeStream/PredictStream")
    json_response_budget_mb: int = setting(
        json_limits.DEFAULT_JSON_BUDGET_MB, ge=1,
        help="JSON responses in flight on this server, by their estimated size (MiB); a request past it gets "
             "RESOURCE_EXHAUSTED (HTTP 429) with Retry-After: 1 (one request is always admitted)")
    max_stream_held_mb: int = setting(
        response_memory.DEFAULT_MAX_STREAM_HELD_MB, ge=1,
        help="a stream whose caller reads nothing for 5 s while the server holds more than this (MiB) of "
             "its unsent results is ended with RESOURCE_EXHAUSTED")
    max_held_response_mb: int = setting(
        response_memory.DEFAULT_MAX_HELD_RESPONSE_MB, ge=1,
        help="unsent responses of all callers (MiB); past it, streams whose callers read nothing for 5 s "
             "are ended with RESOURCE_EXHAUSTED")
    metrics_port: int = setting(9090, ge=0, le=65535, help="Prometheus metrics port (0 disables)")
    metrics_host: str = setting("127.0.0.1", help="Prometheus listener address (0.0.0.0 where a scraper on "
                                                  "another host reads it)")
    max_request_message_bytes: int = setting(
        0, ge=0, help="largest gRPC request message; 0 derives it from --max-items and --max-sequence-length "
                      "(114,816 bytes with the defaults)")
    max_metadata_bytes: int = setting(
        request_guard.DEFAULT_MAX_METADATA_BYTES, ge=1, le=GRPC_METADATA_CEILING_BYTES,
        help="largest request metadata (headers) in bytes, HPACK-counted; more is INVALID_ARGUMENT")
    api_keys_file: Path | None = setting(None, metavar="PATH",
                                         help="require `authorization: Token <key>`: one key per line")
    api_keys: SecretStr | None = setting(
        None, flag=None, help="require `authorization: Token <key>`: comma-separated keys (variable only: a "
                              "flag would show the keys in `ps`)")
    share_cache_across_keys: bool = setting(
        False, switch=True,
        help="with API keys: callers of different keys share cached results and identical items in flight "
             "(by default each key has its own). Sharing lets one key's caller tell from an answer's time "
             "whether another key's caller asked the same (variable: 1 or true)")
    drain_seconds: float = setting(
        0.0, ge=0, help="after SIGTERM: report NOT_SERVING at once but keep serving this long, so that load "
                        "balancers move traffic away first (a fleet behind Envoy: 5; Kubernetes: see Deploy)")
    grace_seconds: float = setting(30.0, ge=0,
                                   help="then: stop accepting and give in-flight requests this long to finish")
    liveness_stall_seconds: float = setting(
        300.0, gt=0, help="the health service's `liveness` name turns NOT_SERVING while a model worker has been "
                          "inside a batch this long without progress (no layer or batch finished): a hung "
                          "device; the Kubernetes liveness probe asks that name")
    log_format: Literal["text", "json"] = setting(
        "text", help="text, or json: one object per line (time, level, message, request_id, trace_id and, on "
                     "access lines, model, items, residues, status, queue wait, latency)")
    access_log: bool = setting(False, switch=True, help="log one line per finished RPC (variable: 1 or true)")
    otlp_endpoint: str | None = setting(
        None, metavar="HOST:PORT",
        help="turn on OpenTelemetry tracing: send spans to this OTLP/gRPC collector (http://host:4317; needs the "
             "otel extra)")
    port_file: Path | None = setting(None, env=False, metavar="PATH", help="write the bound port here once ready")
    fault_file: Path | None = setting(
        None, flag=None, help="tests only: arm fault injection from this file (service.engine.faults)")
    device_plugin: Path | None = setting(
        None, flag=None, help="tests only: a Python file whose cuda_runtime() stands in for the CUDA runtime "
                              "(tests/simulated_cuda.py; service.platforms)")
    # Testing aids, hidden from --help and the docs.
    simulate_oom_above_tokens: int = setting(0, env=False, hidden=True, ge=0, help="testing: fake OOM")
    simulate_cpu_native: Literal["present", "absent"] | None = setting(
        None, env=False, hidden=True, help="testing: pretend the CPU has (or lacks) native bf16/fp16")

    @field_validator("checkpoints", mode="before")
    @classmethod
    def _comma_separated(cls, value):
        return [c for c in value.split(",") if c] if isinstance(value, str) else value

    @field_validator("assume_available_memory_gib", mode="after")
    @classmethod
    def _zero_is_unset(cls, value):
        return value or None

    def model_defaults(self) -> ModelSettings:
        """The per-model settings the flags give (every model's defaults)."""
        return ModelSettings(**{k: getattr(self, k) for k in ModelSettings.model_fields})


def _load(spec: str) -> type[BaseModel]:
    module, _, name = spec.partition(":")
    return getattr(importlib.import_module(module), name)


# The page holding the settings tables, and which declaration makes each.
SETTINGS_PAGE = Path("docs/configuration.md")
SETTINGS_TABLES = {"server": "service.config:ServerSettings", "gateway": "gateway.launch:LaunchSettings"}


def write_settings_tables(page: Path) -> None:
    """Replace each `<!-- settings:NAME -->` table in `page` with the one its declaration makes."""
    text = page.read_text()
    for section, declaration in SETTINGS_TABLES.items():
        start, end = f"<!-- settings:{section} -->\n", f"<!-- /settings:{section} -->"
        head, found, rest = text.partition(start)
        if not found:
            raise SystemExit(f"{page} has no {start.strip()} table")
        text = head + start + markdown_table(_load(declaration)) + end + rest.partition(end)[2]
    page.write_text(text)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m service.config", description=__doc__.splitlines()[0])
    parser.add_argument("--markdown", action="store_true", help="print the settings table")
    parser.add_argument("--write-doc", type=Path, metavar="PAGE",
                        help=f"rewrite the settings tables of PAGE ({SETTINGS_PAGE})")
    parser.add_argument("declaration", nargs="?", default="service.config:ServerSettings", help="MODULE:CLASS")
    args = parser.parse_args(argv)
    if args.write_doc:
        write_settings_tables(args.write_doc)
    elif args.markdown:
        sys.stdout.write(markdown_table(_load(args.declaration)))
    else:
        parser.error("give --markdown or --write-doc")
    return 0


if __name__ == "__main__":
    sys.exit(main())
