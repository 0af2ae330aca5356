"""gRPC handlers: validate, queue work items, await them, render the answer.

Nothing here touches a model; results come back from the scheduler's futures.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import re
import time
from dataclasses import dataclass

import grpc
import orjson
from google.api import httpbody_pb2

from esm2_wire import chunks
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import FLEET_MODELS_HEADER, pb, pb_grpc
from esm2_wire.vocabulary import Limits
from service import errors, metrics
from service.api import json_limits, rendering, scoring
from service.models.checkpoints import FAIR_ESM, HUGGING_FACE
from service.models.served import ServedModel
from service.errors import FailedPrecondition, InvalidRequest, NotFound, Problem, UnknownModel, echo
from service.api.json_body import CONTENT_ENCODING_METADATA, BodyParser, failure
from service.engine.router import ModelRouter
from service.engine.inputs import ModelInput
from service.api.request_schema import ACTIONS, request_schema
from service.api.scoring import ItemScores, PassRows, ScoreLimits, ScorePlan
from service.api.validation import ParsedItem, parse_items, parse_options

log = logging.getLogger(__name__)
# Passes of log_prob and Score: logits only, so that they batch and cache with predict's.
LOGITS_ONLY = frozenset({OutputKind.LOGITS})


@dataclass
class Job:
    """A validated request: which model, which items, what to compute."""

    model: ServedModel
    items: list[ParsedItem]
    outputs: frozenset[OutputKind]
    layers: tuple[int, ...]


class Esm2Servicer(pb_grpc.Esm2ServiceServicer):
    def __init__(
        self, models: dict[str, ServedModel], router: ModelRouter, limits: Limits,
        max_json_response_bytes: int = json_limits.DEFAULT_MAX_JSON_RESPONSE_MB << 20,
        max_request_bytes: int = json_limits.DEFAULT_MAX_REQUEST_BYTES,
        openapi_document: bytes = b"{}",
        score_limits: ScoreLimits = ScoreLimits(),
    ):
        self.score_limits = score_limits
        self.max_json_response_bytes = max_json_response_bytes
        self.bodies = BodyParser(limits, max_request_bytes, score_limits)
        self.openapi_document = openapi_document
        self.models = models
        self.router = router  # one scheduler per model
        self.limits = limits

    # ---- request preparation -------------------------------------------------
    def _model(self, name: str) -> ServedModel:
        served = self.models.get(name)
        if served is None:
            raise UnknownModel(name, self.models)
        return served

    def _encode_job(self, model: str, include: list[str], repr_layers: list[int], sequences: list[str]) -> Job:
        served = self._model(model)
        loaded = served.loaded
        problems: list[Problem] = []  # report every problem at once: items first, then params
        try:
            parsed = parse_items(sequences, predict=False, limits=self.limits)
        except InvalidRequest as exc:
            problems += exc.problems
        try:
            options = parse_options(include, repr_layers, loaded.num_layers, model)
        except InvalidRequest as exc:
            problems += exc.problems
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
        return Job(served, parsed, options.outputs, options.layers)

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

    def _log_prob_job(self, model: str, sequences: list[str]) -> Job:
        served = self._model(model)
        self._require_lm_head(served, "model")
        parsed = parse_items(sequences, predict=False, limits=self.limits)
        return Job(served, parsed, LOGITS_ONLY, ())

    def _score_plan(self, model: str, method: str, sequences: list[str],
                    variants: list[list[str]]) -> tuple[ServedModel, ScorePlan]:
        served = self._model(model)
        self._require_lm_head(served, "model")
        problems: list[Problem] = []  # every problem at once: items first, then params
        items = []
        try:
            items = scoring.parse_score_items(sequences, variants, self.limits, self.score_limits)
        except InvalidRequest as exc:
            problems += exc.problems
        try:
            method = scoring.parse_method(method)
        except InvalidRequest as exc:
            problems += exc.problems
        if problems:
            raise InvalidRequest.of(*problems)
        passes = scoring.passes_needed(method, items)
        # All of a request's passes are queued at once, so its model's queue bound caps them too.
        cap, named = min(
            (self.score_limits.max_passes, "--max-score-passes"), (served.spec.max_queue_items, "--max-queue-items"))
        if passes > cap:
            raise InvalidRequest.of(Problem(
                "items", None, f"the request needs {passes} forward passes ({method}); at most {cap} are allowed "
                               f"({named}): split the variants or sequences over several requests"))
        return served, ScorePlan.of(method, items)

    @staticmethod
    def _deadline(context) -> float | None:
        remaining = context.time_remaining()
        return None if remaining is None else time.monotonic() + remaining

    def _submit(self, job: Job, context) -> list[asyncio.Future]:
        tokenize = job.model.loaded.tokenize
        inputs = [ModelInput(job.model.name, tokenize(item.tokens), job.outputs, job.layers) for item in job.items]
        return self.router.submit(inputs, self._deadline(context))

    async def _log_probs(self, job: Job, context) -> list[float]:
        results = await self._results(job, context)
        columns = {token: i for i, token in enumerate(job.model.vocabulary)}
        return [scoring.sequence_log_prob(item.tokens, result.logits, columns)
                for item, result in zip(job.items, results)]

    async def _scores(self, model: str, method: str, sequences: list[str], variants: list[list[str]],
                      context) -> list[ItemScores]:
        """Plan the passes and tokenize them off the event loop (a pll request may be 2,048 passes of
        2,048 tokens), queue them all at once, keep only the rows the scores read."""
        def prepare() -> tuple[ServedModel, ScorePlan, list[ModelInput]]:
            served, plan = self._score_plan(model, method, sequences, variants)
            tokenize = served.loaded.tokenize
            return served, plan, [ModelInput(served.name, tokenize(tokens), LOGITS_ONLY, ()) for tokens in plan.passes]
        served, plan, inputs = await asyncio.to_thread(prepare)
        # Each pass's [L, 20] logits are let go once its rows are read: up to --max-score-passes of them.
        waiting = collections.deque(self.router.submit(inputs, self._deadline(context)) if inputs else ())
        rows = PassRows(plan)
        try:
            for index in range(len(waiting)):
                rows.add(index, (await waiting[0]).logits)
                waiting.popleft()
        finally:
            _release(list(waiting))
        columns = {token: i for i, token in enumerate(served.vocabulary)}
        return await asyncio.to_thread(scoring.item_scores, rows, columns)

    async def _results(self, job: Job, context) -> list[ItemResult]:
        futures = self._submit(job, context)
        try:
            return await asyncio.gather(*futures)
        finally:
            _release(futures)

    @contextlib.asynccontextmanager
    async def _rpc(self, method: str, context, model: str, gateway: bool = False):
        """Map failures to gRPC statuses, count every RPC, time those of served models.

        gateway: the RPC serves the JSON API, so failures also carry the HTTP status and
        BioLM's error body for the gateway (json_body.failure).
        """
        code, message, trailers = grpc.StatusCode.OK, "", ()
        started = time.monotonic()
        try:
            yield
        except asyncio.CancelledError:
            metrics.REQUESTS.labels(method, "CANCELLED").inc()
            raise
        except grpc.aio.AbortError:
            raise
        except Exception as exc:
            if not isinstance(exc, errors.ServiceError):  # a bug, not the caller's fault: log it, say only where
                log.exception("%s failed", method)
            if isinstance(exc, UnknownModel):  # behind a gateway: name the models of its other pools too
                exc = exc.also_served(fleet_models(context))
            code, message, trailers = failure(exc, method, gateway)
        metrics.REQUESTS.labels(method, code.name).inc()
        if model in self.models:  # a label per served model only: callers cannot grow the label set
            metrics.REQUEST_SECONDS.labels(model, method).observe(time.monotonic() - started)
        if code is not grpc.StatusCode.OK:
            await context.abort(code, message, trailers)

    # ---- unary ---------------------------------------------------------------
    async def Encode(self, request, context):
        async with self._rpc("Encode", context, request.model):
            job = self._encode_job(request.model, list(request.params.include), list(request.params.repr_layers),
                                   [item.sequence for item in request.items])
            results = await self._results(job, context)
            vocab = job.model.vocabulary
            return await asyncio.to_thread(
                lambda: pb.EncodeResponse(
                    results=[rendering.encode_result(i, r, vocab) for i, r in enumerate(results)]
                )
            )

    async def Predict(self, request, context):
        async with self._rpc("Predict", context, request.model):
            job = self._predict_job(request.model, [item.sequence for item in request.items])
            results = await self._results(job, context)
            vocab = job.model.vocabulary
            return await asyncio.to_thread(
                lambda: pb.PredictResponse(
                    results=[
                        rendering.predict_result(i, r, job.items[i].tokens, vocab) for i, r in enumerate(results)
                    ]
                )
            )

    async def LogProb(self, request, context):
        async with self._rpc("LogProb", context, request.model):
            job = self._log_prob_job(request.model, [item.sequence for item in request.items])
            values = await self._log_probs(job, context)
            return pb.LogProbResponse(
                results=[pb.LogProbResult(sequence_index=i, log_prob=v) for i, v in enumerate(values)])

    async def Score(self, request, context):
        async with self._rpc("Score", context, request.model):
            scores = await self._scores(request.model, request.params.method,
                                        [item.sequence for item in request.items],
                                        [list(item.variants) for item in request.items], context)
            return pb.ScoreResponse(results=[rendering.score_result(i, s) for i, s in enumerate(scores)])

    # ---- JSON (through the Envoy gateway) --------------------------------------
    async def _json(self, job: Job, context, estimate: int, render, stream_rpc: str) -> httpbody_pb2.HttpBody:
        """Refuse before queueing what Envoy could not buffer whole; render off the loop."""
        limit = self.max_json_response_bytes
        if estimate > limit:
            raise InvalidRequest(json_limits.too_large(estimate, limit, estimated=True, stream_rpc=stream_rpc))
        results = await self._results(job, context)
        body = await asyncio.to_thread(lambda: rendering.json_body([render(i, r) for i, r in enumerate(results)]))
        if len(body) > limit:  # the estimate was low; still never hand Envoy more than it accepts
            raise InvalidRequest(json_limits.too_large(len(body), limit, estimated=False, stream_rpc=stream_rpc))
        return httpbody_pb2.HttpBody(content_type="application/json", data=body)

    async def _body(self, request, context, action: str):
        """The parsed body, read off the event loop (up to 4 MiB of JSON)."""
        encoding = dict(context.invocation_metadata() or ()).get(CONTENT_ENCODING_METADATA, "")
        return await asyncio.to_thread(self.bodies.parse, request.body.data, encoding, action)

    async def EncodeJson(self, request, context):
        async with self._rpc("EncodeJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "encode")
            job = self._encode_job(served.name, body.include, [int(v) for v in body.repr_layers], body.sequences)
            vocab = job.model.vocabulary
            estimate = json_limits.estimate_encode_bytes(
                [len(item.tokens) for item in job.items], job.outputs, len(job.layers), job.model.loaded.embed_dim,
                len(vocab),
            )
            render = lambda i, r: rendering.encode_json_result(i, r, vocab)  # noqa: E731
            return await self._json(job, context, estimate, render, "EncodeStream")

    async def PredictJson(self, request, context):
        async with self._rpc("PredictJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "predict")
            job = self._predict_job(served.name, body.sequences)
            vocab = job.model.vocabulary
            estimate = json_limits.estimate_predict_bytes([len(item.tokens) for item in job.items], len(vocab))
            render = lambda i, r: rendering.predict_json_result(i, r, job.items[i].tokens, vocab)  # noqa: E731
            return await self._json(job, context, estimate, render, "PredictStream")

    async def LogProbJson(self, request, context):
        async with self._rpc("LogProbJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "log_prob")
            values = await self._log_probs(self._log_prob_job(served.name, body.sequences), context)
            return httpbody_pb2.HttpBody(content_type="application/json", data=rendering.log_prob_json(values))

    async def ScoreJson(self, request, context):
        async with self._rpc("ScoreJson", context, request.model, gateway=True):
            served = self._model(request.model)
            body = await self._body(request, context, "score")
            scores = await self._scores(served.name, body.method, body.sequences, body.variants, context)
            return httpbody_pb2.HttpBody(content_type="application/json", data=rendering.score_json(scores))

    async def GetRequestSchema(self, request, context):
        async with self._rpc("GetRequestSchema", context, request.model, gateway=True):
            served = self._model(request.model)
            if request.action not in ACTIONS:
                raise NotFound(f"action {echo(request.action)} does not exist; use " + ", ".join(ACTIONS))
            schema = request_schema(served.name, request.action, self.limits, self.score_limits.max_mutations)
            return httpbody_pb2.HttpBody(content_type="application/json", data=orjson.dumps(schema))

    async def GetOpenApiDocument(self, request, context):
        return httpbody_pb2.HttpBody(content_type="application/json", data=self.openapi_document)

    # ---- streaming ------------------------------------------------------------
    async def _stream(self, job: Job, context, options: pb.StreamOptions, response_type, predict: bool):
        if options.data_type not in pb.DataType.values():
            raise InvalidRequest.of(Problem(
                "stream_options.data_type", None,
                f"unknown value {options.data_type}; allowed: " + ", ".join(pb.DataType.keys()),
            ))
        futures = self._submit(job, context)
        vocab = job.model.vocabulary
        chunk_bytes = chunks.chunk_size(options.max_chunk_bytes)
        try:
            for index, future in enumerate(futures):
                result = await future
                item = job.items[index]
                header = pb.ItemHeader(sequence_index=index, sequence_length=len(item.tokens))
                if result.logits is not None:
                    header.vocab_tokens.extend(vocab)
                if predict:
                    header.sequence_tokens.extend(item.tokens)
                yield response_type(item_header=header)
                for chunk in rendering.encode_stream_chunks(index, result, options.data_type, chunk_bytes):
                    yield response_type(chunk=chunk)
        finally:
            _release(futures)

    async def EncodeStream(self, request, context):
        async with self._rpc("EncodeStream", context, request.model):
            job = self._encode_job(request.model, list(request.params.include), list(request.params.repr_layers),
                                   [item.sequence for item in request.items])
            async for message in self._stream(job, context, request.stream_options, pb.EncodeStreamResponse, False):
                yield message

    async def PredictStream(self, request, context):
        async with self._rpc("PredictStream", context, request.model):
            job = self._predict_job(request.model, [item.sequence for item in request.items])
            async for message in self._stream(job, context, request.stream_options, pb.PredictStreamResponse, True):
                yield message

    # ---- models ---------------------------------------------------------------
    async def ListModels(self, request, context):
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


def _release(futures: list[asyncio.Future]) -> None:
    """Cancel what is still queued (the scheduler drops it) and consume failures seen."""
    for future in futures:
        if future.done() and not future.cancelled():
            future.exception()  # marks it retrieved, so asyncio logs nothing at collection
        future.cancel()

