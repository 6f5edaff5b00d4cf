"""A stand-in workload the accel tests start inside (or outside) a cgroup.

It reads one command per line on stdin and answers one JSON line on stdout, so a test can
drive real sockets from a process whose cgroup it controls:

  listen                 start an echo server on 127.0.0.1:0        -> {"port": P}
  exchange PORT SIZE     send SIZE random bytes, read them back     -> {"exact": bool, "peer": [h, p]}
  churn PORT N           N connections, 1 byte echoed on each       -> {"done": N}
  open PORT              connect and keep the connection            -> {"id": I, "peer": [h, p]}
  ask ID                 send a line on held connection I, read one -> {"name": S}
  close ID                                                           -> {}
  connect PORT N         N connections, each greeting counted       -> {"names": {S: n}, "peers": [[h, p]], "failed": k}
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import socket
import sys
import threading

TIMEOUT = 10.0


def recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks, got = [], 0
    while got < size:
        chunk = sock.recv(min(size - got, 1 << 20))
        if not chunk:
            break
        chunks.append(chunk)
        got += len(chunk)
    return b"".join(chunks)


def echo(conn: socket.socket) -> None:
    with conn:
        while data := conn.recv(1 << 20):
            conn.sendall(data)


def serve(server: socket.socket) -> None:
    while True:
        conn, _ = server.accept()
        threading.Thread(target=echo, args=(conn,), daemon=True).start()


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)


def read_line(sock: socket.socket) -> str:
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(1)
        if not chunk:
            break
        data += chunk
    return data.decode().strip()


def main() -> None:
    held: dict[int, socket.socket] = {}
    for line in sys.stdin:
        cmd, *args = line.split()
        if cmd == "listen":
            server = socket.create_server(("127.0.0.1", 0), backlog=1024)
            threading.Thread(target=serve, args=(server,), daemon=True).start()
            answer: dict = {"port": server.getsockname()[1]}
        elif cmd == "exchange":
            port, size = int(args[0]), int(args[1])
            data = os.urandom(size)
            with connect(port) as sock:
                sender = threading.Thread(target=sock.sendall, args=(data,))
                sender.start()
                back = recv_exact(sock, size)
                sender.join()
                peer = sock.getpeername()
            answer = {"exact": hashlib.sha256(back).digest() == hashlib.sha256(data).digest(), "peer": peer}
        elif cmd == "churn":
            port, count = int(args[0]), int(args[1])
            for _ in range(count):
                with connect(port) as sock:
                    sock.sendall(b"x")
                    recv_exact(sock, 1)
            answer = {"done": count}
        elif cmd == "open":
            sock = connect(int(args[0]))
            held[len(held)] = sock
            answer = {"id": len(held) - 1, "peer": sock.getpeername()}
        elif cmd == "ask":
            sock = held[int(args[0])]
            sock.sendall(b"?\n")
            answer = {"name": read_line(sock)}
        elif cmd == "close":
            held.pop(int(args[0])).close()
            answer = {}
        elif cmd == "connect":
            port, count = int(args[0]), int(args[1])
            names: collections.Counter[str] = collections.Counter()
            peers, failed = set(), 0
            for _ in range(count):
                try:
                    with connect(port) as sock:
                        peers.add(sock.getpeername())
                        names[read_line(sock) or "(nothing)"] += 1
                except OSError:
                    failed += 1
            answer = {"names": names, "peers": sorted(peers), "failed": failed}
        else:
            answer = {"error": f"unknown command {cmd}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
