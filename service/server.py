"""Start the ESM-2 gRPC server: load and warm the models, then serve until SIGTERM.

    python -m service.server --models esm2-8m --model-dir /models
    python -m service.server --models esm2-ft --checkpoint esm2-ft=hf:my-org/esm2-650m-ft
    python -m service.server --models-file models.toml

Every flag can also be set by an environment variable (ESM_ plus the flag name in
capitals, e.g. ESM_MODELS, ESM_PORT); flags win. A models file (service.model_specs)
gives each model its own source, device, precision and batch budget; the flags are the
defaults for what it leaves out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb, pb_grpc
from esm2_wire.vocabulary import Limits
from service.models import batch_budget, checkpoints, hf_checkpoints, memory_budget, sources
from service.engine import faults
from service.api import json_limits
from service import model_specs
from service.models import precision
from service.api import request_guard
from service.engine import result_cache
from service.api.auth import load_keys
from service.engine.router import ModelRouter
from service.engine.inputs import ModelInput
from service.engine.worker import ModelWorker, replicate, resolve_devices
from service.engine.scheduler import BatchLimits, Scheduler
from service.api.servicer import Esm2Servicer

log = logging.getLogger("service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Esm2Service"].full_name
OPENAPI_DOCUMENT = Path(__file__).resolve().parent / "api" / "openapi.json"  # served at /api/v3/openapi.json
MAX_MESSAGE_BYTES = 1 << 30  # unary responses of long sequences are large; streaming is preferred
# grpc refuses bigger request messages itself (RESOURCE_EXHAUSTED) before reading them. Up to
# here, RequestGuard answers INVALID_ARGUMENT for anything over --max-request-message-bytes;
# the JSON gateway's methods may use all of it: their bodies are bounded by the gateway's own
# --max-request-bytes (4 MiB), and a JSON caller should hear about its body, not a proto size.
RECEIVE_CEILING_BYTES = (4 << 20) + (64 << 10)
JSON_METHODS = (f"/{SERVICE_NAME}/EncodeJson", f"/{SERVICE_NAME}/PredictJson")
# grpc's own metadata limit (soft and hard alike): above everything a gateway forwards (Envoy's
# default header limit is 60 KiB), so that RequestGuard, not grpc's RESOURCE_EXHAUSTED, answers.
GRPC_METADATA_CEILING_BYTES = 256 << 10
EXIT_WORKER_LOST = 3  # the model worker died or the device is unusable: restart me
LOST_WORKER_GRACE_S = 5.0  # to send the UNAVAILABLE answers of work already accepted


class AddressInUse(Exception):
    pass


def _env(name: str, default):
    return os.environ.get(f"ESM_{name.upper()}", default)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    limits, batching = Limits(), BatchLimits()  # the flags' defaults are the dataclasses' own
    p = argparse.ArgumentParser(prog="esm2-server", description=__doc__.splitlines()[0])
    p.add_argument("--host", default=_env("host", "0.0.0.0"))
    p.add_argument("--port", type=int, default=int(_env("port", 50051)), help="gRPC port (0 picks a free one)")
    p.add_argument("--models", default=_env("models", None), help="comma-separated served models (default esm2-8m)")
    p.add_argument("--models-file", type=Path, default=_env("models_file", None),
                   help="TOML file of served models, each with its source, device, precision and batch budget")
    p.add_argument("--model-dir", type=Path, default=_env("model_dir", None), help="directory of fair-esm .pt files")
    p.add_argument(
        "--checkpoint", action="append", default=[c for c in _env("checkpoints", "").split(",") if c],
        metavar="NAME=SOURCE",
        help="where a model's weights are: a fair-esm .pt file, a Hugging Face save_pretrained directory, or "
             "hf:org/name[@revision] (repeatable; ESM_CHECKPOINTS is comma-separated)",
    )
    p.add_argument("--offline", action="store_true", default=_env("offline", "") in ("1", "true"),
                   help="never download missing checkpoints")
    p.add_argument("--device", default=_env("device", "auto"),
                   help="auto, cpu, cuda or cuda:N; a comma-separated list (cuda:0,cuda:1) runs one worker per device")
    p.add_argument("--precision", choices=tuple(precision.AUTOCAST_DTYPES), default=_env("precision", "fp32"),
                   help="fp32 (default, equal to fair-esm) or fp16/bf16 autocast; on CPU only where the "
                        "processor has native instructions for it (bf16: AVX512_BF16 or AMX), else refused; "
                        "int8 (CPU only): int8 Linear layers, faster, within BENCHMARKS.md's accuracy tables")
    p.add_argument("--attention", choices=("fast", "exact"), default=_env("attention", "fast"),
                   help="fast: fused SDPA when no attention maps are needed; exact: fair-esm's own attention")
    p.add_argument("--layout", choices=model_specs.LAYOUTS, default=_env("layout", "padded"),
                   help="padded (default; measured faster on CPU, BENCHMARKS.md) or packed: batches without "
                        "attention maps run unpadded, attention per sequence (varlen flash attention on CUDA)")
    p.add_argument("--max-items", type=int, default=int(_env("max_items", limits.max_items)))
    p.add_argument("--max-sequence-length", type=int,
                   default=int(_env("max_sequence_length", limits.max_sequence_length)))
    p.add_argument("--max-batch-tokens", type=_setting, default=_env("max_batch_tokens", "device"),
                   help="padded tokens per batch: a number, 'device' (default: the measured default for the "
                        "device type, 1024 on CPU, 8192 on CUDA) or 'sweep' (time the candidates at start-up)")
    p.add_argument("--batch-sweep-seconds", type=float, default=float(_env("batch_sweep_seconds", 20)),
                   help="time bound of one model's --max-batch-tokens sweep")
    p.add_argument("--max-batch-size", type=int, default=int(_env("max_batch_size", batching.max_batch_size)))
    p.add_argument("--max-wait-ms", type=float, default=float(_env("max_wait_ms", batching.max_wait_s * 1000)))
    p.add_argument("--max-queue-items", type=int, default=int(_env("max_queue_items", batching.max_queue_items)))
    p.add_argument("--min-padding-efficiency", type=float,
                   default=float(_env("min_padding_efficiency", batching.min_padding_efficiency)),
                   help="a batch grows only while this share of its tokens are real residues")
    p.add_argument("--max-batch-token-pairs", type=int,
                   default=int(_env("max_batch_token_pairs", batching.max_batch_token_pairs)),
                   help="batch size x longest item squared (attention's work); a longer item runs alone")
    p.add_argument("--aging", type=float, default=float(_env("aging", batching.aging)),
                   help="an item is due at arrival + this x its estimated run time; the item due first runs next")
    p.add_argument("--cache-mb", type=int, default=int(_env("cache_mb", result_cache.DEFAULT_CACHE_MB)),
                   help="result cache size in MiB (0 turns it off); identical items in flight are always merged")
    p.add_argument("--metrics-port", type=int, default=int(_env("metrics_port", 9090)), help="0 disables")
    p.add_argument("--max-request-message-bytes", type=int, default=int(_env("max_request_message_bytes", 0)),
                   help="largest gRPC request message; 0 (default) derives it from --max-items and "
                        "--max-sequence-length (114,816 bytes with the defaults)")
    p.add_argument("--max-metadata-bytes", type=int,
                   default=int(_env("max_metadata_bytes", request_guard.DEFAULT_MAX_METADATA_BYTES)),
                   help="largest request metadata (headers) in bytes, HPACK-counted; more is INVALID_ARGUMENT")
    p.add_argument("--metrics-host", default=_env("metrics_host", "127.0.0.1"),
                   help="Prometheus listener address (0.0.0.0 where a scraper on another host reads it)")
    p.add_argument("--api-keys-file", default=_env("api_keys_file", None), help="one key per line")
    p.add_argument("--max-json-response-mb", type=int,
                   default=int(_env("max_json_response_mb", json_limits.DEFAULT_MAX_JSON_RESPONSE_MB)),
                   help="largest JSON gateway response; bigger ones get INVALID_ARGUMENT (HTTP 400) naming EncodeStream")
    p.add_argument("--max-request-bytes", type=int,
                   default=int(_env("max_request_bytes", json_limits.DEFAULT_MAX_REQUEST_BYTES)),
                   help="largest JSON request body after gzip decompression (HTTP 413 above)")
    p.add_argument("--drain-seconds", type=float, default=float(_env("drain_seconds", 0)),
                   help="after SIGTERM: report NOT_SERVING at once but keep serving this long, so that load "
                        "balancers move traffic away first (a fleet behind Envoy: 5; Kubernetes: see the README)")
    p.add_argument("--grace-seconds", type=float, default=float(_env("grace_seconds", 30)),
                   help="then: stop accepting and give in-flight requests this long to finish")
    p.add_argument("--port-file", type=Path, default=None, help="write the bound port here once ready")
    p.add_argument("--assume-available-memory-gib", type=float,
                   default=float(_env("assume_available_memory_gib", 0)) or None,
                   help="check models against this much memory per device instead of what the device reports")
    p.add_argument("--simulate-oom-above-tokens", type=int, default=0, help=argparse.SUPPRESS)
    # Testing aid: pretend the CPU has (or lacks) native bf16/fp16, to test both paths on any machine.
    p.add_argument("--simulate-cpu-native", choices=("present", "absent"), default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.cache_mb < 0 or args.max_batch_token_pairs < 1 or args.aging < 0:
        p.error("--cache-mb and --aging must not be negative; --max-batch-token-pairs must be at least 1")
    if args.models_file is not None and (args.models is not None or args.checkpoint):
        p.error("--models-file names the models: leave out --models and --checkpoint (and ESM_MODELS, ESM_CHECKPOINTS)")
    if args.models is None:
        args.models = "esm2-8m"
    try:
        defaults = model_specs.defaults_from_args(args)
        if args.models_file is not None:
            args.specs = model_specs.from_file(args.models_file, defaults)
        else:
            args.specs = model_specs.from_flags(args.models, args.checkpoint, defaults)
    except model_specs.BadModelsConfig as exc:
        p.error(str(exc))
    too_small = [s.name for s in args.specs if s.max_queue_items < args.max_items]
    if too_small:
        p.error(f"max_queue_items must be at least --max-items ({args.max_items}) for {', '.join(too_small)}")
    if not args.max_request_message_bytes:
        args.max_request_message_bytes = request_guard.max_request_message_bytes(
            args.max_items, args.max_sequence_length)
    if not 0 < args.max_metadata_bytes <= GRPC_METADATA_CEILING_BYTES:
        p.error(f"--max-metadata-bytes must be between 1 and {GRPC_METADATA_CEILING_BYTES}")
    return args


def _setting(text: str) -> str:
    try:
        return batch_budget.parse_setting(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def request_limits(args) -> Limits:
    return Limits(args.max_items, args.max_sequence_length)


def batch_limits(spec: model_specs.ModelSpec, batch_tokens: int) -> BatchLimits:
    """A model's batching limits: its own settings (models file or flags) and the budget chosen on
    its device."""
    return BatchLimits(batch_tokens, spec.max_batch_size, spec.max_wait_ms / 1000, spec.max_queue_items,
                       spec.min_padding_efficiency, spec.max_batch_token_pairs, spec.aging,
                       packed=spec.layout == "packed")


def _need(spec: model_specs.ModelSpec, device: torch.device, shape, max_sequence_length: int) -> memory_budget.Need:
    layers, dim, heads = shape
    batch_tokens = batch_budget.most_tokens(spec.max_batch_tokens, device)
    needed = memory_budget.required_bytes(layers, dim, heads, batch_tokens, max_sequence_length)
    return memory_budget.Need(spec.name, device, layers, dim, heads, needed)


def load_models(args) -> dict[str, tuple[model_specs.ModelSpec, list[torch.device], checkpoints.LoadedModel]]:
    """Locate every model, check they fit their devices (from shapes alone), then load them."""
    allow_download = not args.offline
    located, needs = {}, []
    spec_devices = []
    for spec in args.specs:
        devices = resolve_devices(spec.device)  # one worker, with its own copy of the model, per device
        spec_devices.append(devices)
        stem = checkpoints.STANDARD_MODELS.get(spec.name) if spec.source is None else None
        if stem is not None and not any(p.is_file() for p in checkpoints.candidate_paths(spec.name, None, args.model_dir)):
            shape = checkpoints.STANDARD_SHAPES[stem]  # checked before a download, not after
        else:
            located[spec.name] = sources.locate(spec.name, spec.source, args.model_dir, allow_download)
            shape = sources.shape(located[spec.name])
        needs += [_need(spec, device, shape, args.max_sequence_length) for device in devices]
    memory_budget.check_fits(needs, args.assume_available_memory_gib)
    models = {}
    for spec, devices in zip(args.specs, spec_devices):
        where = located.get(spec.name) or sources.locate(spec.name, spec.source, args.model_dir, allow_download)
        loaded = sources.load(spec.name, where)
        if loaded.random_weights:
            log.warning("!" * 72)
            log.warning("MODEL %s HAS RANDOM WEIGHTS (%s): outputs are meaningless", spec.name, where.path)
            log.warning("!" * 72)
        log.info("loaded %s (%s) from %s: %d layers, dim %d; on %s, %s, batch budget %s",
                 spec.name, loaded.source_format, where.path, loaded.num_layers, loaded.embed_dim,
                 ",".join(map(str, devices)), spec.precision, spec.max_batch_tokens)
        models[spec.name] = (spec, devices, loaded)
    return models


async def warm_up(router: ModelRouter, servicer: Esm2Servicer) -> None:
    """One pass per model, attention mode and worker, so the first request pays no start-up cost."""
    for name, loaded in servicer.models.items():
        token_ids = loaded.tokenize(tuple("MKTAYIAKQR"))
        for worker in range(len(router.schedulers[name].workers)):
            for outputs in ({OutputKind.MEAN, OutputKind.LOGITS}, {OutputKind.ATTENTIONS}):
                await router.run_now([ModelInput(name, token_ids, frozenset(outputs), (loaded.num_layers,))], worker)
        servicer.ready.add(name)


def cache_scope(loaded: checkpoints.LoadedModel, spec: model_specs.ModelSpec) -> str:
    """What a model's results depend on besides the input: its weights files and its numerics."""
    path = loaded.checkpoint
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    weights = ";".join(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}" for f in files for stat in [f.stat()])
    return f"{loaded.name}|{weights}|{spec.precision}|{spec.attention}|{spec.layout}"


