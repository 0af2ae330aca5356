"""Start the ESM-2 gRPC server: load and warm the models, then serve until SIGTERM.

    python -m service.server --models esm2-8m --model-dir /models
    python -m service.server --models esm2-ft --checkpoint esm2-ft=hf:my-org/esm2-650m-ft
    python -m service.server --models-file models.toml

Every setting is declared once in service.config: its flag, its environment variable (ESM_
plus the name in capitals, e.g. ESM_MODELS, ESM_PORT; flags win), default and bounds. A models file (service.model_specs)
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
from dataclasses import astuple, dataclass
from pathlib import Path

import grpc
import prometheus_client
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb, pb_grpc
from esm2_wire.vocabulary import Limits
from service.models import batch_budget, checkpoints, memory_budget, sources
from service.engine import faults
from service import cgroup_limits, config, logs, metrics, model_specs, tracing
from service.models import precision
from service.models.served import ServedModel
from service.api import request_guard
from service.engine import result_cache
from service.api.auth import Tenancy, load_keys
from service.engine.router import ModelRouter
from service.engine.inputs import ModelInput
from service.engine.worker import ModelWorker, replicate
from service import platforms
from service.platforms import resolve_devices
from service.engine.policy import CostModel, device_defaults
from service.engine.scheduler import Scheduler
from service.api.response_memory import ResponseMemory
from service.api.servicer import Esm2Servicer
from service.api.scoring import ScoreLimits

log = logging.getLogger("service")
SERVICE_NAME = pb.DESCRIPTOR.services_by_name["Esm2Service"].full_name
OPENAPI_DOCUMENT = Path(__file__).resolve().parent / "api" / "openapi.json"  # served at /api/v3/openapi.json
MAX_MESSAGE_BYTES = 1 << 30  # unary responses of long sequences are large; streaming is preferred
# grpc refuses bigger request messages itself (RESOURCE_EXHAUSTED) before reading them. Up to
# here, RequestGuard answers INVALID_ARGUMENT for anything over --max-request-message-bytes;
# the JSON gateway's methods may use all of it: their bodies are bounded by the gateway's own
# --max-request-bytes (4 MiB), and a JSON caller should hear about its body, not a proto size.
RECEIVE_CEILING_BYTES = (4 << 20) + (64 << 10)
JSON_METHODS = tuple(f"/{SERVICE_NAME}/{name}"
                     for name in ("EncodeJson", "PredictJson", "LogProbJson", "ScoreJson", "ScoreStreamJson"))
SCORE_METHODS = tuple(f"/{SERVICE_NAME}/{name}" for name in ("Score", "ScoreStream"))  # variants: larger messages
# The health name Kubernetes' liveness probe asks: SERVING unless a model worker is stuck in a batch
# (a hung device), so that the kubelet restarts the pod (watch_liveness).
LIVENESS = "liveness"
EXIT_WORKER_LOST = 3  # the model worker died or the device is unusable: restart me
LOST_WORKER_GRACE_S = 5.0  # to send the UNAVAILABLE answers of work already accepted


class AddressInUse(Exception):
    pass


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The declared settings (service.config): flags, else ESM_* variables, else defaults; then the
    served models' specs (models file or --models/--checkpoint) as `specs`."""
    p = config.parser_for(config.ServerSettings, prog="esm2-server", description=__doc__.splitlines()[0])
    settings = config.from_flags(config.ServerSettings, p.parse_args(argv), p)
    args = argparse.Namespace(**dict(settings))
    if args.models_file is not None and (args.models is not None or args.checkpoints):
        p.error("--models-file names the models: leave out --models and --checkpoint (and ESM_MODELS, ESM_CHECKPOINTS)")
    if args.models is None:
        args.models = "esm2-8m"
    try:
        defaults = settings.model_defaults()
        if args.models_file is not None:
            args.specs = model_specs.from_file(args.models_file, defaults)
        else:
            args.specs = model_specs.from_flags(args.models, args.checkpoints, defaults)
    except model_specs.BadModelsConfig as exc:
        p.error(str(exc))
    too_small = [s.name for s in args.specs if s.max_queue_items < args.max_items]
    if too_small:
        p.error(f"max_queue_items must be at least --max-items ({args.max_items}) for {', '.join(too_small)}")
    if not args.max_request_message_bytes:
        args.max_request_message_bytes = request_guard.max_request_message_bytes(
            args.max_items, args.max_sequence_length, args.max_windowed_residues)
    return args


