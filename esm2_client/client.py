"""gRPC clients for the ESM-2 service: `Esm2Client` (threads) and `AsyncEsm2Client` (asyncio).

Both split any number of sequences into requests of at most the server's `max_items`,
keep up to `max_in_flight` requests running (starting the next one as any finishes),
retry UNAVAILABLE, and RESOURCE_EXHAUSTED when the server asks for a retry (queue full),
with exponential backoff and jitter, stop at the caller's deadline, return results in
input order, and cancel the requests still running when the caller stops early. Every request goes through the streaming RPCs: the server packs chunks
~17x faster than it fills repeated-float messages, no message nears gRPC's 4 MiB limit,
and mean-only requests cost the same either way (see docs/client.md).
"""

from __future__ import annotations

import asyncio
import functools
import random
import re
import threading
import time
import warnings
from collections import deque
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from esm2_client.results import ScoreResult
from esm2_client.streams import ItemOutputs, StreamAssembler
from esm2_wire.proto import MODEL_HEADER, pb, pb_grpc
from esm2_wire.provenance import Provenance

DEFAULT_TARGET = "localhost:50051"
# Finished requests held while an earlier one still runs, per max_in_flight slot: bounds
# memory when one request is slow, at the cost of fewer running behind it.
HELD_PER_SLOT = 2
CHANNEL_OPTIONS = (
    ("grpc.max_receive_message_length", 64 << 20),
    # gRPC's own reconnect backoff grows to 2 minutes; keep it short so that a retry
    # after a server restart finds the channel reconnected.
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", 200),
    ("grpc.max_reconnect_backoff_ms", 2000),
)
_ITEM_FIELD = re.compile(r"items\[(\d+)\]")


REQUEST_ID_HEADER = "x-request-id"
# The release that drops the old argument order, (sequences, model).
OLD_ORDER_REMOVED_IN = "0.3.0"


def model_first(method):
    """Every call takes (model, ...). The order of 0.1, (sequences, model), still works, with a
    DeprecationWarning, until OLD_ORDER_REMOVED_IN (CHANGELOG.md): a first argument that is not a
    string is the old order's sequences."""
    @functools.wraps(method)
    def call(self, *args, **kwargs):
        if args and not isinstance(args[0], str):
            if len(args) >= 2 and isinstance(args[1], str):
                args = (args[1], args[0], *args[2:])
            elif "model" in kwargs:
                args = (kwargs.pop("model"), *args)
            else:
                raise TypeError(f"{method.__name__}(model, sequences, ...): the model's name comes first")
            warnings.warn(f"{method.__name__}(sequences, model) is deprecated: call {method.__name__}(model, sequences)"
                          f"; the old order is removed in {OLD_ORDER_REMOVED_IN}", DeprecationWarning, stacklevel=2)
        elif len(args) >= 2 and isinstance(args[1], str):
            raise TypeError(f"{method.__name__}(model, sequences, ...): sequences is a list of sequences, "
                            f"not one string: pass [{args[1][:20]!r}]")
        return method(self, *args, **kwargs)
    return call


class Esm2Error(Exception):
    """A call that failed for good; `code` is the gRPC status (None for client-side errors);
    `request_id` is the server's (or gateway's) id of the failed call, when it answered: quote it
    to whoever runs the service, it names the call in their logs and traces."""

    def __init__(self, message: str, code: grpc.StatusCode | None = None, request_id: str | None = None):
        super().__init__(message)
        self.code = code
        self.request_id = request_id


def _request_id(exc: grpc.RpcError) -> str | None:
    """The x-request-id the server (trailers) or Envoy (headers of a trailers-only answer) sent."""
    for metadata in (exc.trailing_metadata(), exc.initial_metadata()):
        for key, value in metadata or ():
            if key == REQUEST_ID_HEADER and isinstance(value, str):
                return value
    return None


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 7
    initial_backoff: float = 0.25
    max_backoff: float = 8.0
    multiplier: float = 2.0

    def pause(self, retry: int) -> float:
        """Seconds before retry number `retry` (0-based): exponential, with 'equal jitter'."""
        cap = min(self.max_backoff, self.initial_backoff * self.multiplier**retry)
        return random.uniform(cap / 2, cap)


