"""Real gRPC backends (grpcio servers, generic handlers: no generated code) for the HTTP/2 tests.

Each backend answers under the service `demo.Svc`:
  Echo   unary: `NAME:REQUEST:PEER-IDENTITY`; `fail` aborts UNAVAILABLE (every call, on a backend named
         `down...`), `sleepS` sleeps S seconds first
  Count  server streaming: `N` → N messages `NAME-i`; `big:N:SIZE` → N messages of SIZE bytes
  Sum    client streaming: `NAME:TOTAL-BYTES`
  Chat   bidi streaming: each message back as `NAME>MESSAGE`
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent import futures

import grpc

SERVICE = "demo.Svc"


def _handlers(name: str) -> grpc.GenericRpcHandler:
    tag = name.encode()

    def echo(request: bytes, context: grpc.ServicerContext) -> bytes:
        metadata = dict(context.invocation_metadata())
        if request == b"fail" or name.startswith("down"):
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{name} asked to fail")
        if request.startswith(b"sleep"):
            time.sleep(float(request[5:]))
        return b"%s:%s:%s" % (tag, request, metadata.get("x-meshlet-peer-identity", "").encode())

    def count(request: bytes, context: grpc.ServicerContext) -> Iterator[bytes]:
        if request.startswith(b"big:"):
            _, n, size = request.split(b":")
            payload = b"x" * int(size)
            for _ in range(int(n)):
                yield payload
            return
        for i in range(int(request)):
            yield b"%s-%d" % (tag, i)

    def total(requests: Iterator[bytes], context: grpc.ServicerContext) -> bytes:
        return b"%s:%d" % (tag, sum(len(r) for r in requests))

    def chat(requests: Iterator[bytes], context: grpc.ServicerContext) -> Iterator[bytes]:
        for request in requests:
            yield tag + b">" + request

    return grpc.method_handlers_generic_handler(SERVICE, {
        "Echo": grpc.unary_unary_rpc_method_handler(echo),
        "Count": grpc.unary_stream_rpc_method_handler(count),
        "Sum": grpc.stream_unary_rpc_method_handler(total),
        "Chat": grpc.stream_stream_rpc_method_handler(chat),
    })


def start_grpc_backend(name: str) -> tuple[grpc.Server, int]:
    """A plaintext (h2c) gRPC server on a free loopback port."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
    server.add_generic_rpc_handlers((_handlers(name),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return server, port


class Stub:
    """The four calls of `demo.Svc` on one channel (one HTTP/2 connection)."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.echo = channel.unary_unary(f"/{SERVICE}/Echo")
        self.count = channel.unary_stream(f"/{SERVICE}/Count")
        self.sum = channel.stream_unary(f"/{SERVICE}/Sum")
        self.chat = channel.stream_stream(f"/{SERVICE}/Chat")


def channel_to(address: tuple[str, int], authority: str) -> grpc.Channel:
    """An insecure channel (prior-knowledge h2c) to the sidecar, calling `authority` as its host."""
    return grpc.insecure_channel(f"{address[0]}:{address[1]}", options=[("grpc.default_authority", authority)])
