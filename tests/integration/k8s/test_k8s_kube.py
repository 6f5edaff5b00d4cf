"""Policies as custom resources: server-side apply and the sidecar's list+watch.

No kube-apiserver can run on this machine, so `fake_apiserver.FakeApiServer` plays it (and
only it): the client side is the official `kubernetes` package over real HTTP on loopback,
reading a real kubeconfig, exactly as `meshlet apply --kube` and `--watch-kube` run it.
"""

from __future__ import annotations

import copy
import os
import queue
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml
from fake_apiserver import FakeApiServer, kubeconfig

from meshlet.k8s import kube
from meshlet.k8s.manifest import Yaml12Loader
from meshlet.policy import PolicyInvalid, load_text
from meshlet.policy.model import PolicySet

REPO = Path(__file__).parents[3]
CANARY = (REPO / "policies" / "canary.yaml").read_text()


@pytest.fixture
def api(tmp_path):
    with FakeApiServer() as server:
        yield server, kubeconfig(tmp_path / "kubeconfig", {"test": server}, "test", namespace="shop")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    return str(path)


# -- apply ---------------------------------------------------------------------------------------


def test_apply_keeps_a_bare_deprecated_on_key_a_string(api, tmp_path):
    server, config = api
    path = write(tmp_path, CANARY.replace("retryOn:", "on:"))
    assert kube.apply_file(path, kubeconfig=config) == ["trafficpolicy.meshlet.dev/reviews created"]
    stored = server.get("trafficpolicies", "default", "reviews")
    assert stored["spec"]["routes"][0]["retries"]["on"] == ["connect-failure", "5xx"], "YAML 1.1 `on` kept a string"


def test_apply_creates_then_reports_unchanged_then_configured(api, tmp_path):
    server, config = api
    path = write(tmp_path, CANARY)
    assert kube.apply_file(path, kubeconfig=config) == ["trafficpolicy.meshlet.dev/reviews created"]
    stored = server.get("trafficpolicies", "default", "reviews")
    assert stored["spec"]["routes"][0]["retries"]["retryOn"] == ["connect-failure", "5xx"]
    assert kube.apply_file(path, kubeconfig=config) == ["trafficpolicy.meshlet.dev/reviews unchanged"]
    write(tmp_path, CANARY.replace("weight: 90", "weight: 80").replace("weight: 10}", "weight: 20}"))
    assert kube.apply_file(path, kubeconfig=config) == ["trafficpolicy.meshlet.dev/reviews configured"]
    assert server.get("trafficpolicies", "default", "reviews")["metadata"]["generation"] == 2
    patches = [r for r in server.requests if r[0] == "PATCH"]
    assert all(ct == "application/apply-patch+yaml" and "fieldManager=meshlet" in path and "force=true" in path
               for _, path, ct in patches)


def test_apply_qos_policy_is_cluster_scoped_and_namespace_flag_fills_traffic_policies(api, tmp_path):
    server, config = api
    text = (REPO / "policies" / "qos.yaml").read_text().replace("metadata: {name: reviews-qos, namespace: default}",
                                                                  "metadata: {name: reviews-qos}")
    lines = kube.apply_file(write(tmp_path, text), namespace="books", kubeconfig=config)
    assert lines == ["qospolicy.meshlet.dev/node-default created", "trafficpolicy.meshlet.dev/reviews-qos created"]
    assert server.get("qospolicies", "", "node-default") is not None
    assert server.get("trafficpolicies", "books", "reviews-qos") is not None


def test_apply_uses_the_context_namespace_when_none_is_written(api, tmp_path):
    server, config = api
    kube.apply_file(write(tmp_path, CANARY.replace(", namespace: default", "")), kubeconfig=config)
    assert server.get("trafficpolicies", "shop", "reviews") is not None


def test_apply_namespace_conflict_is_refused_before_sending(api, tmp_path):
    server, config = api
    with pytest.raises(kube.KubeError, match="is in namespace 'default', not 'books' given with --namespace"):
        kube.apply_file(write(tmp_path, CANARY), namespace="books", kubeconfig=config)
    assert server.requests == []