class _Deadline:
    def __init__(self, timeout: float | None):
        self.end = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.end is None else max(0.0, self.end - time.monotonic())

    def allows(self, pause: float) -> bool:
        return self.end is None or time.monotonic() + pause < self.end


def _retryable(exc: grpc.RpcError) -> bool:
    """UNAVAILABLE always. RESOURCE_EXHAUSTED only with the server's `retry-after` (its queue
    is full); without it (one sequence does not fit in device memory) a retry fails the same way."""
    code = exc.code()
    if code is grpc.StatusCode.RESOURCE_EXHAUSTED:
        return any(key == "retry-after" for key, _ in exc.trailing_metadata() or ())
    return code is grpc.StatusCode.UNAVAILABLE


def _refill(queued: deque, batches: Iterator[tuple[int, int]], max_in_flight: int, submit) -> None:
    """Start requests (futures or tasks, appended in input order) while fewer than
    max_in_flight run and fewer than max_in_flight * (1 + HELD_PER_SLOT) wait to be yielded."""
    while len(queued) < max_in_flight * (1 + HELD_PER_SLOT) and sum(not f.done() for f in queued) < max_in_flight:
        following = next(batches, None)
        if following is None:
            return
        queued.append(submit(*following))


def _batches(count: int, size: int) -> list[tuple[int, int]]:
    return [(start, min(start + size, count)) for start in range(0, count, max(1, size))]


def _failure(exc: grpc.RpcError, target: str, start: int) -> Esm2Error:
    """One readable line; item numbers in the server's message become input positions."""
    code, details = exc.code(), exc.details() or ""
    details = _ITEM_FIELD.sub(lambda m: f"sequences[{start + int(m.group(1))}]", details)
    request_id = _request_id(exc)
    if code is grpc.StatusCode.UNAVAILABLE:
        return Esm2Error(f"server {target} is unavailable ({details})", code, request_id)
    if code is grpc.StatusCode.DEADLINE_EXCEEDED:
        return Esm2Error(f"deadline exceeded waiting for {target}", code, request_id)
    return Esm2Error(f"{code.name}: {details}", code, request_id)


WindowArg = int | tuple[int, int] | None  # params.window: a length, or (length, stride); 0 means the default


def _window(window) -> pb.Window | None:
    """params.window from `window=`: None (not windowed), a length, or (length, stride); 0: the server's default."""
    if window is None:
        return None
    length, stride = (window, 0) if isinstance(window, int) else window
    return pb.Window(length=length, stride=stride)


def _encode_request(model, sequences, include, repr_layers, data_type, window=None) -> pb.EncodeStreamRequest:
    return pb.EncodeStreamRequest(
        model=model,
        params=pb.EncodeParams(include=list(include), repr_layers=list(repr_layers), window=_window(window)),
        items=[pb.SequenceItem(sequence=s) for s in sequences],
        stream_options=pb.StreamOptions(data_type=data_type),
    )


def _predict_request(model, sequences, data_type) -> pb.PredictStreamRequest:
    return pb.PredictStreamRequest(
        model=model, items=[pb.SequenceItem(sequence=s) for s in sequences],
        stream_options=pb.StreamOptions(data_type=data_type),
    )


def _log_prob_request(model, sequences, window=None) -> pb.LogProbRequest:
    return pb.LogProbRequest(model=model, items=[pb.SequenceItem(sequence=s) for s in sequences],
                             params=pb.LogProbParams(window=_window(window)))


def _score_request(model, items, method, request_type=pb.ScoreRequest, window=None):
    return request_type(model=model, params=pb.ScoreParams(method=method, window=_window(window)),
                        items=[pb.ScoreItem(sequence=s, variants=list(v)) for s, v in items])


