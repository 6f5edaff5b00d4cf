"""Demo backends for `meshlet demo` and the sidecar tests: they answer which version they are.

`GET /anything` → 200 `NAME\n` with `x-backend: NAME`. Two paths make failure modes
reproducible: `/sleep/SECONDS` answers after a delay (timeouts, drain), `/status/CODE`
answers with that status (retries on 5xx).
"""

from __future__ import annotations

import asyncio

from meshlet.proxy import httpserver
from meshlet.proxy.httpserver import Reply, Request

MAX_SLEEP = 30.0


def make_handler(name: str, status: int = 200) -> httpserver.Handler:
    """`status` other than 200 makes a failing backend (every plain request answers with it)."""

    async def handle(request: Request) -> Reply:
        headers = {"x-backend": name}
        path = request.path
        if path.startswith("/sleep/"):
            try:
                delay = min(float(path[len("/sleep/"):]), MAX_SLEEP)
            except ValueError:
                return Reply(400, b"expected /sleep/SECONDS\n", headers=headers)
            await asyncio.sleep(delay)
        elif path.startswith("/status/"):
            code = path[len("/status/"):]
            if not code.isdigit() or not 200 <= int(code) <= 599:
                return Reply(400, b"expected /status/CODE\n", headers=headers)
            return Reply(int(code), f"{name} {code}\n".encode(), headers=headers)
        return Reply(status, f"{name}\n".encode(), headers=headers)

    return handle


async def start_backend(
    name: str, host: str = "127.0.0.1", port: int = 0, status: int = 200
) -> httpserver.Listening:
    return await httpserver.start(make_handler(name, status), host, port)