def test_invalid_policy_is_refused_locally_with_file_line_col(api, tmp_path):
    server, config = api
    path = write(tmp_path, CANARY.replace("weight: 10}", "weight: 20}"))
    with pytest.raises(PolicyInvalid) as e:
        kube.apply_file(path, kubeconfig=config)
    assert str(e.value.errors[0]) == f"{path}:13:12: route 'canary': weights sum to 110, must be 100"
    assert server.requests == []


def test_context_selects_the_cluster(tmp_path):
    with FakeApiServer() as one, FakeApiServer(token="other") as two:
        config = kubeconfig(tmp_path / "kubeconfig", {"one": one, "two": two}, "one")
        kube.apply_file(write(tmp_path, CANARY), context="two", kubeconfig=config)
        assert one.requests == []
        assert two.get("trafficpolicies", "default", "reviews") is not None
        with pytest.raises(kube.KubeError, match=r"kubeconfig .*: .*three"):
            kube.apply_file(write(tmp_path, CANARY), context="three", kubeconfig=config)


def test_unreachable_or_unauthorized_cluster_is_one_line(tmp_path):
    with FakeApiServer() as server:
        config = kubeconfig(tmp_path / "kubeconfig", {"c": server}, "c")
        server.token = "rotated"
        with pytest.raises(kube.KubeError, match=r"^trafficpolicy\.meshlet\.dev/reviews: 401 Unauthorized$"):
            kube.apply_file(write(tmp_path, CANARY), kubeconfig=config)
    with pytest.raises(kube.KubeError, match="cannot reach the Kubernetes API"):
        kube.apply_file(write(tmp_path, CANARY), kubeconfig=config)


# -- watch ---------------------------------------------------------------------------------------


def resource(text: str, namespace: str = "shop") -> dict:
    doc = yaml.load(text, Loader=Yaml12Loader)
    doc["metadata"]["namespace"] = namespace
    return doc


def weights(policies: PolicySet) -> dict[str, list[int]]:
    return {p.metadata.name: [t.weight for t in p.routes[0].to] for p in policies.traffic}


class Watcher:
    def __init__(self, server: FakeApiServer, config: str):
        self.sets: queue.Queue[PolicySet] = queue.Queue()
        self.sources: list[str] = []
        self.logs: list[str] = []
        self.stop = threading.Event()
        cluster = kube.connect(kubeconfig=config)
        self.thread = threading.Thread(target=kube.watch_policies, daemon=True, args=(
            cluster, self.received, self.stop, self.logs.append), kwargs={"timeout_seconds": 1, "backoff": 0.1})

    def received(self, policies: PolicySet, source: str) -> None:
        self.sources.append(source)
        self.last = policies
        self.sets.put(policies)

    def next(self) -> dict[str, list[int]]:
        return weights(self.sets.get(timeout=15))

    def quiet(self) -> bool:
        """No new set within a short while (after a refused update, none may come)."""
        try:
            self.sets.get(timeout=1.5)
        except queue.Empty:
            return True
        return False


@pytest.fixture
def watcher(api):
    server, config = api
    watcher = Watcher(server, config)
    watcher.thread.start()
    try:
        yield server, watcher
    finally:
        watcher.stop.set()
        watcher.thread.join(timeout=15)
        assert not watcher.thread.is_alive()


