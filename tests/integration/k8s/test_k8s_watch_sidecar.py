"""`meshlet run --watch-kube`: a real sidecar process follows the TrafficPolicies of its namespace.

No kube-apiserver (nor etcd) can run on this machine, so `fake_apiserver.FakeApiServer` plays
it, and only it: the sidecar is the real `meshlet run` subprocess talking to it with the
official `kubernetes` client over HTTP on loopback, found through a real kubeconfig, and the
requests go through its real outbound listener to real backends.
"""

from __future__ import annotations

import sys
import threading
from pathlib import Path

import pytest
from fake_apiserver import FakeApiServer, kubeconfig

sys.path.insert(0, str(Path(__file__).parents[1] / "sidecar"))
from sidecar_support import Backends, admin, get, policy, run_sidecar

HOST = "localhost"  # governed by the policy; without one, localhost:PORT passes through to PORT


def route_to(*weights: tuple[str, int]) -> str:
    to = ", ".join(f"{{backend: {name}, weight: {weight}}}" for name, weight in weights)
    return f"    - name: main\n      to: [{to}]\n"


def resource(port: dict[str, int], *weights: tuple[str, int]) -> dict:
    import yaml

    doc = yaml.safe_load(policy(HOST, {"v2": port["v2"], "v3": port["v3"]}, route_to(*weights), name="reviews"))
    doc["metadata"]["namespace"] = "shop"
    return doc


def wait_for(predicate, what: str) -> None:
    pause = threading.Event()
    for _ in range(200):
        if predicate():
            return
        pause.wait(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def condition(server: FakeApiServer) -> dict:
    obj = server.get("trafficpolicies", "shop", "reviews") or {}
    return next(iter((obj.get("status") or {}).get("conditions", [])), {})


@pytest.fixture(scope="module")
def backends():
    b = Backends()
    try:
        for name in ("v1", "v2", "v3"):
            b.start(name)
        yield b
    finally:
        b.close()


@pytest.mark.parametrize("workers", [1, 2])
def test_sidecar_follows_create_bad_update_fix_and_delete(tmp_path, backends, workers):
    port = backends.port
    with FakeApiServer() as server:
        config = kubeconfig(tmp_path / "kubeconfig", {"test": server}, "test", namespace="shop")
        with run_sidecar(None, "--watch-kube", workers=workers, env={"KUBECONFIG": config}) as sidecar:
            def backend() -> str | None:
                return get(sidecar.outbound, host=f"{HOST}:{port['v1']}").backend

            assert admin(sidecar, "GET", "/readyz")[0] == 200, "ready with the empty table, before any policy"
            assert backend() == "v1", "no policy yet: pass-through"

            server.put(resource(port, ("v2", 100)))
            wait_for(lambda: backend() == "v2", "the created policy to route")
            wait_for(lambda: condition(server).get("status") == "True", "Ready=True")
            status, body = admin(sidecar, "GET", "/policy")
            assert status == 200 and f'"127.0.0.1:{port["v2"]}"' in body["policy"]

            bad = resource(port, ("v2", 60), ("v3", 50))
            server.put(bad)
            wait_for(lambda: condition(server).get("status") == "False", "Ready=False on the bad update")
            assert condition(server)["reason"] == "Invalid"
            assert "trafficpolicy/shop/reviews:" in condition(server)["message"]
            assert "weights sum to 110" in condition(server)["message"]
            assert admin(sidecar, "GET", "/policy")[1] == body, "the old table is kept"
            assert {backend() for _ in range(20)} == {"v2"}

            server.put(resource(port, ("v3", 100)))
            wait_for(lambda: backend() == "v3", "the fixed policy to route")
            wait_for(lambda: condition(server).get("status") == "True", "Ready=True after the fix")

            server.delete("trafficpolicies", "shop", "reviews")
            wait_for(lambda: backend() == "v1", "pass-through after delete")
            assert admin(sidecar, "GET", "/policy")[1]["policy"] == ""
            log = sidecar.stderr()
            assert "trafficpolicy/shop/reviews: refused, keeping the previous version" in log
            assert "Traceback" not in log
            assert sidecar.stop() == 0


def test_watch_kube_flags_are_one_line_errors(tmp_path):
    import subprocess

    from sidecar_support import MESHLET

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        env = {"KUBECONFIG": str(tmp_path / "absent"), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
        return subprocess.run([MESHLET, "run", *args], capture_output=True, text=True, timeout=60, env=env)

    for args, error in [
        ((), "meshlet: give exactly one of --policy FILE or --watch-kube\n"),
        (("--watch-kube", "--policy", "p.yaml"), "meshlet: give exactly one of --policy FILE or --watch-kube\n"),
        (("--policy", "p.yaml", "-n", "shop"), "meshlet: --namespace and --context only apply with --watch-kube\n"),
        (("--watch-kube", "--context", "prod"), f"meshlet: --context prod: no kubeconfig at {tmp_path}/absent\n"),
    ]:
        result = run(*args)
        assert (result.returncode, result.stderr) == (1, error), args