class _StreamedScores:
    """ScoreStream's messages put together into Score's results: each variant's score at its index."""

    def __init__(self, items):
        self.results = [pb.ScoreResult(sequence_index=i, scores=[0.0] * len(v)) for i, (_, v) in enumerate(items)]
        self.plls = [[0.0] * len(v) for _, v in items]

    def add(self, message: pb.ScoreStreamResponse) -> None:
        result = self.results[message.sequence_index]
        for offset, number in enumerate(message.variant_indexes):
            result.scores[number] = message.scores[offset]
            if message.variant_pseudo_log_likelihoods:
                self.plls[message.sequence_index][number] = message.variant_pseudo_log_likelihoods[offset]
        if message.HasField("pseudo_log_likelihood"):
            result.pseudo_log_likelihood = message.pseudo_log_likelihood
            result.scored_positions = message.scored_positions

    def done(self, provenance: Provenance | None) -> list[ScoreResult]:
        for result, plls in zip(self.results, self.plls):
            if result.HasField("pseudo_log_likelihood"):
                result.variant_pseudo_log_likelihoods.extend(plls)
        return [ScoreResult.of_proto(result, provenance) for result in self.results]


class _Base:
    def __init__(self, target, api_key, max_in_flight, retry, timeout):
        self.target = target
        self.max_in_flight = max(1, max_in_flight)
        self.retry = retry
        self.timeout = timeout
        self._metadata = (("authorization", f"Token {api_key}"),) if api_key else ()
        self._models: dict[str, pb.ModelInfo] = {}

    def _headers(self, model: str | None, auth: bool = True) -> tuple[tuple[str, str], ...]:
        """Metadata of a call about `model`: a gateway in front of a fleet routes by its header."""
        base = self._metadata if auth else ()
        return (*base, (MODEL_HEADER, model)) if model else base

    def _pick(self, models: Sequence[pb.ModelInfo], name: str) -> pb.ModelInfo:
        listed = {m.name: m for m in models}
        self._models.update(listed)  # behind a fleet gateway, each pool lists its own models
        if name not in listed:
            served = ", ".join(sorted(listed)) or "none"
            raise Esm2Error(f"model {name!r} is not served by {self.target}; served models: {served}",
                            grpc.StatusCode.NOT_FOUND)
        return self._models[name]