def wait_for(predicate, what: str) -> None:
    done = threading.Event()
    for _ in range(150):
        if predicate():
            return
        done.wait(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def ready(server: FakeApiServer, name: str = "reviews") -> dict:
    obj = server.get("trafficpolicies", "shop", name) or {}
    return next(iter((obj.get("status") or {}).get("conditions", [])), {})


def test_watch_applies_updates_and_keeps_the_old_table_on_a_bad_one(watcher):
    server, w = watcher
    server.put(resource(CANARY))
    assert w.next() == {"reviews": [90, 10]}
    wait_for(lambda: ready(server).get("status") == "True", "Ready=True")

    good = resource(CANARY)
    good["spec"]["routes"][0]["to"] = [{"backend": "v1", "weight": 70}, {"backend": "v2", "weight": 30}]
    server.put(good)
    assert w.next() == {"reviews": [70, 30]}

    bad = copy.deepcopy(good)
    bad["spec"]["routes"][0]["to"][1]["weight"] = 40
    server.put(bad)
    wait_for(lambda: ready(server).get("status") == "False", "Ready=False")
    condition = ready(server)
    assert condition["reason"] == "Invalid"
    assert condition["observedGeneration"] == 3
    assert "trafficpolicy/shop/reviews:" in condition["message"] and "weights sum to 110" in condition["message"]
    assert w.quiet(), "a refused resource must not replace the table"
    assert any("refused, keeping the previous version" in line for line in w.logs)

    server.put(good | {"spec": {**good["spec"], "host": "reviews.shop.svc"}})
    assert w.next() == {"reviews": [70, 30]}
    wait_for(lambda: ready(server).get("status") == "True", "Ready=True again")

    assert load_text(w.sources[-1]) == w.last, "the source text loads to the same set"
    server.delete("trafficpolicies", "shop", "reviews")
    assert w.next() == {}
    assert w.sources[-1] == ""


def test_watch_lists_existing_resources_and_recovers_from_an_expired_version(watcher):
    server, w = watcher
    server.put(resource(CANARY.replace("name: reviews,", "name: ratings,").replace("host: reviews", "host: ratings")))
    assert w.next() == {"ratings": [90, 10]}
    lists = sum(1 for method, path, _ in server.requests if method == "GET" and "watch=true" not in path)
    server.expire_history()  # the open watch ends; the next one gets 410 Gone
    wait_for(lambda: sum(1 for m, p, _ in server.requests if m == "GET" and "watch=true" not in p) > lists,
             "a fresh list after 410 Gone")
    server.put(resource(CANARY))
    assert w.next() == {"ratings": [90, 10], "reviews": [90, 10]}


def test_two_resources_for_one_host_refuse_the_second(watcher):
    server, w = watcher
    server.put(resource(CANARY.replace("name: reviews,", "name: ratings,")))
    assert w.next() == {"ratings": [90, 10]}
    server.put(resource(CANARY))
    wait_for(lambda: ready(server).get("status") == "False", "Ready=False on the second")
    assert "one policy per host" in ready(server)["message"]
    assert w.quiet()


# -- the command as users run it ------------------------------------------------------------------


def meshlet(*args: str, config: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "KUBECONFIG": config}
    return subprocess.run([str(Path(sys.executable).parent / "meshlet"), *args], capture_output=True, text=True,
                          timeout=60, env=env)


def test_meshlet_apply_kube_prints_like_kubectl(api, tmp_path):
    server, config = api
    path = write(tmp_path, CANARY.replace(", namespace: default", ""))
    first = meshlet("apply", path, "--kube", "-n", "books", config=config)
    assert (first.returncode, first.stdout, first.stderr) == (0, "trafficpolicy.meshlet.dev/reviews created\n", "")
    again = meshlet("apply", path, "--kube", "--namespace", "books", "--context", "test", config=config)
    assert again.stdout == "trafficpolicy.meshlet.dev/reviews unchanged\n"
    assert server.get("trafficpolicies", "books", "reviews") is not None


def test_meshlet_apply_kube_errors_are_one_line(api, tmp_path):
    server, config = api
    bad = write(tmp_path, CANARY.replace("weight: 10}", "weight: 20}"))
    result = meshlet("apply", bad, "--kube", config=config)
    assert result.returncode == 1
    assert result.stderr == f"meshlet: {bad}:13:12: route 'canary': weights sum to 110, must be 100\n"
    assert server.requests == []
    missing = meshlet("apply", write(tmp_path, CANARY), "--kube", "--context", "nope", config=config)
    assert missing.returncode == 1 and len(missing.stderr.splitlines()) == 1
    assert missing.stderr.startswith("meshlet: kubeconfig ") and "Traceback" not in missing.stderr
