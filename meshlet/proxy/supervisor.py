"""`meshlet run --workers N`: N worker processes share the listeners; one admin API for all.

Python runs one core per process, so the proxy scales by processes: each worker binds the
same outbound and inbound ports with SO_REUSEPORT and the kernel spreads connections. The
supervisor owns the admin API: a PUT is validated and compiled once, then handed to every
worker with its generation number, so an invalid policy reaches no worker. Metrics from all
processes are summed with prometheus-client's multiprocess mode. A worker that dies is
restarted with the current policy; SIGTERM is passed on and each worker drains.

The supervisor talks to each worker over a Unix socket in a directory only the sidecar's user
can enter (mkdtemp: 0700): nothing on the network, and no other process of the Pod, reaches a
worker's API, and only there are the generation and rollout-weight headers obeyed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Awaitable, Callable
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from meshlet.policy.model import Address
from meshlet.proxy import httpserver
from meshlet.proxy.admin import GENERATION_HEADER, WEIGHTS_HEADER, AdminApi, DistributionError
from meshlet.proxy.config import SidecarConfig, config_to_json
from meshlet.proxy.endpoints import start_endpoints
from meshlet.proxy.engine import StartupError
from meshlet.proxy.listen import claim_port
from meshlet.proxy.state import Applied, PolicyState
from meshlet.proxy.tapmerge import WorkerTaps
from meshlet.rollout.service import RolloutOptions, make_rollouts, resume_rollouts
from meshlet.telemetry.proxy import ProxyMetrics, enable_multiprocess, multiprocess_render

log = logging.getLogger("meshlet.proxy")
START_TIMEOUT = 60.0
REQUEST_TIMEOUT = 30.0
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Workers get SIGTERM if the supervisor is killed, instead of serving on unmanaged."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _claim_port(address: Address) -> Address:
    """Workers must agree on the port: pick a free one for port 0; refuse a port in use.

    Without this check a second sidecar on the same ports would bind too (SO_REUSEPORT) and
    silently take half the connections.
    """
    try:
        return claim_port(address)
    except OSError as e:
        raise StartupError(f"cannot listen on {address}: {e.strerror or e}") from None


@dataclasses.dataclass
class Worker:
    process: asyncio.subprocess.Process
    control: str  # the Unix socket of the worker's private admin API


async def _start_worker(config: SidecarConfig, applied: Applied, env: dict[str, str]) -> Worker:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshlet.proxy.worker", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env=env, preexec_fn=_die_with_parent,
    )
    job = {"config": config_to_json(config), "policy": applied.source, "generation": applied.table.generation,
           "weights": applied.weights}
    assert process.stdin is not None and process.stdout is not None
    process.stdin.write((json.dumps(job) + "\n").encode())
    await process.stdin.drain()
    process.stdin.close()
    try:
        line = await asyncio.wait_for(process.stdout.readline(), START_TIMEOUT)
        answer = json.loads(line) if line else {"error": f"worker exited with {await process.wait()}"}
    except (TimeoutError, ValueError) as e:
        answer = {"error": f"worker did not report ready: {e or 'timed out'}"}
    if "ready" not in answer:
        if process.returncode is None:
            process.kill()
            await process.wait()
        raise StartupError(answer.get("error", "worker failed to start"))
    return Worker(process, answer["ready"]["admin"])


async def _request(control: str, method: str, path: str, body: bytes = b"",
                   headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """One request to a worker's private API (its Unix socket): (status, body); OSError when unreachable."""
    head = f"{method} {path} HTTP/1.1\r\nHost: worker\r\nConnection: close\r\nContent-Length: {len(body)}\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in (headers or {}).items())
    reader, writer = await asyncio.wait_for(httpserver.connect(control), REQUEST_TIMEOUT)
    try:
        writer.write(head.encode("latin-1") + b"\r\n" + body)
        answer = await asyncio.wait_for(reader.read(), REQUEST_TIMEOUT)
    finally:
        writer.close()
    status, _, rest = answer.partition(b"\r\n")
    if not status.startswith(b"HTTP/1.1 ") or not status[9:12].isdigit():
        raise OSError(f"worker answered {status[:80]!r}")
    return int(status[9:12]), rest.partition(b"\r\n\r\n")[2]


async def _put(control: str, applied: Applied) -> None:
    """PUT the policy to one worker with its generation and rollout overlay; OSError unless 200."""
    headers = {GENERATION_HEADER: str(applied.table.generation), WEIGHTS_HEADER: json.dumps(applied.weights)}
    status, body = await _request(control, "PUT", "/policy", applied.source.encode(), headers)
    if status != 200:
        raise OSError(f"worker answered {status}: {body.decode('utf-8', 'replace').strip()}")


