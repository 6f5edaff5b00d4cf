"""Plaintext gRPC (prior-knowledge h2c) from a Pod's app, through the mitmproxy engine behind the
injected iptables redirect.

The mitmproxy engine cannot read h2c. A redirected connection still reaches its original
destination (SO_ORIGINAL_DST), relayed at L4 with one log line saying policy does not apply;
a client that connects to the outbound listener itself gets a GOAWAY with the reason. The
server and the client are grpcio's (real HTTP/2, trailers, streaming), with generic handlers.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import pytest
from podnet_support import CFG, NEEDS, PEER_IP, pod_network, sh

pytestmark = [*NEEDS, pytest.mark.timeout(120)]
pytest.importorskip("grpc", reason="needs grpcio (the test extra of pyproject.toml)")

POLICY = (  # governs `reviews` only: gRPC to the peer is no policy's business, and h2c is not read anyway
    "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: reviews}\n"
    'spec: {host: reviews, backends: {v1: {address: "192.0.2.2:8080"}}, routes: [{name: all, to: [{backend: v1}]}]}\n'
)
SERVER = r"""
import sys
from concurrent import futures
import grpc
def say(request, context):
    context.set_trailing_metadata((("x-served-by", "peer"),))
    return b"echo:" + request
def count(request, context):
    for i in range(int(request)):
        yield str(i).encode()
echo = grpc.method_handlers_generic_handler("meshlet.test.Echo", {
    "Say": grpc.unary_unary_rpc_method_handler(say), "Count": grpc.unary_stream_rpc_method_handler(count)})
server = grpc.server(futures.ThreadPoolExecutor(4), handlers=[echo])
server.add_insecure_port("0.0.0.0:50051")
server.start()
print("ready", flush=True)
sys.stdin.read()
"""
CLIENT = r"""
import sys
import grpc
with grpc.insecure_channel(sys.argv[1], options=[("grpc.enable_http_proxy", 0)]) as channel:
    try:
        answer, call = channel.unary_unary("/meshlet.test.Echo/Say").with_call(b"hi", timeout=10)
        streamed = b",".join(channel.unary_stream("/meshlet.test.Echo/Count")(b"3", timeout=10))
        print(answer.decode(), dict(call.trailing_metadata())["x-served-by"], streamed.decode())
    except grpc.RpcError as e:
        print(e.code().name, e.details())
"""
H2_CLIENT = r"""
import socket, sys
import h2.config, h2.connection, h2.events
conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
conn.initiate_connection()
conn.send_headers(1, [(":method", "POST"), (":scheme", "http"), (":authority", sys.argv[1]),
                      (":path", "/meshlet.test.Echo/Say"), ("content-type", "application/grpc")], end_stream=True)
with socket.create_connection(sys.argv[1].rsplit(":", 1), timeout=10) as s:
    s.sendall(conn.data_to_send())
    while data := s.recv(65536):
        for event in conn.receive_data(data):
            if isinstance(event, h2.events.ConnectionTerminated):
                print(event.error_code.name, event.additional_data.decode())
                sys.exit(0)
print("closed without GOAWAY")
"""
RELAYED = f"to {PEER_IP}:50051 at L4: policy does not apply to it"


@pytest.fixture(scope="module")
def pod():
    with tempfile.TemporaryDirectory(prefix="gp-h2c-") as tmp, pod_network("gp") as net:
        net.start(net.peer, SERVER)
        log = net.run_sidecar(Path(tmp), POLICY, "--engine", "mitmproxy")
        net.install_redirect()
        yield net, log


def grpc_call(net, target: str) -> str:
    """A gRPC client as the app would run it: root in the Pod namespace, so iptables redirects it."""
    result = sh("ip", "netns", "exec", net.pod, sys.executable, "-c", CLIENT, target, check=False)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_redirected_grpc_reaches_its_server_relayed_at_l4_with_one_log_line(pod):
    net, log = pod
    assert grpc_call(net, f"{PEER_IP}:50051") == "echo:hi peer 0,1,2"  # unary with trailers, then a stream
    relayed = [line for line in log.read_text().splitlines() if RELAYED in line]
    assert len(relayed) == 1, log.read_text()  # one channel, one connection, one line
    assert "relaying cleartext HTTP/2 (h2c) from" in relayed[0] and " INFO " in relayed[0]
    assert "Traceback" not in log.read_text()


def test_h2c_sent_to_the_listener_itself_gets_goaway_with_the_reason(pod):
    """grpcio only reconnects after a GOAWAY until its deadline: h2's client shows what came back."""
    net, log = pod
    target = f"127.0.0.1:{CFG.outbound_port}"  # loopback: not redirected, so no destination of its own
    result = sh("ip", "netns", "exec", net.pod, sys.executable, "-c", H2_CLIENT, target, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == ("HTTP_1_1_REQUIRED meshlet: cleartext HTTP/2 (h2c) is not supported; "
                                     "use HTTP/1.1 or HTTP/2 over TLS")
    assert "refused a cleartext HTTP/2 (prior knowledge) client" in log.read_text()
