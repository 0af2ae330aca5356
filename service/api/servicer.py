"""gRPC handlers: validate, queue work items, await them, render the answer.

Nothing here touches a model; results come back from the scheduler's futures.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

import grpc
import orjson
from google.api import httpbody_pb2

from esm2_wire import chunks
from esm2_wire.item_result import ItemResult
from esm2_wire.output_kinds import OutputKind
from esm2_wire.proto import pb, pb_grpc
from esm2_wire.vocabulary import Limits
from service import errors, metrics
from service.api import json_limits, rendering
from service.models.checkpoints import FAIR_ESM, HUGGING_FACE, LoadedModel
from service.errors import FailedPrecondition, InvalidRequest, NotFound, echo, join_problems
from service.api.json_body import CONTENT_ENCODING_METADATA, BodyParser, gateway_error_metadata
from service.models.forward import amino_acid_columns
from service.engine.router import ModelRouter
from service.engine.inputs import ModelInput
from service.api.request_schema import request_schema
from service.api.validation import ParsedItem, parse_items, parse_options

log = logging.getLogger(__name__)


@dataclass
class Job:
    """A validated request: which model, which items, what to compute."""

    model: LoadedModel
    items: list[ParsedItem]
    outputs: frozenset[OutputKind]
    layers: tuple[int, ...]


class Esm2Servicer(pb_grpc.Esm2ServiceServicer):
    def __init__(
        self, models: dict[str, LoadedModel], router: ModelRouter, limits: Limits, devices: dict[str, str],
        max_json_response_bytes: int = json_limits.DEFAULT_MAX_JSON_RESPONSE_MB << 20,
        max_request_bytes: int = json_limits.DEFAULT_MAX_REQUEST_BYTES,
        openapi_document: bytes = b"{}",
        batch_budgets: dict | None = None, precisions: dict[str, str] | None = None,
    ):
        self.batch_budgets = batch_budgets or {}  # model -> batch_budget.BudgetChoice
        self.precisions = precisions or {}  # model -> "fp32", "bf16" or "fp16"
        self.max_json_response_bytes = max_json_response_bytes
        self.bodies = BodyParser(limits, max_request_bytes)
        self.openapi_document = openapi_document
        self.models = models
        self.router = router  # one scheduler per model
        self.limits = limits
        self.devices = devices  # model -> device it runs on
        self.ready: set[str] = set()
        self._vocab = {
            name: [m.alphabet.all_toks[i] for i in amino_acid_columns(m.alphabet)] for name, m in models.items()
        }

    # ---- request preparation -------------------------------------------------
    def _model(self, name: str) -> LoadedModel:
        loaded = self.models.get(name)
        if loaded is None:
            raise NotFound(
                f"model {echo(name)} is not served here; served models: {', '.join(sorted(self.models))}",
            )
        return loaded

    def _encode_job(self, model: str, include: list[str], repr_layers: list[int], sequences: list[str]) -> Job:
        loaded = self._model(model)
        errors = []  # report every problem at once: items first, then params
        try:
            parsed = parse_items(sequences, predict=False, limits=self.limits)
        except InvalidRequest as exc:
            errors.append(str(exc))
        try:
            options = parse_options(include, repr_layers, loaded.num_layers, model)
        except InvalidRequest as exc:
            errors.append(str(exc))
        if errors:
            raise InvalidRequest(join_problems(errors))
        if OutputKind.CONTACTS in options.outputs and not loaded.has_contact_regression:
            raise FailedPrecondition(
                f"params.include: model {model} has no contact regression weights "
                f"({loaded.contacts_unavailable}), so contacts are unavailable",
            )
        if OutputKind.LOGITS in options.outputs:
            self._require_lm_head(loaded, "params.include")
        return Job(loaded, parsed, options.outputs, options.layers)

    @staticmethod
    def _require_lm_head(loaded: LoadedModel, field: str) -> None:
        if not loaded.has_lm_head:
            raise FailedPrecondition(
                f"{field}: model {loaded.name} has no masked-LM head ({loaded.source} is not an EsmForMaskedLM "
                "checkpoint), so logits and predictions are unavailable",
            )

    def _predict_job(self, model: str, sequences: list[str]) -> Job:
        loaded = self._model(model)
        self._require_lm_head(loaded, "model")
        parsed = parse_items(sequences, predict=True, limits=self.limits)
        return Job(loaded, parsed, frozenset({OutputKind.LOGITS}), ())

    def _submit(self, job: Job, context) -> list[asyncio.Future]:
        remaining = context.time_remaining()
        inputs = [
            ModelInput(job.model.name, job.model.tokenize(item.tokens), job.outputs, job.layers, job.model.num_layers)
            for item in job.items
        ]
        return self.router.submit(inputs, None if remaining is None else time.monotonic() + remaining)

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
        BioLM's error body for the gateway (json_body.gateway_error_metadata).
        """
        code, message, trailers, http_status = grpc.StatusCode.OK, "", (), 200
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
            code, message, trailers = errors.status(exc, method)
            http_status = errors.http_status(exc, code)
        metrics.REQUESTS.labels(method, code.name).inc()
        if model in self.models:  # a label per served model only: callers cannot grow the label set
            metrics.REQUEST_SECONDS.labels(model, method).observe(time.monotonic() - started)
        if code is not grpc.StatusCode.OK:
            if gateway:
                trailers += gateway_error_metadata(http_status, code.name, message)
            await context.abort(code, message, trailers)

    # ---- unary ---------------------------------------------------------------
    async def Encode(self, request, context):
        async with self._rpc("Encode", context, request.model):
            job = self._encode_job(request.model, list(request.params.include), list(request.params.repr_layers),
                                   [item.sequence for item in request.items])
            results = await self._results(job, context)
            vocab = self._vocab[job.model.name]
            return await asyncio.to_thread(
                lambda: pb.EncodeResponse(
                    results=[rendering.encode_result(i, r, vocab) for i, r in enumerate(results)]
                )
            )

    async def Predict(self, request, context):
        async with self._rpc("Predict", context, request.model):
            job = self._predict_job(request.model, [item.sequence for item in request.items])
            results = await self._results(job, context)
            vocab = self._vocab[job.model.name]
            return await asyncio.to_thread(
                lambda: pb.PredictResponse(
                    results=[
                        rendering.predict_result(i, r, job.items[i].tokens, vocab) for i, r in enumerate(results)
                    ]
                )
            )

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
            loaded = self._model(request.model)
            body = await self._body(request, context, "encode")
            job = self._encode_job(loaded.name, body.include, [int(v) for v in body.repr_layers], body.sequences)
            vocab = self._vocab[job.model.name]
            estimate = json_limits.estimate_encode_bytes(
                [len(item.tokens) for item in job.items], job.outputs, len(job.layers), job.model.embed_dim, len(vocab)
            )
            render = lambda i, r: rendering.encode_json_result(i, r, vocab)  # noqa: E731
            return await self._json(job, context, estimate, render, "EncodeStream")

    async def PredictJson(self, request, context):
        async with self._rpc("PredictJson", context, request.model, gateway=True):
            loaded = self._model(request.model)
            body = await self._body(request, context, "predict")
            job = self._predict_job(loaded.name, body.sequences)
            vocab = self._vocab[job.model.name]
            estimate = json_limits.estimate_predict_bytes([len(item.tokens) for item in job.items], len(vocab))
            render = lambda i, r: rendering.predict_json_result(i, r, job.items[i].tokens, vocab)  # noqa: E731
            return await self._json(job, context, estimate, render, "PredictStream")

    async def GetRequestSchema(self, request, context):
        async with self._rpc("GetRequestSchema", context, request.model, gateway=True):
            loaded = self._model(request.model)
            if request.action not in ("encode", "predict"):
                raise NotFound(f"action {echo(request.action)} does not exist; use encode or predict")
            schema = request_schema(loaded.name, request.action, self.limits)
            return httpbody_pb2.HttpBody(content_type="application/json", data=orjson.dumps(schema))

    async def GetOpenApiDocument(self, request, context):
        return httpbody_pb2.HttpBody(content_type="application/json", data=self.openapi_document)

    # ---- streaming ------------------------------------------------------------
    async def _stream(self, job: Job, context, options: pb.StreamOptions, response_type, predict: bool):
        if options.data_type not in pb.DataType.values():
            raise InvalidRequest(
                f"stream_options.data_type: unknown value {options.data_type}; allowed: "
                + ", ".join(pb.DataType.keys())
            )
        futures = self._submit(job, context)
        vocab = self._vocab[job.model.name]
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
        m, budget = self.models[name], self.batch_budgets.get(name)
        return pb.ModelInfo(
            name=name, checkpoint=m.source, num_layers=m.num_layers, embed_dim=m.embed_dim,
            attention_heads=m.attention_heads, parameters=m.parameters, random_weights=m.random_weights,
            ready=name in self.ready, max_items=self.limits.max_items,
            max_sequence_length=self.limits.max_sequence_length, device=self.devices[name],
            source_format=_SOURCE_FORMATS[m.source_format], finetuned_from=m.finetuned_from,
            max_batch_tokens=budget.tokens if budget else 0, batch_tokens_source=budget.source if budget else "",
            precision=self.precisions.get(name, "fp32"),
        )


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