class Esm2Client(_Base):
    """Blocking client; requests run on a pool of `max_in_flight` threads.

        with Esm2Client("localhost:50051") as client:
            outputs = client.encode("esm2-8m", ["MKTAYIAK", "MLK"], include=["mean", "per_token"])
            outputs[0].mean[6]  # float32 [embed_dim]
    """

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, max_in_flight: int = 4,
                 retry: RetryPolicy = RetryPolicy(), timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        super().__init__(target, api_key, max_in_flight, retry, timeout)
        if credentials is None:
            self._channel = grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.Esm2ServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        self._channel.close()

    def _call(self, attempt, deadline: _Deadline, start: int = 0, stop: threading.Event | None = None):
        """attempt(timeout) with retries; raises Esm2Error. Setting `stop` ends the retries."""
        retry = 0
        while True:
            try:
                return attempt(deadline.remaining())
            except grpc.RpcError as exc:
                if not _retryable(exc) or retry + 1 >= self.retry.max_attempts:
                    raise _failure(exc, self.target, start) from None
                pause = self.retry.pause(retry)
                if not deadline.allows(pause):
                    raise _failure(exc, self.target, start) from None
                if stop is None:
                    time.sleep(pause)
                elif stop.wait(pause):
                    raise Esm2Error("cancelled", grpc.StatusCode.CANCELLED) from None
                retry += 1

    # ---- models and health ------------------------------------------------
    def list_models(self, timeout: float | None = None, model: str | None = None) -> list[pb.ModelInfo]:
        """Models served; through a fleet gateway, those of `model`'s pool (or the default pool)."""
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        metadata = self._headers(model, auth=False)
        response = self._call(
            lambda t: self._stub.ListModels(pb.ListModelsRequest(), timeout=t, metadata=metadata), deadline)
        return list(response.models)

    def model_info(self, model: str, timeout: float | None = None) -> pb.ModelInfo:
        return self._models.get(model) or self._pick(self.list_models(timeout, model), model)

    def provenance(self, model: str, timeout: float | None = None) -> Provenance:
        """Where `model`'s results come from: its weights fingerprint, random_weights, precision and
        the server's version (every result's trailing metadata carries the same)."""
        return Provenance.of_model_info(self.model_info(model, timeout))

    def health(self, service: str = "", timeout: float | None = 10) -> str:
        """The standard gRPC health status of `service` ("" = the whole server), e.g. "SERVING"."""
        request = health_pb2.HealthCheckRequest(service=service)
        metadata = self._headers(service, auth=False)  # a model's name routes to its pool
        response = self._call(lambda t: self._health.Check(request, timeout=t, metadata=metadata), _Deadline(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    # ---- encode and predict ---------------------------------------------------
    @model_first
    def encode(self, model: str, sequences: Iterable[str], include: Sequence[str] = ("mean",),
               repr_layers: Sequence[int] = (-1,), *, timeout: float | None = None,
               data_type: int = pb.DATA_TYPE_FLOAT32, window: WindowArg = None) -> list[ItemOutputs]:
        """Outputs of every sequence, in input order. `timeout` bounds the whole call. `window`
        (a length, or (length, stride); 0: the default) asks for windowed mode (docs/long-proteins.md)."""
        return [out for _, out in self.encode_iter(model, sequences, include, repr_layers,
                                                   timeout=timeout, data_type=data_type, window=window)]

    @model_first
    def encode_iter(self, model: str, sequences: Iterable[str], include: Sequence[str] = ("mean",),
                    repr_layers: Sequence[int] = (-1,), *, timeout: float | None = None,
                    data_type: int = pb.DATA_TYPE_FLOAT32, window: WindowArg = None) -> Iterator[tuple[int, ItemOutputs]]:
        """(input index, outputs) in input order: each request's results once it and all
        earlier requests have finished. Leaving the loop early cancels the rest."""
        def request(batch):
            return _encode_request(model, batch, include, repr_layers, data_type, window)
        yield from self._run(list(sequences), model, request, self._stub.EncodeStream, timeout)

    @model_first
    def predict(self, model: str, sequences: Iterable[str], *, timeout: float | None = None,
                data_type: int = pb.DATA_TYPE_FLOAT32) -> list[ItemOutputs]:
        """Logits [L, 20] (columns: vocab_tokens) and sequence_tokens of `<mask>`ed sequences."""
        return [out for _, out in self.predict_iter(model, sequences, timeout=timeout, data_type=data_type)]

    @model_first
    def predict_iter(self, model: str, sequences: Iterable[str], *, timeout: float | None = None,
                     data_type: int = pb.DATA_TYPE_FLOAT32) -> Iterator[tuple[int, ItemOutputs]]:
        """(input index, outputs) in input order, as encode_iter."""
        def request(batch):
            return _predict_request(model, batch, data_type)
        yield from self._run(list(sequences), model, request, self._stub.PredictStream, timeout)

    # ---- scores (computed on the server) ----------------------------------------
    @model_first
    def log_prob(self, model: str, sequences: Iterable[str], *, timeout: float | None = None,
                 window: WindowArg = None) -> list[float]:
        """BioLM's log_prob of each sequence (docs/scoring.md), in input order."""
        sequences = list(sequences)
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        limit = self.model_info(model, deadline.remaining()).max_items

        def one(batch: tuple[int, int]) -> list[float]:
            start, end = batch
            request = _log_prob_request(model, sequences[start:end], window)
            response = self._call(lambda t: self._stub.LogProb(request, timeout=t, metadata=self._headers(model)),
                                  deadline, start)
            return [r.log_prob for r in response.results]
        with ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="esm2-client") as pool:
            return [value for values in pool.map(one, _batches(len(sequences), limit)) for value in values]

    def score(self, model: str, items: Sequence[tuple[str, Sequence[str]]], method: str = "masked_marginal", *,
              timeout: float | None = None, window: WindowArg = None) -> list[ScoreResult]:
        """One Score request: (wild type, variants) items, scored by `method` on the server; a
        ScoreResult (numpy arrays, and the call's provenance) per item. It must fit the model's bounds
        (ModelInfo.max_items, max_score_passes, max_score_mutations); esm2_client.scoring splits larger
        work into such requests."""
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        request = _score_request(model, items, method, window=window)
        response, call = self._call(
            lambda t: self._stub.Score.with_call(request, timeout=t, metadata=self._headers(model)), deadline)
        provenance = Provenance.of_metadata(call.trailing_metadata())
        return [ScoreResult.of_proto(result, provenance) for result in response.results]

    def score_stream(self, model: str, items: Sequence[tuple[str, Sequence[str]]], method: str = "masked_marginal",
                     *, timeout: float | None = None, progress=None, window: WindowArg = None) -> list[ScoreResult]:
        """Score's results through ScoreStream, for requests too large to finish within one call's deadline
        (docs/how-it-works.md, "Admission"): the server sends the variants each block of passes
        completes, and `progress(passes_done, passes_total)` is called as they come. Equal to score()'s results."""
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        request = _score_request(model, items, method, pb.ScoreStreamRequest, window)

        def attempt(t):
            streamed = _StreamedScores(items)
            call = self._stub.ScoreStream(request, timeout=t, metadata=self._headers(model))
            try:
                for message in call:
                    streamed.add(message)
                    if progress is not None:
                        progress(message.passes_done, message.passes_total)
            finally:
                call.cancel()  # the caller stopped early (an exception, ^C): the server stops too; done: no-op
            return streamed.done(Provenance.of_metadata(call.trailing_metadata()))
        return self._call(attempt, deadline)

    def _run(self, sequences, model, make_request, rpc, timeout) -> Iterator[tuple[int, ItemOutputs]]:
        if not sequences:
            return
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        limit = self.model_info(model, deadline.remaining()).max_items

        stop = threading.Event()  # set when the caller is done: no new attempts or retries
        calls: set = set()  # RPCs in flight, to cancel
        lock = threading.Lock()

        def one(start, end):
            request = make_request(sequences[start:end])

            def attempt(t):
                call = rpc(request, timeout=t, metadata=self._headers(model))
                with lock:
                    calls.add(call)
                try:
                    if stop.is_set():
                        call.cancel()
                    assembler = StreamAssembler()
                    for message in call:
                        assembler.add(message)
                    return assembler.ordered(end - start)
                finally:
                    with lock:
                        calls.discard(call)
            return start, self._call(attempt, deadline, start, stop)

        batches = iter(_batches(len(sequences), limit))
        pool = ThreadPoolExecutor(self.max_in_flight, thread_name_prefix="esm2-client")
        queued = deque()  # futures in input order, not yet yielded

        def refill():
            _refill(queued, batches, self.max_in_flight, lambda start, end: pool.submit(one, start, end))

        try:
            refill()
            while queued:
                if not queued[0].done():
                    wait([f for f in queued if not f.done()], return_when=FIRST_COMPLETED)
                    refill()
                    continue
                start, outputs = queued.popleft().result()
                refill()
                for offset, output in enumerate(outputs):
                    yield start + offset, output
        finally:
            stop.set()
            with lock:
                for call in calls:
                    call.cancel()
            pool.shutdown(wait=True, cancel_futures=True)  # quick: every wait above is cut short


class AsyncEsm2Client(_Base):
    """asyncio client over grpc.aio; the same methods as Esm2Client, awaited.

        async with AsyncEsm2Client("localhost:50051") as client:
            outputs = await client.encode("esm2-8m", sequences)
    """

    def __init__(self, target: str = DEFAULT_TARGET, api_key: str | None = None, *, max_in_flight: int = 4,
                 retry: RetryPolicy = RetryPolicy(), timeout: float | None = None,
                 credentials: grpc.ChannelCredentials | None = None):
        super().__init__(target, api_key, max_in_flight, retry, timeout)
        if credentials is None:
            self._channel = grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.secure_channel(target, credentials, options=CHANNEL_OPTIONS)
        self._stub = pb_grpc.Esm2ServiceStub(self._channel)
        self._health = health_pb2_grpc.HealthStub(self._channel)

    async def __aenter__(self):
        return self

    async def __aexit__(self, *exc):
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, attempt, deadline: _Deadline, start: int = 0):
        retry = 0
        while True:
            try:
                return await attempt(deadline.remaining())
            except grpc.RpcError as exc:
                if not _retryable(exc) or retry + 1 >= self.retry.max_attempts:
                    raise _failure(exc, self.target, start) from None
                pause = self.retry.pause(retry)
                if not deadline.allows(pause):
                    raise _failure(exc, self.target, start) from None
                await asyncio.sleep(pause)
                retry += 1

    async def list_models(self, timeout: float | None = None, model: str | None = None) -> list[pb.ModelInfo]:
        """Models served; through a fleet gateway, those of `model`'s pool (or the default pool)."""
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        metadata = self._headers(model, auth=False)
        response = await self._call(
            lambda t: self._stub.ListModels(pb.ListModelsRequest(), timeout=t, metadata=metadata), deadline)
        return list(response.models)

    async def model_info(self, model: str, timeout: float | None = None) -> pb.ModelInfo:
        return self._models.get(model) or self._pick(await self.list_models(timeout, model), model)

    async def provenance(self, model: str, timeout: float | None = None) -> Provenance:
        return Provenance.of_model_info(await self.model_info(model, timeout))

    async def health(self, service: str = "", timeout: float | None = 10) -> str:
        request = health_pb2.HealthCheckRequest(service=service)
        metadata = self._headers(service, auth=False)  # a model's name routes to its pool
        response = await self._call(lambda t: self._health.Check(request, timeout=t, metadata=metadata),
                                    _Deadline(timeout))
        return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)

    @model_first
    async def encode(self, model: str, sequences: Iterable[str], include: Sequence[str] = ("mean",),
                     repr_layers: Sequence[int] = (-1,), *, timeout: float | None = None,
                     data_type: int = pb.DATA_TYPE_FLOAT32, window: WindowArg = None) -> list[ItemOutputs]:
        return [out async for _, out in self.encode_iter(model, sequences, include, repr_layers,
                                                         timeout=timeout, data_type=data_type, window=window)]

    @model_first
    def encode_iter(self, model: str, sequences: Iterable[str], include: Sequence[str] = ("mean",),
                    repr_layers: Sequence[int] = (-1,), *, timeout: float | None = None,
                    data_type: int = pb.DATA_TYPE_FLOAT32, window: WindowArg = None) -> AsyncIterator[tuple[int, ItemOutputs]]:
        def request(batch):
            return _encode_request(model, batch, include, repr_layers, data_type, window)
        return self._run(list(sequences), model, request, self._stub.EncodeStream, timeout)

    @model_first
    async def predict(self, model: str, sequences: Iterable[str], *, timeout: float | None = None,
                      data_type: int = pb.DATA_TYPE_FLOAT32) -> list[ItemOutputs]:
        return [out async for _, out in self.predict_iter(model, sequences, timeout=timeout, data_type=data_type)]

    @model_first
    def predict_iter(self, model: str, sequences: Iterable[str], *, timeout: float | None = None,
                     data_type: int = pb.DATA_TYPE_FLOAT32) -> AsyncIterator[tuple[int, ItemOutputs]]:
        def request(batch):
            return _predict_request(model, batch, data_type)
        return self._run(list(sequences), model, request, self._stub.PredictStream, timeout)

    @model_first
    async def log_prob(self, model: str, sequences: Iterable[str], *, timeout: float | None = None,
                       window: WindowArg = None) -> list[float]:
        sequences = list(sequences)
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        limit = (await self.model_info(model, deadline.remaining())).max_items
        running = asyncio.Semaphore(self.max_in_flight)

        async def one(start: int, end: int) -> list[float]:
            request = _log_prob_request(model, sequences[start:end], window)
            async with running:
                response = await self._call(
                    lambda t: self._stub.LogProb(request, timeout=t, metadata=self._headers(model)), deadline, start)
            return [r.log_prob for r in response.results]
        batches = await asyncio.gather(*(one(start, end) for start, end in _batches(len(sequences), limit)))
        return [value for values in batches for value in values]

    async def score(self, model: str, items: Sequence[tuple[str, Sequence[str]]], method: str = "masked_marginal",
                    *, timeout: float | None = None, window: WindowArg = None) -> list[ScoreResult]:
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        request = _score_request(model, items, method, window=window)

        async def attempt(t):
            call = self._stub.Score(request, timeout=t, metadata=self._headers(model))
            return await call, Provenance.of_metadata(await call.trailing_metadata())
        response, provenance = await self._call(attempt, deadline)
        return [ScoreResult.of_proto(result, provenance) for result in response.results]

    async def score_stream(self, model: str, items: Sequence[tuple[str, Sequence[str]]],
                           method: str = "masked_marginal", *, timeout: float | None = None,
                           progress=None, window: WindowArg = None) -> list[ScoreResult]:
        """Esm2Client.score_stream, awaited."""
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        request = _score_request(model, items, method, pb.ScoreStreamRequest, window)

        async def attempt(t):
            streamed = _StreamedScores(items)
            call = self._stub.ScoreStream(request, timeout=t, metadata=self._headers(model))
            try:
                async for message in call:
                    streamed.add(message)
                    if progress is not None:
                        progress(message.passes_done, message.passes_total)
            finally:
                call.cancel()  # the caller stopped early: the server stops too; done: no-op
            return streamed.done(Provenance.of_metadata(await call.trailing_metadata()))
        return await self._call(attempt, deadline)

    async def _run(self, sequences, model, make_request, rpc, timeout) -> AsyncIterator[tuple[int, ItemOutputs]]:
        if not sequences:
            return
        deadline = _Deadline(timeout if timeout is not None else self.timeout)
        limit = (await self.model_info(model, deadline.remaining())).max_items

        async def one(start, end):
            request = make_request(sequences[start:end])

            async def attempt(t):
                assembler = StreamAssembler()
                async for message in rpc(request, timeout=t, metadata=self._headers(model)):
                    assembler.add(message)
                return assembler.ordered(end - start)
            return start, await self._call(attempt, deadline, start)

        batches = iter(_batches(len(sequences), limit))
        queued: deque[asyncio.Task] = deque()  # in input order, not yet yielded

        def refill():
            _refill(queued, batches, self.max_in_flight, lambda start, end: asyncio.ensure_future(one(start, end)))

        try:
            refill()
            while queued:
                if not queued[0].done():
                    await asyncio.wait([t for t in queued if not t.done()], return_when=asyncio.FIRST_COMPLETED)
                    refill()
                    continue
                start, outputs = queued.popleft().result()
                refill()
                for offset, output in enumerate(outputs):
                    yield start + offset, output
        finally:
            for task in queued:
                task.cancel()
            await asyncio.gather(*queued, return_exceptions=True)
