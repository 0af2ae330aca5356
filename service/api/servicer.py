"""gRPC handlers: validate, queue work items, await them, render the answer.

Nothing here touches a model; results come back from the scheduler's futures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import re
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import orjson
from google.api import httpbody_pb2

from esm2_wire import chunks
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import FLEET_MODELS_HEADER, pb, pb_grpc
from esm2_wire.vocabulary import Limits
from service import errors, logs, metrics, request_context, tracing
from service.request_context import REQUEST_ID_HEADER, RequestContext, request_id_from
from service.api import json_limits, openapi, rendering, scoring
from service.api.auth import Tenancy
from service.api.response_memory import (
    DEFAULT_MAX_HELD_RESPONSE_MB, DEFAULT_MAX_STREAM_HELD_MB, HeldResponse, ResponseMemory,
)
from service.models.checkpoints import FAIR_ESM, HUGGING_FACE
from service.models.served import SERVER_VERSION, ServedModel
from service.errors import (
    FailedPrecondition, InvalidRequest, NotFound, Problem, ResponseBudgetFull, UnknownModel, echo,
)
from service.api.json_body import CONTENT_ENCODING_METADATA, BodyParser, failure
from service.engine.result_cache import result_bytes
from service.engine.router import ModelRouter
from service.engine.inputs import ModelInput
from service.api.request_schema import ACTIONS, request_schema
from service.api.docs_page import DOCS_PATH, DocsPage, DocsUnavailable
from service.api.playground_page import PLAYGROUND_PATH, PlaygroundPage
from service.api.scoring import ItemScores, PassRows, ScoreLimits, ScorePlan, StreamedScores
from service.api import windowed_scoring, windows
from service.api.validation import ParsedItem, parse_items, parse_options, parse_window, windowed_limits
from service.api.windows import Cover, Window

log = logging.getLogger(__name__)
JSON_MESSAGE_BYTES = chunks.DEFAULT_CHUNK_BYTES  # the JSON body goes to the gateway in messages of this size
# Passes of log_prob and Score: logits only, so that they batch and cache with predict's.
LOGITS_ONLY = frozenset({OutputKind.LOGITS})
# Envoy's router tells the upstream how long it will wait for the call (on by default; the Router
# filter's suppress_envoy_headers would turn it off): admission reads it as the deadline of calls
# that come through the gateway, JSON ones included, which carry no gRPC deadline.
GATEWAY_TIMEOUT_HEADER = "x-envoy-expected-rq-timeout-ms"
# What a refusal by estimated work names instead of a request that cannot finish in time.
SCORE_STREAM_ALTERNATIVE = ("the streaming RPC esm.v1.Esm2Service/ScoreStream (JSON: POST "
                            "/api/v3/{model}/score_stream/)")
# ScoreStream sends what a block of this many passes completed (a few seconds of work on a CPU for the
# 8M shape), and at least every SCORE_PROGRESS_SECONDS while passes finish, progress alone if need be.
SCORE_BLOCK_PASSES = 16
NDJSON = "application/x-ndjson"
SCORE_PROGRESS_SECONDS = 5.0


@dataclass
class Job:
    """A validated request: which model, which items, what to compute."""

    model: ServedModel
    items: list[ParsedItem]
    outputs: frozenset[OutputKind]
    layers: tuple[int, ...]
    window: Window | None = None  # windowed mode (service.api.windows): each item runs as its windows


def _writes_itself(handler):
    """A response-streaming handler that writes with `context.write`, presented as an async
    generator that yields nothing. The handlers write themselves so that each write can be timed
    (a caller that stops reading is found: service.api.response_memory); grpc.aio runs either form,
    but server interceptors such as OpenTelemetry's iterate a streaming handler's responses, which
    a plain coroutine does not have."""

    @functools.wraps(handler)
    async def generator(self, request, context):
        await handler(self, request, context)
        return
        yield  # unreachable: makes this function an async generator

    return generator


class Esm2Servicer(pb_grpc.Esm2ServiceServicer):
    def __init__(
        self, models: dict[str, ServedModel], router: ModelRouter, limits: Limits,
        max_json_response_bytes: int = json_limits.DEFAULT_MAX_JSON_RESPONSE_MB << 20,
        max_request_bytes: int = json_limits.DEFAULT_MAX_REQUEST_BYTES,
        openapi_document: bytes = b"{}", tenancy: Tenancy | None = None, access_log: bool = False,
        memory: ResponseMemory | None = None,
        max_unary_response_bytes: int = json_limits.DEFAULT_MAX_UNARY_RESPONSE_MB << 20,
        json_budget_bytes: int = json_limits.DEFAULT_JSON_BUDGET_MB << 20,
        score_limits: ScoreLimits = ScoreLimits(),
        api_keys_required: bool = False,
    ):
        self.score_limits = score_limits
        self.max_unary_response_bytes = max_unary_response_bytes
        # JSON responses admitted and not yet handed to the gateway, by their estimates.
        self.json_budget_bytes = json_budget_bytes
        self.json_in_flight = 0
        # Unsent response bytes, bounded per stream and in total (service.api.response_memory).
        self.memory = memory or ResponseMemory(DEFAULT_MAX_STREAM_HELD_MB << 20, DEFAULT_MAX_HELD_RESPONSE_MB << 20)
        self.tenancy = tenancy or Tenancy([])
        self.access_log = access_log  # one line per finished RPC (service.logs.access_line)
        self.max_json_response_bytes = max_json_response_bytes
        self.bodies = BodyParser(limits, max_request_bytes, score_limits)
        self.openapi_document = openapi.as_served(openapi_document, api_keys_required)
        self.docs_page = DocsPage(random_models=sorted(n for n, m in models.items() if m.loaded.random_weights))
        self.playground_page = PlaygroundPage(api_keys_required)
        self.models = models
        self.router = router  # one scheduler per model
        self.limits = limits

    # ---- request preparation -------------------------------------------------
    def _model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise UnknownModel(name, self.models)
        return served

    def _window(self, given, problems: list[Problem]) -> tuple[Window | None, Limits]:
        """The request's window (None: not windowed; `given` is an esm.v1.Window or None) and the
        limits its items are checked against; a bad window's problems go to `problems`."""
        if given is None:
            return None, self.limits
        limits = windowed_limits(self.limits) if self.limits.max_windowed_residues else self.limits
        try:
            return parse_window(given.length, given.stride, self.limits), limits
        except InvalidRequest as exc:
            problems += exc.problems
            return None, limits

    def _encode_items(self, sequences: list[str], window: pb.Window | None,
                      problems: list[Problem]) -> tuple[Window | None, list[ParsedItem], list[Problem]]:
        """Encode-alphabet items (up to the windowed limit with a window) and the window; the items'
        problems go to `problems`, the window's are returned (params: told after the items')."""
        window_problems: list[Problem] = []
        windowed, limits = self._window(window, window_problems)
        try:
            return windowed, parse_items(sequences, predict=False, limits=limits), window_problems
        except InvalidRequest as exc:
            problems += exc.problems
            return windowed, [], window_problems

    def _encode_job(self, model: str, include: list[str], repr_layers: list[int], sequences: list[str],
                    window: pb.Window | None = None) -> Job:
        served = self._model(model)
        loaded = served.loaded
        problems: list[Problem] = []  # report every problem at once: items first, then params
        windowed, parsed, window_problems = self._encode_items(sequences, window, problems)
        try:
            options = parse_options(include, repr_layers, loaded.num_layers, model)
        except InvalidRequest as exc:
            problems += exc.problems
        problems += window_problems
        if window is not None and not problems:
            problems += _windowed_output_problems(options.outputs, parsed)
        if problems:
            raise InvalidRequest.of(*problems)
        if OutputKind.CONTACTS in options.outputs and not loaded.has_contact_regression:
            raise FailedPrecondition.of(Problem(
                "params.include", None,
                f"model {model} has no contact regression weights ({loaded.contacts_unavailable}), "
                "so contacts are unavailable",
            ))
        if OutputKind.LOGITS in options.outputs:
            self._require_lm_head(served, "params.include")
        return Job(served, parsed, options.outputs, options.layers, windowed)

    @staticmethod
    def _require_lm_head(served: ServedModel, field: str) -> None:
        loaded = served.loaded
        if not loaded.has_lm_head:
            raise FailedPrecondition.of(Problem(
                field, None,
                f"model {loaded.name} has no masked-LM head ({loaded.source} is not an EsmForMaskedLM "
                "checkpoint), so logits and predictions are unavailable",
            ))

    def _predict_job(self, model: str, sequences: list[str]) -> Job:
        served = self._model(model)
        self._require_lm_head(served, "model")
        parsed = parse_items(sequences, predict=True, limits=self.limits)
        return Job(served, parsed, frozenset({OutputKind.LOGITS}), ())

    def _log_prob_job(self, model: str, sequences: list[str], window: pb.Window | None = None) -> Job:
        served = self._model(model)
        self._require_lm_head(served, "model")
        problems: list[Problem] = []
        windowed, parsed, window_problems = self._encode_items(sequences, window, problems)
        if problems or window_problems:
            raise InvalidRequest.of(*problems, *window_problems)
        return Job(served, parsed, LOGITS_ONLY, (), windowed)

    def _score_plan(self, model: str, method: str, sequences: list[str], variants: list[list[str]],
                    window: pb.Window | None = None) -> tuple[ServedModel, ScorePlan, Window | None]:
        served = self._model(model)
        self._require_lm_head(served, "model")
        problems: list[Problem] = []  # every problem at once: items first, then params
        window_problems: list[Problem] = []
        windowed, limits = self._window(window, window_problems)
        items = []
        try:
            items = scoring.parse_score_items(sequences, variants, limits, self.score_limits)
        except InvalidRequest as exc:
            problems += exc.problems
        try:
            method = scoring.parse_method(method)
        except InvalidRequest as exc:
            problems += exc.problems
        problems += window_problems
        if problems:
            raise InvalidRequest.of(*problems)
        if windowed is not None:
            passes = windowed_scoring.passes_needed(method, items, windowed)
        else:
            passes = scoring.passes_needed(method, items)
        # All of a request's passes are queued at once, so its model's queue bound caps them too.
        cap, named = min(
            (self.score_limits.max_passes, "--max-score-passes"), (served.spec.max_queue_items, "--max-queue-items"))
        if passes > cap:
            raise InvalidRequest.of(Problem(
                "items", None, f"the request needs {passes} forward passes ({method}); at most {cap} are allowed "
                               f"({named}): split the variants or sequences over several requests"))
        if windowed is not None:
            return served, windowed_scoring.plan_of(method, items, windowed), windowed
        return served, ScorePlan.of(method, items), None

    @staticmethod
    def _deadline(context) -> float | None:
        """When the caller stops waiting (time.monotonic, the scheduler's clock): its gRPC deadline, or
        through Envoy the time the gateway gives the call (GATEWAY_TIMEOUT_HEADER), whichever is first."""
        remaining = context.time_remaining()
        gateway = gateway_timeout_s(context)
        if gateway is not None:
            remaining = gateway if remaining is None else min(remaining, gateway)
        return None if remaining is None else time.monotonic() + remaining

    def _submit(self, job: Job, context, alternative: str = "") -> list[asyncio.Future]:
        """One future per item: its result, or in windowed mode its windows' results stitched."""
        if job.window is None:
            return self._submit_pieces(job, [[item.tokens] for item in job.items], job.outputs, context, alternative)
        covers = [Cover.of(len(item.tokens), job.window) for item in job.items]
        pieces = [[item.tokens[span.start:span.stop] for span in cover.spans] for item, cover in zip(job.items, covers)]
        groups = self._submit_windows(job, pieces, context, alternative)
        stitched = []
        for cover, group in zip(covers, groups):
            task = asyncio.ensure_future(_stitched(cover, group, job.outputs))
            # However the task ends (cancelled before it ran included), its windows are let go.
            task.add_done_callback(lambda _, group=group: _release(group))
            stitched.append(task)
        return stitched

    def _submit_windows(self, job: Job, pieces: list[list[tuple[str, ...]]], context,
                        alternative: str = "") -> list[list[asyncio.Future]]:
        """Every window of every item queued at once, as ordinary items; their futures, per item."""
        flat = self._submit_pieces(job, pieces, windows.window_outputs(job.outputs), context, alternative)
        groups, at = [], 0
        for item_pieces in pieces:
            groups.append(flat[at:at + len(item_pieces)])
            at += len(item_pieces)
        return groups

    def _submit_pieces(self, job: Job, pieces: list[list[tuple[str, ...]]], outputs: frozenset[OutputKind],
                       context, alternative: str = "") -> list[asyncio.Future]:
        """Queue each item's pieces (the item itself, or its windows) at once, all or none."""
        tokenize = job.model.loaded.tokenize
        tenant = self.tenancy.of(context.invocation_metadata())
        num_layers = job.model.loaded.num_layers  # the work estimate counts only the layers an item needs
        inputs = [ModelInput(job.model.name, tokenize(tokens), outputs, job.layers, tenant, num_layers)
                  for item_pieces in pieces for tokens in item_pieces]
        request = request_context.current()
        if request is not None:
            request.items, request.residues = len(inputs), sum(item.length - 2 for item in inputs)
            request.submitted()
        return self.router.submit(inputs, self._deadline(context), request, alternative)

    async def _log_probs(self, job: Job, context) -> list[float]:
        columns = {token: i for i, token in enumerate(job.model.vocabulary)}
        if job.window is not None:
            return await self._windowed_log_probs(job, columns, context)
        results = await self._results(job, context)
        return [scoring.sequence_log_prob(item.tokens, result.logits, columns)
                for item, result in zip(job.items, results)]

    async def _windowed_log_probs(self, job: Job, columns: dict[str, int], context) -> list[float]:
        covers = [Cover.of(len(item.tokens), job.window) for item in job.items]
        pieces = [[item.tokens[span.start:span.stop] for span in cover.spans] for item, cover in zip(job.items, covers)]
        groups = self._submit_windows(job, pieces, context)
        try:
            values = []
            for item, cover, group in zip(job.items, covers, groups):
                logits = [result.logits for result in await asyncio.gather(*group)]
                values.append(await asyncio.to_thread(windowed_scoring.log_prob, item.tokens, cover, logits, columns))
            return values
        finally:
            _release([future for group in groups for future in group])
            _trace_queue_wait(request_context.current())

    async def _score_passes(self, model: str, method: str, sequences: list[str], variants: list[list[str]],
                            context, window: pb.Window | None = None) -> AsyncIterator[tuple[ServedModel, PassRows, int]]:
        """Plan the passes and tokenize them off the event loop (a pll request may be 2,048 passes of
        2,048 tokens), queue them all at once, and yield (model, rows, passes done) as each finishes, in
        plan order, keeping only the rows the scores read."""
        tenant = self.tenancy.of(context.invocation_metadata())

        def prepare() -> tuple[ServedModel, ScorePlan, Window | None, list[ModelInput]]:
            served, plan, windowed = self._score_plan(model, method, sequences, variants, window)
            tokenize = served.loaded.tokenize
            return served, plan, windowed, [ModelInput(served.name, tokenize(tokens), LOGITS_ONLY, (), tenant)
                                            for tokens in plan.passes]
        with tracing.span("validate"):
            served, plan, windowed, inputs = await asyncio.to_thread(prepare)
        request = request_context.current()
        if request is not None:
            request.items, request.residues = len(inputs), sum(item.length - 2 for item in inputs)
            request.submitted()
        # Each pass's [L, 20] logits are let go once its rows are read: up to --max-score-passes of them.
        waiting = collections.deque(
            self.router.submit(inputs, self._deadline(context), request,
                               SCORE_STREAM_ALTERNATIVE.format(model=served.name)) if inputs else ())
        rows = PassRows(plan) if windowed is None else windowed_scoring.WindowedRows(plan, windowed)
        try:
            yield served, rows, 0
            for index in range(len(waiting)):
                rows.add(index, (await waiting[0]).logits)
                waiting.popleft()
                yield served, rows, index + 1
        finally:
            _release(list(waiting))

    async def _scores(self, model: str, method: str, sequences: list[str], variants: list[list[str]],
                      context, window: pb.Window | None = None) -> list[ItemScores]:
        async with contextlib.aclosing(self._score_passes(model, method, sequences, variants, context,
                                                          window)) as passes:
            async for served, rows, _ in passes:
                pass
        columns = {token: i for i, token in enumerate(served.vocabulary)}
        return await asyncio.to_thread(scoring.item_scores, rows, columns)

    async def _score_blocks(self, model: str, method: str, sequences: list[str], variants: list[list[str]],
                            context, window: pb.Window | None = None) -> AsyncIterator[dict]:
        """ScoreStream's messages, as fields by their proto names: after every SCORE_BLOCK_PASSES passes
        (or SCORE_PROGRESS_SECONDS, so that an idle timeout never cuts a slow scan), and after the last,
        the variants those passes completed, or the progress alone."""
        streamed = None
        sent_at, sent_passes = time.monotonic(), 0
        async with contextlib.aclosing(self._score_passes(model, method, sequences, variants, context,
                                                          window)) as passes:
            async for served, rows, done in passes:
                if streamed is None:
                    streamed = StreamedScores(rows)
                    columns = {token: i for i, token in enumerate(served.vocabulary)}
                total = len(rows.plan.passes)
                if done < total and (done == 0 or done - sent_passes < SCORE_BLOCK_PASSES
                                     and time.monotonic() - sent_at < SCORE_PROGRESS_SECONDS):
                    continue
                blocks = await asyncio.to_thread(streamed.completed, done, columns)
                for block in blocks or [None]:
                    yield rendering.score_block_fields(block, done, total)
                sent_at, sent_passes = time.monotonic(), done

    async def _results(self, job: Job, context, alternative: str = "") -> list[ItemResult]:
        futures = self._submit(job, context, alternative)
        try:
            return await asyncio.gather(*futures)
        finally:
            _release(futures)
            _trace_queue_wait(request_context.current())

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context, model: str, gateway: bool = False):
        """Map failures to gRPC statuses, count every RPC, time those of served models.

        gateway: the RPC serves the JSON API, so failures also carry the HTTP status and
        BioLM's error body for the gateway (json_body.failure).
        """
        request = RequestContext(request_id_from(context.invocation_metadata()), method,
                                 model if model in self.models else "")
        request.span, request.trace_id = tracing.current_span()
        request_context.CURRENT.set(request)  # this RPC's task only: every log line about it carries the id
        code, message, trailers = grpc.StatusCode.OK, "", ()
        started = time.monotonic()
        try:
            yield
        except asyncio.CancelledError:
            # The caller cancelled or reset the call (or its deadline passed), wherever the handler
            # was waiting: for the model, or for the caller to read a stream.
            remaining = context.time_remaining()
            code_name = "DEADLINE_EXCEEDED" if remaining is not None and remaining <= 0 else "CANCELLED"
            metrics.REQUESTS.labels(method, code_name).inc()
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if not isinstance(exc, errors.ServiceError):  # a bug, not the caller's fault: log it, say only where
                log.exception("%s failed", method)
            if isinstance(exc, UnknownModel):  # behind a gateway: name the models of its other pools too
                exc = exc.behind_gateway(fleet_models(context))
            code, message, trailers = failure(exc, method, gateway, request.request_id)
        metrics.REQUESTS.labels(method, code.name).inc()
        if model in self.models:  # a label per served model only: callers cannot grow the label set
            metrics.REQUEST_SECONDS.labels(model, method).observe(time.monotonic() - started)
        if self.access_log:
            logs.access_line(request, code.name)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message, trailers)
        served = self.models.get(model)
        context.set_trailing_metadata(
            ((REQUEST_ID_HEADER, request.request_id), *(served.provenance.metadata() if served else ())))

    # ---- unary ---------------------------------------------------------------
    async def Encode(self, request, context):
        async with self._rpc("Encode", context, request.model):
            with tracing.span("validate"):
                job = self._encode_job(request.model, list(request.params.include), list(request.params.repr_layers),
                                       [item.sequence for item in request.items], _window_of(request.params))
            vocab = job.model.vocabulary
            estimate = json_limits.estimate_encode_bytes(
                [len(item.tokens) for item in job.items], job.outputs, len(job.layers), job.model.loaded.embed_dim,
                len(vocab), proto=True,
            )
            render = lambda i, r: rendering.encode_result(i, r, vocab)  # noqa: E731
            return await self._unary(job, context, estimate, render, pb.EncodeResponse, "EncodeStream")

    async def Predict(self, request, context):
        async with self._rpc("Predict", context, request.model):
            with tracing.span("validate"):
                job = self._predict_job(request.model, [item.sequence for item in request.items])
            vocab = job.model.vocabulary
            estimate = json_limits.estimate_predict_bytes([len(item.tokens) for item in job.items], len(vocab),
                                                          proto=True)
            render = lambda i, r: rendering.predict_result(i, r, job.items[i].tokens, vocab)  # noqa: E731
            return await self._unary(job, context, estimate, render, pb.PredictResponse, "PredictStream")

    async def _unary(self, job: Job, context, estimate: int, render, response_type, stream_rpc: str):
        """Refuse before queueing what is too large for one message; render in pieces off the loop."""
        limit = self.max_unary_response_bytes
        if estimate > limit:
            raise InvalidRequest(json_limits.too_large(estimate, limit, estimated=True, stream_rpc=stream_rpc,
                                                       unary=True))
        results = await self._results(job, context, f"the streaming RPC esm.v1.Esm2Service/{stream_rpc}")
        with HeldResponse(self.memory) as held, tracing.span("render"):
            pieces = await _render_pieces(context, render, results, held, lambda piece: piece.ByteSize())
            return await asyncio.to_thread(response_type, results=pieces)

    @contextlib.contextmanager
    def _json_budget(self, estimate: int, stream_rpc: str):
        """Admit a JSON response while those in flight fit the budget (one always fits), else 429."""
        budget = self.json_budget_bytes
        if self.json_in_flight and self.json_in_flight + estimate > budget:
            raise ResponseBudgetFull(
                f"server busy: JSON responses in flight here would take {(self.json_in_flight + estimate) >> 20} MiB, "
                f"over its {budget >> 20} MiB budget (--json-response-budget-mb); retry after the Retry-After seconds, "
                f"ask for less per request, or use the streaming gRPC RPC esm.v1.Esm2Service/{stream_rpc}")
        self.json_in_flight += estimate
        metrics.JSON_BYTES_IN_FLIGHT.set(self.json_in_flight)
        try:
            yield
        finally:
            self.json_in_flight -= estimate
            metrics.JSON_BYTES_IN_FLIGHT.set(self.json_in_flight)

    async def LogProb(self, request, context):
        async with self._rpc("LogProb", context, request.model):
            job = self._log_prob_job(request.model, [item.sequence for item in request.items],
                                     _window_of(request.params))
            values = await self._log_probs(job, context)
            return pb.LogProbResponse(
                results=[pb.LogProbResult(sequence_index=i, log_prob=v) for i, v in enumerate(values)])

    async def Score(self, request, context):
        async with self._rpc("Score", context, request.model):
            scores = await self._scores(request.model, request.params.method,
                                        [item.sequence for item in request.items],
                                        [list(item.variants) for item in request.items], context,
                                        _window_of(request.params))
            return pb.ScoreResponse(results=[rendering.score_result(i, s) for i, s in enumerate(scores)])

    @_writes_itself
    async def ScoreStream(self, request, context):
        async with self._rpc("ScoreStream", context, request.model):
            blocks = self._score_blocks(request.model, request.params.method, [item.sequence for item in request.items],
                                        [list(item.variants) for item in request.items], context,
                                        _window_of(request.params))
            async with contextlib.aclosing(blocks):
                with HeldResponse(self.memory) as held:
                    async for fields in blocks:
                        message = pb.ScoreStreamResponse(**fields)
                        held.take(message.ByteSize())
                        await held.send(context, message)
                        held.give_back(message.ByteSize())

    # ---- JSON (through the Envoy gateway) --------------------------------------
    async def _json(self, job: Job, context, estimate: int, render, stream_rpc: str) -> None:
        """Refuse before queueing what is over the JSON limit or the in-flight budget; then send the
        body one result at a time. EncodeJson/PredictJson stream google.api.HttpBody messages, which
        Envoy's transcoder passes on as they come: neither Envoy nor this server holds a whole body,
        and a caller that stops reading holds only flow-control windows, then is cancelled."""
        limit = self.max_json_response_bytes
        if estimate > limit:
            raise InvalidRequest(json_limits.too_large(estimate, limit, estimated=True, stream_rpc=stream_rpc))
        with self._json_budget(estimate, stream_rpc):
            results = await self._results(job, context, f"the streaming gRPC RPC esm.v1.Esm2Service/{stream_rpc}")
            await _send_provenance(context, job.model)
            # A JSON caller that reads nothing for STALL_SECONDS is not waited for: its budget share is
            # another caller's (per-stream bound 0).
            with HeldResponse(self.memory, per_stream_bytes=0) as held, tracing.span("render"):
                # In messages of exactly 1 MiB, the rest last. The slow-reader watch times each write,
                # and a caller reading at a modest rate takes 1 MiB well within STALL_SECONDS (a 55 MB
                # result not). Once a body's first message has left, Envoy can no longer retry the
                # call on another replica, so a replica that dies between two messages cuts the body
                # short: a body under 1 MiB, nearly every one, is written whole just before the status.
                messages = rendering.JsonMessages(JSON_MESSAGE_BYTES)
                last = len(results) - 1
                for index, result in enumerate(results):
                    if context.cancelled():
                        raise asyncio.CancelledError()
                    piece = await asyncio.to_thread(
                        lambda: rendering.json_piece(render(index, result), first=index == 0, last=index == last))
                    held.take(len(piece))
                    for message in messages.add(piece):
                        await held.send(context, httpbody_pb2.HttpBody(content_type="application/json", data=message))
                        held.give_back(len(message))
                if not results:
                    messages.add(rendering.json_piece(None, True, True))
                rest = messages.rest()
                if rest:
                    await held.send(context, httpbody_pb2.HttpBody(content_type="application/json", data=rest))
                    held.give_back(len(rest))

    async def _body(self, request, context, action: str):
        """The parsed body, read off the event loop (up to 4 MiB of JSON)."""
        encoding = dict(context.invocation_metadata() or ()).get(CONTENT_ENCODING_METADATA, "")
        return await asyncio.to_thread(self.bodies.parse, request.body.data, encoding, action)

    @_writes_itself
    async def EncodeJson(self, request, context):
        async with self._rpc("EncodeJson", context, request.model, gateway=True):
            with tracing.span("validate"):
                served = self._model(request.model)
                body = await self._body(request, context, "encode")
                job = self._encode_job(served.name, body.include, [int(v) for v in body.repr_layers], body.sequences,
                                       body.window)
            vocab = job.model.vocabulary
            estimate = json_limits.estimate_encode_bytes(
                [len(item.tokens) for item in job.items], job.outputs, len(job.layers), job.model.loaded.embed_dim,
                len(vocab),
            )
            render = lambda i, r: rendering.encode_json_result(i, r, vocab)  # noqa: E731
            await self._json(job, context, estimate, render, "EncodeStream")

    @_writes_itself
    async def PredictJson(self, request, context):
        async with self._rpc("PredictJson", context, request.model, gateway=True):
            with tracing.span("validate"):
                served = self._model(request.model)
                body = await self._body(request, context, "predict")
                job = self._predict_job(served.name, body.sequences)
            vocab = job.model.vocabulary
            estimate = json_limits.estimate_predict_bytes([len(item.tokens) for item in job.items], len(vocab))
            render = lambda i, r: rendering.predict_json_result(i, r, job.items[i].tokens, vocab)  # noqa: E731
            await self._json(job, context, estimate, render, "PredictStream")

    async def LogProbJson(self, request, context):
        async with self._rpc("LogProbJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "log_prob")
            values = await self._log_probs(self._log_prob_job(served.name, body.sequences, body.window), context)
            await _send_provenance(context, served)
            return httpbody_pb2.HttpBody(content_type="application/json", data=rendering.log_prob_json(values))

    async def ScoreJson(self, request, context):
        async with self._rpc("ScoreJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "score")
            scores = await self._scores(served.name, body.method, body.sequences, body.variants, context, body.window)
            await _send_provenance(context, served)
            return httpbody_pb2.HttpBody(content_type="application/json",
                                         data=rendering.score_json(scores, served.provenance))

    @_writes_itself
    async def ScoreStreamJson(self, request, context):
        """ScoreStream as newline-delimited JSON, one line per message as it comes: Envoy's transcoder
        passes each HttpBody on, on a route with an idle timeout instead of a total one."""
        async with self._rpc("ScoreStreamJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "score")
            blocks = self._score_blocks(served.name, body.method, body.sequences, body.variants, context, body.window)
            async with contextlib.aclosing(blocks):
                with HeldResponse(self.memory, per_stream_bytes=0) as held:
                    first = True
                    async for fields in blocks:
                        if first:  # the headers just before the first line: a refusal before it is trailers-only
                            await _send_provenance(context, served)
                            first = False
                        line = rendering.score_stream_json_line(fields)
                        held.take(len(line))
                        await held.send(context, httpbody_pb2.HttpBody(content_type=NDJSON, data=line))
                        held.give_back(len(line))

    async def GetRequestSchema(self, request, context):
        async with self._rpc("GetRequestSchema", context, request.model, gateway=True):
            served = self._model(request.model)
            if request.action not in ACTIONS:
                raise NotFound(f"action {echo(request.action)} does not exist; use " + ", ".join(ACTIONS))
            schema = request_schema(served.name, request.action, self.limits, self.score_limits.max_mutations)
            return httpbody_pb2.HttpBody(content_type="application/json", data=orjson.dumps(schema))

    async def GetOpenApiDocument(self, request, context):
        async with self._rpc("GetOpenApiDocument", context, "", gateway=True):
            return httpbody_pb2.HttpBody(content_type="application/json", data=self.openapi_document)

    async def GetDocsPage(self, request, context):
        async with self._rpc("GetDocsPage", context, "", gateway=True):
            try:
                found = self.docs_page.get(request.file)
            except DocsUnavailable as exc:
                raise NotFound(str(exc)) from None
            if found is None:
                raise NotFound(f"{DOCS_PATH}/{echo(request.file)} does not exist; the docs page is {DOCS_PATH}")
            content_type, data = found
            return httpbody_pb2.HttpBody(content_type=content_type, data=data)

    async def GetPlaygroundPage(self, request, context):
        async with self._rpc("GetPlaygroundPage", context, "", gateway=True):
            found = self.playground_page.get(request.file)
            if found is None:
                raise NotFound(f"{PLAYGROUND_PATH}/{echo(request.file)} does not exist; the playground is {PLAYGROUND_PATH}")
            content_type, data = found
            return httpbody_pb2.HttpBody(content_type=content_type, data=data)

    # ---- streaming ------------------------------------------------------------
    async def _stream(self, job: Job, context, options: pb.StreamOptions, response_type, predict: bool):
        if options.data_type not in pb.DataType.values():
            raise InvalidRequest.of(Problem(
                "stream_options.data_type", None,
                f"unknown value {options.data_type}; allowed: " + ", ".join(pb.DataType.keys()),
            ))
        if 0 != options.max_chunk_bytes < chunks.MIN_CHUNK_BYTES:
            raise InvalidRequest.of(Problem(
                "stream_options.max_chunk_bytes", None,
                f"{options.max_chunk_bytes} is too small; at least {chunks.MIN_CHUNK_BYTES} "
                f"(0 means the default, {chunks.DEFAULT_CHUNK_BYTES})",
            ))
        futures = self._submit(job, context)
        vocab = job.model.vocabulary
        chunk_bytes = chunks.chunk_size(options.max_chunk_bytes)
        with HeldResponse(self.memory) as held:
            # A finished result is held from the moment it finishes until its last chunk is written.
            owed = [0] * len(futures)
            for index, future in enumerate(futures):
                future.add_done_callback(lambda f, i=index: _hold(held, owed, i, f))
            try:
                for index, future in enumerate(futures):
                    result = await future
                    item = job.items[index]
                    header = pb.ItemHeader(sequence_index=index, sequence_length=len(item.tokens))
                    if result.logits is not None:
                        header.vocab_tokens.extend(vocab)
                    if predict:
                        header.sequence_tokens.extend(item.tokens)
                    await held.send(context, response_type(item_header=header))
                    for chunk in rendering.encode_stream_chunks(index, result, options.data_type, chunk_bytes):
                        await held.send(context, response_type(chunk=chunk))
                    held.give_back(owed[index])
                    owed[index] = 0
            finally:
                _release(futures)
                _trace_queue_wait(request_context.current())

    @_writes_itself
    async def EncodeStream(self, request, context):
        async with self._rpc("EncodeStream", context, request.model):
            with tracing.span("validate"):
                job = self._encode_job(request.model, list(request.params.include), list(request.params.repr_layers),
                                       [item.sequence for item in request.items], _window_of(request.params))
            await self._stream(job, context, request.stream_options, pb.EncodeStreamResponse, False)

    @_writes_itself
    async def PredictStream(self, request, context):
        async with self._rpc("PredictStream", context, request.model):
            with tracing.span("validate"):
                job = self._predict_job(request.model, [item.sequence for item in request.items])
            await self._stream(job, context, request.stream_options, pb.PredictStreamResponse, True)

    # ---- models ---------------------------------------------------------------
    async def ListModels(self, request, context):
        async with self._rpc("ListModels", context, ""):
            return pb.ListModelsResponse(models=[self.model_info(name) for name in sorted(self.models)])

    def model_info(self, name: str) -> pb.ModelInfo:
        served = self.models[name]
        m, budget = served.loaded, served.budget
        return pb.ModelInfo(
            name=name, checkpoint=m.source, num_layers=m.num_layers, embed_dim=m.embed_dim,
            attention_heads=m.attention_heads, parameters=m.parameters, random_weights=m.random_weights,
            ready=served.ready, max_items=self.limits.max_items,
            max_sequence_length=self.limits.max_sequence_length, device=served.device_names,
            source_format=_SOURCE_FORMATS[m.source_format], finetuned_from=m.finetuned_from,
            max_batch_tokens=budget.tokens if budget else 0, batch_tokens_source=budget.source if budget else "",
            precision=served.precision,
            max_score_passes=min(self.score_limits.max_passes, served.spec.max_queue_items),
            max_score_mutations=self.score_limits.max_mutations,
            weights_fingerprint=m.weights_fingerprint, server_version=SERVER_VERSION,
            max_windowed_residues=self.limits.max_windowed_residues,
        )


# What the gateway's fleet header may carry (any caller can send it directly: it only ever adds
# names to that caller's own 404, and only names that look like model names, a bounded number).
_FLEET_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_MAX_FLEET_MODELS = 64


def fleet_models(context) -> list[str]:
    """The models of the gateway's other pools (FLEET_MODELS_HEADER), when a gateway sent them."""
    value = dict(context.invocation_metadata() or ()).get(FLEET_MODELS_HEADER, "")
    names = [name.strip() for name in value.split(",")[:_MAX_FLEET_MODELS]]
    return [name for name in names if _FLEET_MODEL_NAME.fullmatch(name)]


_SOURCE_FORMATS = {
    FAIR_ESM: pb.ModelInfo.SOURCE_FORMAT_FAIR_ESM,
    HUGGING_FACE: pb.ModelInfo.SOURCE_FORMAT_HUGGING_FACE,
}


async def _send_provenance(context, served: ServedModel) -> None:
    """A JSON result's provenance as response headers: Envoy's transcoder turns a reply's initial
    metadata into HTTP headers. Sent only once the results are in hand, just before the body, so
    that a failure before it still answers trailers-only, which the gateway maps to its JSON error."""
    await context.send_initial_metadata(served.provenance.metadata())


def _trace_queue_wait(request: RequestContext | None) -> None:
    """The request's `queue wait` span: from its items' arrival to the first batch that ran one."""
    if request is not None and request.first_batch_ns:
        tracing.record("queue wait", request.span, request.submitted_ns, request.first_batch_ns,
                       **{"esm.queue_wait_max_s": request.queue_wait_s or 0.0})


def gateway_timeout_s(context) -> float | None:
    """The time Envoy gives this call (GATEWAY_TIMEOUT_HEADER, in ms: its route timeout, or the per-try
    timeout of a unary route), in seconds; None when absent or not a plain number. A direct caller who
    sends it only shortens its own deadline."""
    value = dict(context.invocation_metadata() or ()).get(GATEWAY_TIMEOUT_HEADER, "")
    if not value.isascii() or not value.isdigit() or len(value) > 10:
        return None
    return int(value) / 1000


async def _render_pieces(context, render, results, held: HeldResponse, size) -> list:
    """render(index, result) of each result off the event loop, one at a time: no piece holds the
    interpreter's lock for long, and rendering stops as soon as the caller is gone."""
    pieces = []
    for index, result in enumerate(results):
        if context.cancelled():
            raise asyncio.CancelledError()
        piece = await asyncio.to_thread(render, index, result)
        held.take(size(piece))
        pieces.append(piece)
    return pieces


def _window_of(params) -> pb.Window | None:
    """A request's params.window, None when not set (an empty Window asks for the defaults)."""
    return params.window if params.HasField("window") else None


def _windowed_output_problems(outputs: frozenset[OutputKind], items: list[ParsedItem]) -> list[Problem]:
    """What windowed mode cannot compute: attention maps, and contact maps past their bound."""
    problems = []
    if OutputKind.ATTENTIONS in outputs:
        problems.append(Problem("params.include", None, "attentions are not available in windowed mode "
                                "(params.window): no pass sees the pairs of two windows; ask for contacts, or send "
                                "items short enough to run whole, without a window"))
    if OutputKind.CONTACTS in outputs:
        for index, item in enumerate(items):
            if len(item.tokens) > windows.MAX_CONTACT_RESIDUES:
                problems.append(Problem(
                    f"items[{index}].sequence", index,
                    f"{len(item.tokens)} residues: contacts in windowed mode are an [L, L] map, at most "
                    f"{windows.MAX_CONTACT_RESIDUES} residues (256 MiB); leave contacts out for this item"))
    return problems


async def _stitched(cover: Cover, futures: list[asyncio.Future], outputs: frozenset[OutputKind]) -> ItemResult:
    """An item's result from its windows' (service.api.windows), stitched off the event loop."""
    results = await asyncio.gather(*futures)
    return await asyncio.to_thread(windows.stitch_result, cover, results, outputs)


def _hold(held: HeldResponse, owed: list[int], index: int, future: asyncio.Future) -> None:
    """A stream's item finished: its result is held until sent."""
    if not future.cancelled() and future.exception() is None:
        owed[index] = result_bytes(future.result())
        held.take(owed[index])


def _release(futures: list[asyncio.Future]) -> None:
    """Cancel what is still queued (the scheduler drops it) and consume failures seen."""
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()  # marks it retrieved, so asyncio logs nothing at collection
        future.cancel()