def build_schedulers(served, args) -> tuple[ModelRouter, dict]:
    """Per model, one worker per device it lists and one scheduler with the model's own settings
    and batch budget (chosen once the model is on its device); one result cache (one byte bound)
    for all of them. Also the budgets, for ListModels."""
    cache = result_cache.ResultCache(args.cache_mb << 20)
    schedulers, budgets = {}, {}
    for name, (spec, devices, loaded) in served.items():
        workers = [
            ModelWorker(copy, device, spec.precision, spec.attention == "fast", args.simulate_oom_above_tokens,
                        faults.FaultHook.from_env(), packed=spec.layout == "packed")
            for copy, device in zip(replicate({name: loaded}, devices), devices)
        ]
        first = workers[0]
        budgets[name] = batch_budget.for_model(spec.max_batch_tokens, first.models[name], first.device,
                                               first.autocast_dtype, args.batch_sweep_seconds)
        log.info("%s: batch budget %s; precision %s", name, budgets[name].describe(), spec.precision)
        schedulers[name] = Scheduler(
            workers,
            batch_limits(spec, budgets[name].tokens),
            cache=cache, scopes={name: cache_scope(loaded, spec)},
        )
    return ModelRouter(schedulers), budgets


async def serve(args) -> int:
    simulated = {"present": True, "absent": False}.get(args.simulate_cpu_native)
    for spec in args.specs:  # before the slow part: refuse fast
        for device in resolve_devices(spec.device):
            precision.check(spec.precision, device, simulated)
    served = load_models(args)
    models = {name: loaded for name, (_, _, loaded) in served.items()}
    router, budgets = build_schedulers(served, args)
    devices = {name: ",".join(map(str, model_devices)) for name, (_, model_devices, _) in served.items()}
    servicer = Esm2Servicer(models, router, request_limits(args), devices, args.max_json_response_mb << 20,
                            args.max_request_bytes, OPENAPI_DOCUMENT.read_bytes(), batch_budgets=budgets,
                            precisions={name: spec.precision for name, (spec, _, _) in served.items()})

    keys = load_keys(args.api_keys_file, os.environ.get("ESM_API_KEYS"))
    receive_ceiling = max(args.max_request_message_bytes, RECEIVE_CEILING_BYTES, args.max_request_bytes + (64 << 10))
    guard = request_guard.RequestGuard(keys, args.max_metadata_bytes, args.max_request_message_bytes,
                                       dict.fromkeys(JSON_METHODS, receive_ceiling))
    server = grpc.aio.server(
        interceptors=[guard],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", receive_ceiling),
            ("grpc.max_metadata_size", GRPC_METADATA_CEILING_BYTES),
            ("grpc.absolute_max_metadata_size", GRPC_METADATA_CEILING_BYTES),
            # A second server on a busy port must fail, not take half of its connections.
            ("grpc.so_reuseport", 0),
        ],
    )
    pb_grpc.add_Esm2ServiceServicer_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME), server
    )
    for name in ["", SERVICE_NAME, *models]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
    try:
        port = server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError as exc:  # grpc says only "Failed to bind"; a busy port is the usual cause
        raise AddressInUse(f"cannot listen on {args.host}:{args.port}: address in use or unavailable ({exc})") from None
    if args.metrics_port:
        try:
            prometheus_client.start_http_server(args.metrics_port, addr=args.metrics_host)
        except OSError as exc:
            raise AddressInUse(f"cannot serve metrics on {args.metrics_host}:{args.metrics_port}: {exc.strerror}") from None
    await server.start()
    log.info("gRPC listening on %s:%d; warming up; result cache %d MiB", args.host, port, args.cache_mb)

    await warm_up(router, servicer)
    router.start()
    for name in ["", SERVICE_NAME, *models]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if keys:
        log.info("API keys required (%d configured)", len(keys))
    log.info("ready: serving %s on port %d", ", ".join(models), port)
    if args.port_file:
        args.port_file.write_text(str(port))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    router.on_lost(lambda reason: stop.set())
    await stop.wait()

    if router.lost is not None:
        # Queued work has already failed with UNAVAILABLE; let those answers go out, then exit
        # non-zero so that a supervisor restarts the process. The worker thread may be stuck
        # in the device, so it is not joined.
        log.error("exiting with status %d so that a supervisor restarts this server", EXIT_WORKER_LOST)
        for name in ["", SERVICE_NAME, *models]:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        await server.stop(min(args.grace_seconds, LOST_WORKER_GRACE_S))
        return EXIT_WORKER_LOST

    # Health checks see NOT_SERVING at once (every name), while requests are still served for the
    # drain window: balancers stop sending before the server stops accepting. A second signal
    # ends the window early.
    await health_servicer.enter_graceful_shutdown()
    if args.drain_seconds > 0:
        log.info("draining: NOT_SERVING, still serving for %.1fs", args.drain_seconds)
        stop.clear()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(stop.wait(), args.drain_seconds)
    log.info("shutting down: finishing in-flight requests (up to %.0fs)", args.grace_seconds)
    await server.stop(args.grace_seconds)
    await router.close()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    try:
        code = asyncio.run(serve(args))
    except (checkpoints.CheckpointNotFound, hf_checkpoints.UnservableModel, memory_budget.DoesNotFit, AddressInUse,
            precision.PrecisionUnsupported) as exc:
        log.error("%s", exc)
        return 2
    if code == EXIT_WORKER_LOST:
        logging.shutdown()
        os._exit(code)  # without joining the worker thread, which may never return
    return code


if __name__ == "__main__":
    sys.exit(main())