def request_limits(args) -> Limits:
    return Limits(args.max_items, args.max_sequence_length, args.max_windowed_residues)


def _need(spec: model_specs.ModelSpec, device: torch.device, shape, max_sequence_length: int) -> memory_budget.Need:
    layers, dim, heads = shape
    batch_tokens = batch_budget.most_tokens(spec.max_batch_tokens, device)
    needed = memory_budget.required_bytes(layers, dim, heads, batch_tokens, max_sequence_length,
                                          precision.resolve(spec.precision, resolve_devices(spec.device)), device.type)
    return memory_budget.Need(spec.name, device, layers, dim, heads, needed)


def load_models(args) -> dict[str, ServedModel]:
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
    for device in dict.fromkeys(n.device for n in needs):
        metrics.DEVICE_MEMORY_ESTIMATE.labels(str(device)).set(sum(n.bytes for n in needs if n.device == device))
    models = {}
    for spec, devices in zip(args.specs, spec_devices):
        where = located.get(spec.name) or sources.locate(spec.name, spec.source, args.model_dir, allow_download)
        loaded = sources.load(spec.name, where)
        precision.cast_weights(loaded.model, precision.resolve(spec.precision, devices))  # once, before any copy
        if loaded.random_weights:
            log.warning("!" * 72)
            log.warning("MODEL %s HAS RANDOM WEIGHTS (%s): outputs are meaningless", spec.name, where.path)
            log.warning("!" * 72)
        log.info("loaded %s (%s) from %s: %d layers, dim %d; on %s, %s, batch budget %s",
                 spec.name, loaded.source_format, where.path, loaded.num_layers, loaded.embed_dim,
                 ",".join(map(str, devices)), spec.precision, spec.max_batch_tokens)
        models[spec.name] = ServedModel(spec, devices, loaded)
    return models


async def warm_up(router: ModelRouter, served: dict[str, ServedModel]) -> None:
    """One pass per model, attention mode and worker, so the first request pays no start-up cost."""
    for name, model in served.items():
        token_ids = model.loaded.tokenize(tuple("MKTAYIAKQR"))
        for worker in range(len(router.schedulers[name].workers)):
            for outputs in ({OutputKind.MEAN, OutputKind.LOGITS}, {OutputKind.ATTENTIONS}):
                await router.run_now(
                    [ModelInput(name, token_ids, frozenset(outputs), (model.loaded.num_layers,))], worker)
        model.ready = True


def cache_scope(model: ServedModel) -> str:
    """What a model's results depend on besides the input: its weights files and its numerics."""
    path = model.loaded.checkpoint
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path]
    weights = ";".join(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns}" for f in files for stat in [f.stat()])
    return f"{model.name}|{weights}|{model.precision}|{model.spec.attention}|{model.spec.layout}"


def build_schedulers(served: dict[str, ServedModel], args, cache_bytes: int | None = None) -> ModelRouter:
    """Per model, one worker per device it lists and one scheduler with the model's own settings
    and batch budget (chosen once the model is on its device, and kept in its record for
    ListModels); one result cache (one byte bound, default --cache-mb) for all of them."""
    cache = result_cache.ResultCache(args.cache_mb << 20 if cache_bytes is None else cache_bytes)
    schedulers = {}
    for name, model in served.items():
        spec = model.spec
        workers = [
            ModelWorker(copy, device, spec.precision, spec.attention == "fast", args.simulate_oom_above_tokens,
                        faults.FaultHook.armed(args.fault_file), packed=spec.packed_layout(device.type))
            for copy, device in zip(replicate({name: model.loaded}, model.devices), model.devices)
        ]
        first = workers[0]
        model.budget = batch_budget.for_model(spec.max_batch_tokens, first.models[name], first.platform, first.stream,
                                              first.autocast_dtype, args.batch_sweep_seconds)
        log.info("%s: batch budget %s; precision %s", name, model.budget.describe(), spec.precision)
        schedulers[name] = Scheduler(
            workers,
            spec.batch_limits(model.budget.tokens, first.device.type),
            cache=cache, scopes={name: cache_scope(model)},
            cost=CostModel(seconds_per_work=device_defaults(first.device.type).seconds_per_work),
        )
    return ModelRouter(schedulers)


