"""Helpers the tests import: a server subprocess with a gRPC channel, request builders."""

from __future__ import annotations

import grpc

from esm2_wire.proto import pb, pb_grpc
from harness import server_process
from harness.server_process import REPO, free_port

__all__ = ["REPO", "ServerProcess", "encode_request", "free_port"]


class ServerProcess(server_process.ServerProcess):
    """A real server subprocess, plus a gRPC channel to it once ready."""

    channel = None

    def wait_ready(self, timeout: float = 120) -> "ServerProcess":
        super().wait_ready(timeout)
        self.channel = grpc.insecure_channel(self.target, options=[("grpc.max_receive_message_length", 1 << 30)])
        return self

    @property
    def stub(self) -> pb_grpc.Esm2ServiceStub:
        return pb_grpc.Esm2ServiceStub(self.channel)

    def stop(self, timeout: float = 60) -> int:
        if self.channel is not None:
            self.channel.close()
        return super().stop(timeout)


def encode_request(model: str, sequences, include=(), repr_layers=()) -> pb.EncodeRequest:
    return pb.EncodeRequest(
        model=model,
        params=pb.EncodeParams(include=list(include), repr_layers=list(repr_layers)),
        items=[pb.SequenceItem(sequence=s) for s in sequences],
    )


def envoy_admin_get(socket_path, path: str, timeout: float = 10) -> str:
    """GET from Envoy's admin interface, which listens only on a Unix socket (mode 0600)."""
    import http.client
    import socket

    class _UnixConnection(http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            self.sock.settimeout(timeout)
            self.sock.connect(str(socket_path))

    connection = _UnixConnection("localhost", timeout=timeout)
    try:
        connection.request("GET", path)
        return connection.getresponse().read().decode()
    finally:
        connection.close()