class Supervisor:
    def __init__(self, config: SidecarConfig, applied: Applied, count: int, private_dir: Path):
        self.config = dataclasses.replace(
            config, outbound=_claim_port(config.outbound), inbound=_claim_port(config.inbound),
            health=None, reuse_port=True,
        )
        self.state = PolicyState(applied, config.has_identity, dict(config.workload_labels))
        self.count = count
        self.private_dir = private_dir  # 0700: the workers' metrics files and control sockets
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(private_dir / "metrics")}
        self.workers: list[Worker] = []
        self.stopping = False
        self.started = 0
        self._ready: dict[str, bool] = {}  # worker control socket → its last /readyz
        self._certs: dict = {"identity": None}  # a worker's last GET /certs

    def _start_worker(self) -> Awaitable[Worker]:
        """A new worker with its own control socket (a restarted one gets a fresh path)."""
        self.started += 1
        control = str(self.private_dir / f"worker-{self.started}.sock")
        return _start_worker(dataclasses.replace(self.config, control=control), self.state.current, self.env)

    async def start(self) -> None:
        started = await asyncio.gather(*(self._start_worker() for _ in range(self.count)), return_exceptions=True)
        self.workers = [w for w in started if isinstance(w, Worker)]
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            await self.stop(5.0)
            raise StartupError(str(errors[0]))
        await self.look_at_workers()

    async def look_at_workers(self) -> None:
        """Each worker's readiness (it may wait for its certificate) and one worker's certificate:
        the workers hold the identities, the supervisor only reports them."""
        workers = list(self.workers)
        answers = await asyncio.gather(*(_request(w.control, "GET", "/readyz") for w in workers),
                                       return_exceptions=True)
        self._ready = {w.control: a == (200, b"ready\n") for w, a in zip(workers, answers, strict=True)}
        if workers:
            with contextlib.suppress(OSError, ValueError):
                status, body = await _request(workers[0].control, "GET", "/certs")
                if status == 200:
                    self._certs = json.loads(body)

    async def follow_workers(self, interval: float = 1.0) -> None:
        while not self.stopping:
            await asyncio.sleep(interval)
            await self.look_at_workers()

    def certs(self) -> dict:
        return self._certs

    async def distribute(self, applied: Applied) -> None:
        results = await asyncio.gather(*(_put(w.control, applied) for w in self.workers), return_exceptions=True)
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise DistributionError(
                f"applied to {len(results) - len(failed)} of {len(results)} workers: {failed[0]}"
            )

    def ready(self) -> bool:
        return len(self.workers) == self.count and all(
            w.process.returncode is None and self._ready.get(w.control, False) for w in self.workers)

    async def watch(self) -> None:
        """Restart a worker that exits while we are not stopping."""
        while not self.stopping:
            waits = {asyncio.ensure_future(w.process.wait()): w for w in self.workers}
            done, pending = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            for task in done:
                worker = waits[task]
                if self.stopping:
                    return
                log.error("worker %d exited with %s; restarting it", worker.process.pid, task.result())
                self.workers.remove(worker)
                try:
                    self.workers.append(await self._start_worker())
                except StartupError as e:
                    log.error("worker restart failed: %s", e)
                    await asyncio.sleep(1.0)

    async def stop(self, timeout: float) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        for worker in self.workers:
            try:
                await asyncio.wait_for(worker.process.wait(), timeout)
            except TimeoutError:
                worker.process.kill()
                await worker.process.wait()


async def supervise(
    config: SidecarConfig, applied: Applied, count: int, on_ready: Callable[[dict[str, str]], None],
    rollout: RolloutOptions | None = None,
) -> int:
    private_dir = Path(tempfile.mkdtemp(prefix="meshlet-sidecar-"))
    metrics_dir = private_dir / "metrics"
    try:
        metrics_dir.mkdir()
        enable_multiprocess(metrics_dir)
        metrics = ProxyMetrics(CollectorRegistry(), config.metrics_compat, config.mesh_workload())
        rollouts = None
        if rollout is not None:  # analyses read every worker's figures from the multiprocess files
            workers_metrics = MultiProcessCollector(None, path=str(metrics_dir))
            rollouts = make_rollouts(rollout, workers_metrics, metrics.registry)
            applied = resume_rollouts(rollouts, applied)
        supervisor = Supervisor(config, applied, count, private_dir)
        await supervisor.start()
        taps = WorkerTaps(lambda: [w.control for w in supervisor.workers])
        try:
            render = multiprocess_render(metrics_dir)
            api = AdminApi(supervisor.state, metrics, supervisor.ready, supervisor.distribute, render,
                           certs=supervisor.certs if config.has_identity else None, rollouts=rollouts,
                           tap=taps.lines)
            endpoints = await start_endpoints(api, config)
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            on_ready({
                "outbound": str(supervisor.config.outbound), "inbound": str(supervisor.config.inbound),
                **endpoints.addresses, "generation": str(applied.table.generation), "workers": str(count),
            })
            watcher = asyncio.ensure_future(supervisor.watch())
            follower = asyncio.ensure_future(supervisor.follow_workers())
            ticker = asyncio.ensure_future(api.run_rollouts()) if rollouts is not None else None
            await stop.wait()
            log.info("draining: passing SIGTERM to %d worker(s)", len(supervisor.workers))
            endpoints.close()
            watcher.cancel()
            follower.cancel()
            if ticker is not None:
                ticker.cancel()
        finally:
            await supervisor.stop(config.drain_timeout + 5.0)
            taps.close()  # after the workers drained: their last requests are in the streams
        return 0
    finally:
        shutil.rmtree(private_dir, ignore_errors=True)