def choose_precisions(args) -> None:
    """Before the slow part, so that a refusal comes fast: each model's precision on its devices
    (`auto` resolved: service.models.precision), checked to be native there; TF32 for what stays
    fp32 on CUDA unless a model there asked for fp32. The specs then carry the resolved choice,
    and the resolved layout (config.resolve_layout, by the type of the model's first device)."""
    simulated = {"present": True, "absent": False}.get(args.simulate_cpu_native)
    chosen, requested = [], []
    for spec in args.specs:
        devices = resolve_devices(spec.device)
        resolved = precision.resolve(spec.precision, devices)
        for device in devices:
            precision.check(resolved, device, simulated)
            requested.append((spec.precision, device))
        layout = config.resolve_layout(spec.layout, devices[0].type if devices else "cpu")
        chosen.append(spec.model_copy(update={"precision": resolved, "layout": layout}))
    args.specs = chosen
    if precision.use_tf32(requested):
        log.info("CUDA: fp32 matmuls use TF32")


async def watch_liveness(router: ModelRouter, health_servicer, bound_s: float) -> None:
    """Keep the `liveness` health name SERVING while every model worker is idle or progressing,
    NOT_SERVING while one has been inside a batch for `bound_s` without finishing a layer or a
    batch. A hung device hangs its worker thread; nothing else notices, since health was
    otherwise set once at start-up. It recovers if the worker does."""
    workers = [worker for scheduler in router.schedulers.values() for worker in scheduler.workers]
    alive = True
    while True:
        stalled = max(worker.progress.stalled_for() for worker in workers)
        if (stalled < bound_s) != alive:
            alive = not alive
            if alive:
                log.warning("liveness: the model workers progress again")
            else:
                log.error("liveness: a model worker has made no progress for %.0fs (bound %.0fs): NOT_SERVING",
                          stalled, bound_s)
            await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING if alive
                                      else health_pb2.HealthCheckResponse.NOT_SERVING)
        await asyncio.sleep(min(bound_s / 4, 5.0))  # a poll of the workers' clocks, not a wait for an event


def follow_cpu_limit() -> None:
    """torch's intra-op threads follow the CPU quota and affinity mask (a container given 2 CPUs
    on a 64-core host runs 2, not 64), unless OMP_NUM_THREADS says how many."""
    cpus = cgroup_limits.cpu_limit()
    if "OMP_NUM_THREADS" in os.environ:
        why = "OMP_NUM_THREADS"
    else:
        torch.set_num_threads(cpus.cpus)
        why = "the CPU limit"
    metrics.CPU_LIMIT.set(cpus.cpus)
    metrics.TORCH_THREADS.set(torch.get_num_threads())
    log.info("CPUs: %s; torch threads %d (from %s)", cpus.describe(), torch.get_num_threads(), why)


@dataclass(frozen=True)
class MemoryBounds:
    """The byte bounds of what the server holds beside its models (bytes)."""

    held_responses: int  # unsent responses of all callers (--max-held-response-mb)
    json_budget: int  # JSON responses in flight (--json-response-budget-mb)
    result_cache: int  # --cache-mb


