"""`meshlet inject` over real-world-shaped manifests: golden files, idempotency, opt-out, order.

Golden files live in manifests/golden/; after an intended change of the injected spec,
regenerate them with `MESHLET_REGEN_GOLDEN=1 pytest tests/unit/k8s` and review the diff.
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.ebpf.kernel_split import BYPASS_MARK
from meshlet.k8s import manifest, sidecar
from meshlet.k8s.inject import inject_document, inject_pod
from meshlet.k8s.sidecar import InjectConfig, Resources

HERE = Path(__file__).parent
MANIFESTS = sorted((HERE / "manifests").glob("*.yaml"))
GOLDEN = HERE / "manifests" / "golden"
MESHLET = Path(sys.executable).parent / "meshlet"
CFG = InjectConfig()


def inject_text(text: str, cfg: InjectConfig = CFG) -> str:
    return manifest.rewrite(manifest.split(text, "<test>"), lambda obj: inject_document(obj, cfg)[0])


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(MESHLET), *args], input=stdin, capture_output=True, text=True, timeout=60)


def pod_spec(obj: dict) -> dict:
    """The Pod (template) spec of a workload, or {} for other kinds."""
    path = {"Pod": [], "CronJob": ["spec", "jobTemplate", "spec", "template"]}.get(obj["kind"], ["spec", "template"])
    for key in path:
        obj = obj.get(key, {})
    return obj.get("spec", {})


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_golden(path: Path):
    out = inject_text(path.read_text())
    golden = GOLDEN / path.name
    if os.environ.get("MESHLET_REGEN_GOLDEN"):
        golden.parent.mkdir(exist_ok=True)
        golden.write_text(out)
    assert out == golden.read_text()


@pytest.mark.parametrize("version", ["1.29.0", kubernetes_validate.latest_version()])
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_injected_output_passes_strict_kubernetes_schema(path: Path, version: str):
    """Native sidecars (`restartPolicy: Always` on an init container) need Kubernetes >= 1.29."""
    for doc in yaml.safe_load_all(inject_text(path.read_text())):
        for item in doc["items"] if doc["kind"] == "List" else [doc]:
            kubernetes_validate.validate(item, version, strict=True)


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_injecting_twice_equals_once(path: Path):
    once = inject_text(path.read_text())
    assert inject_text(once) == once


def test_reinjecting_with_new_image_upgrades_in_place():
    text = (HERE / "manifests" / "bookinfo.yaml").read_text()
    new = InjectConfig(image="registry.example/meshlet:9.9")
    twice = inject_text(inject_text(text), new)
    assert twice == inject_text(text, new)
    deployment = list(yaml.safe_load_all(twice))[2]
    inits = deployment["spec"]["template"]["spec"]["initContainers"]
    assert [c["image"] for c in inits] == ["registry.example/meshlet:9.9"] * 2


def test_untouched_documents_are_byte_identical_and_in_order():
    text = (HERE / "manifests" / "bookinfo.yaml").read_text()
    out = inject_text(text)
    service_and_account = text[: text.index("---\napiVersion: apps/v1")]
    assert out.startswith(service_and_account)  # comments and flow style kept
    optout = (HERE / "manifests" / "list-and-opt-out.yaml").read_text()
    legacy = optout[optout.index("# Opted out"): optout.index("---\n# hostNetwork")]
    out = inject_text(optout)
    assert legacy in out
    assert out.index("kind: List") < out.index(legacy) < out.index("name: node-exporter")


def test_sidecar_is_native_and_starts_before_the_app_and_other_init_containers():
    pod = yaml.safe_load((HERE / "manifests" / "pod-with-init.yaml").read_text())
    result = inject_pod(pod, CFG)
    assert result.outcome == "injected"
    spec = result.obj["spec"]
    assert [c["name"] for c in spec["initContainers"]] == ["meshlet-init", "meshlet-proxy", "wait-for-db"]
    proxy = spec["initContainers"][1]
    assert proxy["restartPolicy"] == "Always"
    for probe in ("startupProbe", "readinessProbe"):
        assert proxy[probe]["httpGet"] == {"path": "/readyz", "port": 15020}  # the read-only health port
    assert proxy["securityContext"]["runAsUser"] == 1337
    assert "--app" in proxy["args"] and proxy["args"][proxy["args"].index("--app") + 1] == "127.0.0.1:9080"
    assert {"name": "meshlet-token", "mountPath": "/var/run/secrets/meshlet", "readOnly": True} in proxy["volumeMounts"]
    assert {"name": "meshlet-trust", "mountPath": "/etc/meshlet/trust", "readOnly": True} in proxy["volumeMounts"]
    assert [c["name"] for c in spec["containers"]] == ["productpage"]
    annotations = result.obj["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == "15020"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert pod == yaml.safe_load((HERE / "manifests" / "pod-with-init.yaml").read_text()), "input was mutated"


def test_redirect_script_excludes_proxy_uid_and_the_sidecars_own_ports():
    cfg = InjectConfig(uid=2000, admin_port=16000, health_port=16020, inbound_port=16006, outbound_port=16001)
    script = sidecar.redirect_script(cfg)
    assert "--uid-owner 2000 -j RETURN" in script
    for port in (16000, 16001, 16006, 16020):  # the kernel delivers them: to the Pod IP or nowhere
        assert f"ipt4 -A MESHLET_INBOUND -p tcp --dport {port} -j RETURN" in script
    assert "REDIRECT --to-ports 16006" in script and "REDIRECT --to-ports 16001" in script


def test_redirect_script_programs_ip6tables_when_the_pod_has_ipv6():
    lines = sidecar.redirect_script(CFG).splitlines()
    v6 = lines[lines.index("if grep -q . /proc/net/if_inet6 2>/dev/null; then") + 1:lines.index("fi")]
    assert v6[0] == '  ipt6() { ip6tables -w 5 -t nat "$@"; }'
    assert "  ipt6 -A MESHLET_OUTPUT -d ::1/128 -j RETURN" in v6
    v4 = lines[lines.index('ipt4() { iptables -w 5 -t nat "$@"; }') + 1:lines.index("if grep -q . /proc/net/if_inet6 2>/dev/null; then")]
    assert [line.strip().replace("ipt6", "ipt4").replace("::1/128", "127.0.0.0/8") for line in v6[1:]] == v4
    assert lines[0] == "set -eu"  # an ip6tables failure stops the init container: the Pod does not start


def test_the_sidecar_args_keep_the_control_api_on_loopback():
    args = sidecar.proxy_container(CFG, 8080)["args"]
    value = dict(zip(args[2::2], args[3::2], strict=False))
    assert value["--admin"] == "127.0.0.1:15000" and value["--health"] == "[::]:15020"
    assert value["--outbound"] == "localhost:15001" and value["--inbound"] == "[::]:15006"
    assert value["--workload-labels"] == "/etc/meshlet/podinfo/labels"


def test_connections_split_in_the_kernel_return_before_the_outbound_redirect():
    lines = sidecar.redirect_script(CFG).splitlines()
    marked = lines.index(f"ipt4 -A MESHLET_OUTPUT -m mark --mark {BYPASS_MARK:#x} -j RETURN")
    assert marked < lines.index(f"ipt4 -A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports {CFG.outbound_port}")


def test_excluded_ports_from_annotations_bypass_the_redirect():
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {
        "metadata": {"annotations": {sidecar.EXCLUDE_OUTBOUND: "3306, 25,", sidecar.EXCLUDE_INBOUND: "9090"}},
        "spec": {"containers": [{"name": "a", "image": "a"}]}}}}
    obj, (result,) = inject_document(deployment, CFG)
    assert result.outcome == "injected"
    script = pod_spec(obj)["initContainers"][0]["command"][-1].splitlines()
    redirect_out = script.index(f"ipt4 -A MESHLET_OUTPUT -p tcp -j REDIRECT --to-ports {CFG.outbound_port}")
    redirect_in = script.index(f"ipt4 -A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports {CFG.inbound_port}")
    for port in (25, 3306):  # before the catch-all REDIRECT, or they would never match
        assert script.index(f"ipt4 -A MESHLET_OUTPUT -p tcp --dport {port} -j RETURN") < redirect_out
    assert script.index("ipt4 -A MESHLET_INBOUND -p tcp --dport 9090 -j RETURN") < redirect_in
    assert not any("--dport 9090" in line for line in script if "MESHLET_OUTPUT" in line)


@pytest.mark.parametrize("value", ["mysql", "70000", "0", "33 06", "-1"])
def test_a_malformed_exclusion_is_refused_with_the_annotation_named(value):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p", "annotations": {sidecar.EXCLUDE_OUTBOUND: value}},
           "spec": {"containers": [{"name": "a", "image": "a"}]}}
    result = inject_pod(pod, CFG)
    assert result.outcome == "cannot-inject"
    assert sidecar.EXCLUDE_OUTBOUND in result.reason and repr(value) in result.reason


def test_every_workload_kind_gets_the_sidecar():
    injected = [yaml.safe_load_all(inject_text(p.read_text())) for p in MANIFESTS]
    kinds = set()
    for docs in injected:
        for doc in docs:
            for item in doc["items"] if doc["kind"] == "List" else [doc]:
                if any(c["name"] == "meshlet-proxy" for c in pod_spec(item).get("initContainers", [])):
                    kinds.add(item["kind"])
    assert kinds == {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "Pod"}


@pytest.mark.parametrize(("change", "reason"), [
    (lambda s: s.update(hostNetwork=True), "hostNetwork"),
    (lambda s: s["containers"][0].update(ports=[{"containerPort": 15001}]), "port 15001"),
    (lambda s: s["containers"][0].update(securityContext={"runAsUser": 1337}), "UID 1337"),
    (lambda s: s.pop("containers"), "spec.containers"),
])
def test_pods_that_cannot_take_a_sidecar_are_left_alone(change, reason):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "app", "image": "app"}]}}
    change(pod["spec"])
    before = copy.deepcopy(pod)
    result = inject_pod(pod, CFG)
    assert result.outcome == "cannot-inject"
    assert reason in result.reason
    assert result.obj == before


@pytest.mark.parametrize("where", ["annotations", "labels"])
def test_opt_out_on_pod_template(where):
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"}, "spec": {"template": {
        "metadata": {where: {"meshlet.dev/inject": "false"}}, "spec": {"containers": [{"name": "a", "image": "a"}]}}}}
    obj, results = inject_document(deployment, CFG)
    assert obj is deployment
    assert results[0].outcome == "opted-out"


# -- property: any Pod injects to a fixed point -------------------------------------------------

_names = st.text("abcdefghij-", min_size=1, max_size=8)
_containers = st.lists(
    st.fixed_dictionaries({"name": _names, "image": _names},
                          optional={"ports": st.lists(st.fixed_dictionaries(
                              {"containerPort": st.integers(1, 14999)}), max_size=2)}),
    min_size=1, max_size=3,
)
_pods = st.fixed_dictionaries(
    {"apiVersion": st.just("v1"), "kind": st.just("Pod"), "metadata": st.fixed_dictionaries(
        {"name": _names}, optional={"annotations": st.dictionaries(_names, _names, max_size=2)})},
).flatmap(lambda pod: st.fixed_dictionaries(
    {"containers": _containers},
    optional={"initContainers": _containers, "volumes": st.lists(
        st.fixed_dictionaries({"name": _names, "emptyDir": st.just({})}), max_size=2)},
).map(lambda spec: {**pod, "spec": spec}))


@settings(max_examples=60, deadline=None)
@given(_pods)
def test_injection_reaches_a_fixed_point(pod):
    once = inject_pod(pod, CFG)
    assert once.outcome == "injected"
    twice = inject_pod(once.obj, CFG)
    assert twice.outcome == "unchanged" and twice.obj is once.obj
    spec = once.obj["spec"]
    assert [c["name"] for c in spec["initContainers"][:2]] == ["meshlet-init", "meshlet-proxy"]
    assert spec["containers"] == pod["spec"]["containers"]


# -- the command as users run it ------------------------------------------------------------------


def test_cli_flags_stdin_and_summary():
    text = (HERE / "manifests" / "jobs.yaml").read_text()
    result = run("inject", "-f", "-", "--image", "reg.example/m:2", "--cpu-request", "200m",
                 "--memory-limit", "none", stdin=text)
    assert result.returncode == 0, result.stderr
    assert result.stderr.splitlines() == ["job/migrate: injected", "cronjob/nightly-report: injected"]
    job = next(yaml.safe_load_all(result.stdout))
    proxy = job["spec"]["template"]["spec"]["initContainers"][1]
    assert proxy["image"] == "reg.example/m:2"
    assert proxy["resources"] == {"requests": {"cpu": "200m", "memory": "64Mi"}, "limits": {"cpu": "1"}}
    expected = InjectConfig(image="reg.example/m:2", resources=Resources("200m", "64Mi", "1", None))
    assert proxy == sidecar.proxy_container(expected, None, "migrate")


def test_cli_output_file_and_in_place(tmp_path):
    target = tmp_path / "app.yaml"
    target.write_text((HERE / "manifests" / "bookinfo.yaml").read_text())
    result = run("inject", "-q", "-f", str(target), "-o", str(target))
    assert result.returncode == 0 and result.stderr == ""
    assert target.read_text() == (GOLDEN / "bookinfo.yaml").read_text()


def test_cli_malformed_yaml_names_file_line_col_and_writes_nothing(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("apiVersion: v1\nkind: Service\n---\nkind: Pod\nmetadata: {name: [\n")
    out = tmp_path / "out.yaml"
    result = run("inject", "-f", str(bad), "-o", str(out))
    assert result.returncode == 1
    assert result.stderr.startswith(f"meshlet: {bad}:6:1: malformed YAML")
    assert len(result.stderr.splitlines()) == 1
    assert not out.exists()


def test_cli_bad_flag_value_is_one_clear_line():
    result = run("inject", "-f", "-", "--cpu-request", "lots", stdin="")
    assert result.returncode == 2
    assert "bad resource quantity 'lots'" in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_missing_file():
    result = run("inject", "-f", "/nonexistent/app.yaml")
    assert result.returncode == 1
    assert result.stderr == "meshlet: /nonexistent/app.yaml: cannot read manifest: No such file or directory\n"


def test_json_list_as_kubectl_get_prints_it():
    """`kubectl get deploy -o json | meshlet inject -f -`: JSON is YAML; the List comes back injected."""
    deployment = yaml.safe_load((HERE / "manifests" / "bookinfo.yaml").read_text().split("---\n")[-1])
    listing = {"apiVersion": "v1", "kind": "List", "metadata": {"resourceVersion": ""}, "items": [deployment]}
    out = yaml.safe_load(inject_text(json.dumps(listing, indent=2)))
    assert out["metadata"] == {"resourceVersion": ""}
    assert out["items"][0] == inject_pod_template(deployment)


def inject_pod_template(deployment: dict) -> dict:
    obj, results = inject_document(deployment, CFG)
    assert [r.outcome for r in results] == ["injected"]
    return obj


def test_identity_from_the_service_a_projected_token_and_no_secret():
    pod = yaml.safe_load((HERE / "manifests" / "pod-with-init.yaml").read_text())
    spec = inject_pod(pod, CFG).obj["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshlet-token"]["projected"] == {"sources": [{"serviceAccountToken": {
        "audience": "meshlet", "expirationSeconds": 3600, "path": "token"}}]}
    assert volumes["meshlet-trust"]["configMap"] == {"name": "meshlet-trust-bundle",
                                                     "items": [{"key": "ca.pem", "path": "ca.pem"}]}
    assert not [v for v in spec["volumes"] if "secret" in v], "no workload key in any Secret"
    args = spec["initContainers"][1]["args"]
    flags = dict(itertools.pairwise(args))
    assert flags["--identity-server"] == "https://meshlet-identity.meshlet-system.svc:15012"
    assert flags["--identity-token"] == "/var/run/secrets/meshlet/token"
    assert flags["--trust-bundle"] == "/etc/meshlet/trust/ca.pem"
    assert "--identity" not in args


def test_identity_from_csi_driver_spiffe():
    pod = yaml.safe_load((HERE / "manifests" / "pod-with-init.yaml").read_text())
    spec = inject_pod(pod, InjectConfig(identity="csi")).obj["spec"]
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert volumes["meshlet-identity"] == {"name": "meshlet-identity",
                                           "csi": {"driver": "spiffe.csi.cert-manager.io", "readOnly": True}}
    args = spec["initContainers"][1]["args"]
    assert args[args.index("--identity") + 1] == "/etc/meshlet/identity" and "--identity-server" not in args
    result = run("inject", "-q", "-f", "-", "--identity-mode", "csi", stdin=yaml.safe_dump(pod))
    assert yaml.safe_load(result.stdout)["spec"] == spec


def test_identity_mode_none_means_no_mtls_flag_and_no_volume():
    pod = yaml.safe_load((HERE / "manifests" / "pod-with-init.yaml").read_text())
    spec = inject_pod(pod, InjectConfig(identity="none")).obj["spec"]
    assert [v["name"] for v in spec["volumes"]] == ["meshlet-tmp", "meshlet-podinfo"]
    proxy = spec["initContainers"][1]
    assert not [a for a in proxy["args"] if a.startswith("--identity")]
    assert [m["name"] for m in proxy["volumeMounts"]] == ["meshlet-tmp", "meshlet-podinfo"]
    result = run("inject", "-q", "-f", "-", "--identity-mode", "none", stdin=yaml.safe_dump(pod))
    assert yaml.safe_load(result.stdout)["spec"] == spec
