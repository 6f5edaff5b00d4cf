"""`meshlet run --workers N`: N worker processes share the listeners; one admin API for all.

Python runs one core per process, so the proxy scales by processes: each worker binds the
same outbound and inbound ports with SO_REUSEPORT and the kernel spreads connections. The
supervisor owns the admin API: a PUT is validated and compiled once, then handed to every
worker with its generation number, so an invalid policy reaches no worker. Metrics from all
processes are summed with prometheus-client's multiprocess mode. A worker that dies is
restarted with the current policy; SIGTERM is passed on and each worker drains.
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
import socket
import sys
import tempfile
import urllib.request
from collections.abc import Callable
from pathlib import Path

from prometheus_client import CollectorRegistry
from prometheus_client.multiprocess import MultiProcessCollector

from meshlet.mtls.files import identity_certs
from meshlet.policy.model import Address
from meshlet.proxy import httpserver
from meshlet.proxy.admin import GENERATION_HEADER, WEIGHTS_HEADER, AdminApi, DistributionError
from meshlet.proxy.config import SidecarConfig, config_to_json
from meshlet.proxy.engine import StartupError
from meshlet.proxy.state import Applied, PolicyState
from meshlet.proxy.tapmerge import WorkerTaps
from meshlet.rollout.service import RolloutOptions, make_rollouts, resume_rollouts
from meshlet.telemetry.proxy import ProxyMetrics, enable_multiprocess, multiprocess_render

log = logging.getLogger("meshlet.proxy")
START_TIMEOUT = 60.0
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
    with socket.socket() as s:
        try:
            s.bind((address.host, address.port))
        except OSError as e:
            raise StartupError(f"cannot listen on {address}: {e.strerror or e}") from None
        return Address(address.host, s.getsockname()[1])


@dataclasses.dataclass
class Worker:
    process: asyncio.subprocess.Process
    control: str  # host:port of the worker's private admin API


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


def _put(control: str, applied: Applied) -> None:
    request = urllib.request.Request(
        f"http://{control}/policy", data=applied.source.encode(), method="PUT",
        headers={GENERATION_HEADER: str(applied.table.generation), WEIGHTS_HEADER: json.dumps(applied.weights)},
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        response.read()


class Supervisor:
    def __init__(self, config: SidecarConfig, applied: Applied, count: int, metrics_dir: Path):
        self.config = dataclasses.replace(
            config, outbound=_claim_port(config.outbound), inbound=_claim_port(config.inbound),
            admin=Address("127.0.0.1", 0), reuse_port=True,
        )
        self.state = PolicyState(applied, config.identity_dir is not None)
        self.count = count
        self.env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.workers: list[Worker] = []
        self.stopping = False

    async def start(self) -> None:
        started = await asyncio.gather(
            *(_start_worker(self.config, self.state.current, self.env) for _ in range(self.count)),
            return_exceptions=True,
        )
        self.workers = [w for w in started if isinstance(w, Worker)]
        errors = [e for e in started if isinstance(e, BaseException)]
        if errors:
            await self.stop(5.0)
            raise StartupError(str(errors[0]))

    async def distribute(self, applied: Applied) -> None:
        results = await asyncio.gather(
            *(asyncio.to_thread(_put, w.control, applied) for w in self.workers), return_exceptions=True
        )
        failed = [r for r in results if isinstance(r, BaseException)]
        if failed:
            raise DistributionError(
                f"applied to {len(results) - len(failed)} of {len(results)} workers: {failed[0]}"
            )

    def ready(self) -> bool:
        return len(self.workers) == self.count and all(w.process.returncode is None for w in self.workers)

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
                    self.workers.append(await _start_worker(self.config, self.state.current, self.env))
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
    metrics_dir = Path(tempfile.mkdtemp(prefix="meshlet-metrics-"))
    try:
        enable_multiprocess(metrics_dir)
        metrics = ProxyMetrics(CollectorRegistry(), config.metrics_compat, config.workload)
        rollouts = None
        if rollout is not None:  # analyses read every worker's figures from the multiprocess files
            workers_metrics = MultiProcessCollector(None, path=str(metrics_dir))
            rollouts = make_rollouts(rollout, workers_metrics, metrics.registry)
            applied = resume_rollouts(rollouts, applied)
        supervisor = Supervisor(config, applied, count, metrics_dir)
        await supervisor.start()
        taps = WorkerTaps(lambda: [w.control for w in supervisor.workers])
        try:
            render = multiprocess_render(metrics_dir)
            api = AdminApi(supervisor.state, metrics, supervisor.ready, supervisor.distribute, render,
                           certs=identity_certs(config.identity_dir), rollouts=rollouts, tap=taps.lines)
            try:
                admin = await httpserver.start(api, config.admin.host, config.admin.port)
            except OSError as e:
                raise StartupError(f"admin API cannot listen on {config.admin}: {e.strerror or e}") from None
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
            on_ready({
                "outbound": str(supervisor.config.outbound), "inbound": str(supervisor.config.inbound),
                "admin": f"{config.admin.host}:{httpserver.bound_port(admin)}",
                "generation": str(applied.table.generation), "workers": str(count),
            })
            watcher = asyncio.ensure_future(supervisor.watch())
            ticker = asyncio.ensure_future(api.run_rollouts()) if rollouts is not None else None
            await stop.wait()
            log.info("draining: passing SIGTERM to %d worker(s)", len(supervisor.workers))
            admin.close()
            watcher.cancel()
            if ticker is not None:
                ticker.cancel()
        finally:
            await supervisor.stop(config.drain_timeout + 5.0)
            taps.close()  # after the workers drained: their last requests are in the streams
        return 0
    finally:
        shutil.rmtree(metrics_dir, ignore_errors=True)