def memory_bounds(args, models: dict[str, ServedModel], start: cgroup_limits.MemoryLimit | None) -> MemoryBounds:
    """The flags' bounds, each cut to a quarter of what a cgroup memory limit leaves once the
    models on CPU and their worst batch are counted (`start`: the limit as read before the models
    loaded), so that together they stay inside the container. Without a limit, the flags'."""
    wanted = MemoryBounds(args.max_held_response_mb << 20, args.json_response_budget_mb << 20, args.cache_mb << 20)
    if start is None:
        return wanted
    on_cpu = sum(_need(m.spec, device, (m.loaded.num_layers, m.loaded.embed_dim, m.loaded.attention_heads),
                       args.max_sequence_length).bytes for m in models.values() for device in m.devices
                 if device.type == "cpu")
    share = max(1 << 20, (start.available_bytes - on_cpu) // 4)
    bounds = MemoryBounds(*(min(share, value) for value in astuple(wanted)))
    if bounds != wanted:
        log.info("under %s: held responses %d MiB (--max-held-response-mb %d), JSON responses in flight %d MiB "
                 "(--json-response-budget-mb %d), result cache %d MiB (--cache-mb %d): at most a quarter each of "
                 "the %d MiB the limit left after the models", start.source, bounds.held_responses >> 20,
                 args.max_held_response_mb, bounds.json_budget >> 20, args.json_response_budget_mb,
                 bounds.result_cache >> 20, args.cache_mb, (start.available_bytes - on_cpu) >> 20)
    return bounds


async def serve(args) -> int:
    # Before the slow part: a missing otel extra stops start-up at once.
    tracing_interceptors = [tracing.setup(args.otlp_endpoint)] if args.otlp_endpoint else []
    platforms.load_plugin(args.device_plugin)  # tests only (ESM_DEVICE_PLUGIN): the simulated CUDA device
    choose_precisions(args)
    follow_cpu_limit()
    memory_limit = cgroup_limits.memory_limit()
    metrics.MEMORY_LIMIT.set(memory_limit.limit_bytes if memory_limit else cgroup_limits.host_total_bytes())
    log.info("memory: %s", cgroup_limits.describe_memory())
    models = load_models(args)
    bounds = memory_bounds(args, models, memory_limit)
    router = build_schedulers(models, args, bounds.result_cache)
    keys = load_keys(args.api_keys_file, args.api_keys and args.api_keys.get_secret_value())
    servicer = Esm2Servicer(models, router, request_limits(args), args.max_json_response_mb << 20,
                            args.max_request_bytes, OPENAPI_DOCUMENT.read_bytes(),
                            tenancy=Tenancy(keys, shared=args.share_cache_across_keys), access_log=args.access_log,
                            memory=ResponseMemory(args.max_stream_held_mb << 20, bounds.held_responses),
                            max_unary_response_bytes=args.max_unary_response_mb << 20,
                            json_budget_bytes=bounds.json_budget,
                            score_limits=ScoreLimits(args.max_score_mutations, args.max_score_passes),
                            api_keys_required=bool(keys))
    receive_ceiling = max(args.max_request_message_bytes, RECEIVE_CEILING_BYTES, args.max_request_bytes + (64 << 10))
    score_bytes = request_guard.max_score_message_bytes(args.max_items, args.max_sequence_length,
                                                        args.max_score_mutations, args.max_windowed_residues)
    receive_ceiling = max(receive_ceiling, score_bytes)
    guard = request_guard.RequestGuard(keys, args.max_metadata_bytes, args.max_request_message_bytes,
                                       {**dict.fromkeys(JSON_METHODS, receive_ceiling),
                                        **dict.fromkeys(SCORE_METHODS, max(args.max_request_message_bytes, score_bytes))})
    server = grpc.aio.server(
        # The tracing interceptor first: a refused call (bad key, too large) is traced too.
        interceptors=[*tracing_interceptors, guard],
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", receive_ceiling),
            ("grpc.max_metadata_size", config.GRPC_METADATA_CEILING_BYTES),
            ("grpc.absolute_max_metadata_size", config.GRPC_METADATA_CEILING_BYTES),
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
    await health_servicer.set(LIVENESS, health_pb2.HealthCheckResponse.SERVING)
    liveness = asyncio.get_running_loop().create_task(
        watch_liveness(router, health_servicer, args.liveness_stall_seconds), name="esm-liveness")
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
    log.info("gRPC listening on %s:%d; warming up; result cache %d MiB", args.host, port, bounds.result_cache >> 20)

    await warm_up(router, models)
    router.start()
    for name in ["", SERVICE_NAME, *models]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    if keys:
        log.info("API keys required (%d configured); results cached and merged %s", len(keys),
                 "across keys (--share-cache-across-keys)" if args.share_cache_across_keys else "per key")
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
    liveness.cancel()
    log.info("stopped")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs.setup(args.log_format)
    try:
        code = asyncio.run(serve(args))
    except (checkpoints.CheckpointNotFound, checkpoints.BadCheckpoint, memory_budget.DoesNotFit, AddressInUse,
            precision.PrecisionUnsupported, tracing.TracingUnavailable, platforms.DeviceUnavailable) as exc:
        log.error("%s", exc)
        return 2
    finally:
        tracing.shutdown()  # send the spans still buffered
    if code == EXIT_WORKER_LOST:
        logging.shutdown()
        os._exit(code)  # without joining the worker thread, which may never return
    return code


if __name__ == "__main__":
    sys.exit(main())
