"""Concurrent gRPC clients: each client is a thread with its own channel, sending one request
at a time (closed loop) until the shared list of requests is used up."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import grpc
import orjson
import requests

from esm2_wire.proto import pb, pb_grpc

RPC_TIMEOUT_S = 900


@dataclass
class LoadResult:
    seconds: float
    requests: int
    residues: int
    response_bytes: int
    latencies: list[float]


def encode_requests(model: str, sequences, items_per_request: int, include=("mean",), stream: bool = False):
    make = pb.EncodeStreamRequest if stream else pb.EncodeRequest
    return [
        make(model=model, params=pb.EncodeParams(include=list(include)),
             items=[pb.SequenceItem(sequence=s) for s in sequences[i : i + items_per_request]])
        for i in range(0, len(sequences), items_per_request)
    ]


def _call(stub, request) -> int:
    """Send one request, drain the answer; return the response bytes received."""
    if isinstance(request, pb.EncodeStreamRequest):
        return sum(m.ByteSize() for m in stub.EncodeStream(request, timeout=RPC_TIMEOUT_S))
    return stub.Encode(request, timeout=RPC_TIMEOUT_S).ByteSize()


class GrpcClient:
    def __init__(self, server):
        self.channel = server.channel()
        grpc.channel_ready_future(self.channel).result(timeout=30)  # connect before the clock starts
        self.stub = pb_grpc.Esm2ServiceStub(self.channel)

    def __call__(self, request) -> int:
        return _call(self.stub, request)

    def close(self) -> None:
        self.channel.close()


class JsonClient:
    """POSTs BioLM-style JSON bodies through the gateway and parses the answer, as a client would."""

    def __init__(self, url: str):
        self.url = url
        self.session = requests.Session()

    def __call__(self, request) -> int:
        body = {"items": [{"sequence": item.sequence} for item in request.items],
                "params": {"include": list(request.params.include)}}
        response = self.session.post(f"{self.url}/api/v3/{request.model}/encode/", data=orjson.dumps(body),
                                     headers={"content-type": "application/json"}, timeout=RPC_TIMEOUT_S)
        if response.status_code != 200:
            raise RuntimeError(f"HTTP {response.status_code}: {response.text[:500]}")
        orjson.loads(response.content)
        return len(response.content)

    def close(self) -> None:
        self.session.close()


def drive(server, work: list, concurrency: int, json_url: str | None = None) -> LoadResult:
    """Run all requests through `concurrency` closed-loop clients (gRPC, or JSON through the gateway
    at `json_url`); wall time from first send to last answer."""
    lock = threading.Lock()
    next_index = iter(range(len(work)))
    totals = {"bytes": 0}
    latencies: list[float] = []
    errors: list[BaseException] = []
    clients = [JsonClient(json_url) if json_url else GrpcClient(server) for _ in range(concurrency)]

    def client(call):
        try:
            while True:
                with lock:
                    i = next(next_index, None)
                if i is None:
                    return
                start = time.perf_counter()
                size = call(work[i])
                with lock:
                    latencies.append(time.perf_counter() - start)
                    totals["bytes"] += size
        except BaseException as exc:  # reported after the join
            errors.append(exc)

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in clients]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    seconds = time.perf_counter() - start
    for c in clients:
        c.close()
    if errors:
        raise RuntimeError(f"{len(errors)} client(s) failed; first: {errors[0]!r}")
    residues = sum(len(item.sequence) for r in work for item in r.items)
    return LoadResult(seconds, len(work), residues, totals["bytes"], latencies)
