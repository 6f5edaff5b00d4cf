"""The Helm chart, rendered by the real `helm` binary (scripts/setup installs it into the venv)
and checked with kubernetes-validate --strict; and kept consistent with `meshlet inject`.

No cluster runs here, so "installs" means: `helm lint --strict` passes, every rendered object
passes the Kubernetes schema, and what the chart configures agrees with meshlet's own code.
"""

from __future__ import annotations

import argparse
import base64
import shutil
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from cryptography import x509

from meshlet.cli import build_parser
from meshlet.k8s import crd, flags
from meshlet.k8s.sidecar import InjectConfig, Resources

REPO = Path(__file__).parents[3]
CHART = REPO / "helm" / "meshlet"
HELM = shutil.which("helm", path=str(Path(sys.executable).parent)) or shutil.which("helm")
pytestmark = pytest.mark.skipif(HELM is None, reason="needs the helm binary (scripts/setup installs it into .venv/bin)")


def render(*values: str, crds: bool = False) -> list[dict]:
    args = [HELM, "template", "mesh", str(CHART), "--namespace", "meshlet-system"]
    args += [a for v in values for a in ("--set", v)] + (["--include-crds"] if crds else [])
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def find(docs: list[dict], kind: str, name: str | None = None) -> dict:
    matches = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(matches) == 1, f"expected one {kind} {name or ''}, got {len(matches)}"
    return matches[0]


def test_helm_lint_strict():
    result = subprocess.run([HELM, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("values", [(), ("webhook.failOpen=false", "agent.interface=eth1", "rbac.sidecarNamespaces={a,b}",
                                         "agent.accelerate=true")], ids=["defaults", "variant"])
def test_every_rendered_object_passes_strict_kubernetes_schema(values):
    docs = render(*values, crds=True)
    assert {d["kind"] for d in docs} >= {
        "CustomResourceDefinition", "ServiceAccount", "Secret", "Service", "Deployment", "DaemonSet",
        "MutatingWebhookConfiguration", "ClusterRole", "RoleBinding", "ConfigMap", "PodDisruptionBudget",
        "ClusterRoleBinding",
    }
    for doc in docs:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
        kubernetes_validate.validate(doc, "1.29.0", strict=True)


def test_chart_crds_are_the_generated_ones():
    docs = render(crds=True)
    for kind in ("TrafficPolicy", "QoSPolicy"):
        generated = crd.crd(kind)
        assert find(docs, "CustomResourceDefinition", generated["metadata"]["name"]) == generated


def proxy_values_to_config(values: dict, identity_server: str) -> InjectConfig:
    proxy = values["proxy"]
    r = proxy["resources"]
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    image = proxy["image"] or f"{values['image']['repository']}:{values['image']['tag'] or chart['appVersion']}"
    return InjectConfig(
        image=image, image_pull_policy=proxy["imagePullPolicy"],
        resources=Resources(r["requests"]["cpu"], r["requests"]["memory"],
                            r.get("limits", {}).get("cpu"), r.get("limits", {}).get("memory")),
        uid=proxy["uid"], workers=proxy["workers"], outbound_port=proxy["ports"]["outbound"], inbound_port=proxy["ports"]["inbound"],
        admin_port=proxy["ports"]["admin"], health_port=proxy["ports"]["health"],
        identity=proxy["identity"]["mode"], identity_server=identity_server,
        trust_bundle=proxy["identity"]["trustBundleConfigMap"],
        metrics_compat=proxy["metricsCompat"], merge_metrics=proxy["mergeMetrics"],
    )


# `helm template mesh ...` names the identity Service after the release "mesh".
MESH_IDENTITY = "https://mesh-meshlet-identity.meshlet-system.svc:15012"


def test_values_mirror_inject_defaults():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    server = f"https://meshlet-identity.meshlet-system.svc:{values['identity']['port']}"
    assert proxy_values_to_config(values, server) == InjectConfig()


def test_meshlet_inject_defaults_reach_the_identity_service_of_the_readme_install():
    """`helm install meshlet helm/meshlet -n meshlet-system` (the README) serves at InjectConfig's default URL."""
    args = [HELM, "template", "meshlet", str(CHART), "--namespace", "meshlet-system"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    service = find(docs, "Service", "meshlet-identity")
    url = f"https://{service['metadata']['name']}.meshlet-system.svc:{service['spec']['ports'][0]['port']}"
    assert url == InjectConfig().identity_server


def webhook_config(docs: list[dict]) -> tuple[InjectConfig, bool]:
    """Parse the rendered webhook's args with meshlet's own parser, as the container would."""
    container = find(docs, "Deployment", "mesh-meshlet-webhook")["spec"]["template"]["spec"]["containers"][0]
    assert container["command"] == ["meshlet"]
    args = build_parser().parse_args(container["args"])
    assert args.handler.__module__ == "meshlet.commands.webhook"
    return flags.config_from_args(args), args.fail_open


def test_webhook_injects_with_the_same_config_as_meshlet_inject():
    config, fail_open = webhook_config(render())
    assert config == InjectConfig(identity_server=MESH_IDENTITY)
    assert fail_open is True


def test_proxy_values_reach_the_webhook():
    docs = render("proxy.image=reg.example/meshlet:7", "proxy.resources.limits.cpu=null", "proxy.uid=2000",
                  "proxy.ports.admin=16000", "webhook.failOpen=false", "proxy.metricsCompat=none",
                  "proxy.mergeMetrics=false")
    config, fail_open = webhook_config(docs)
    assert config == InjectConfig(image="reg.example/meshlet:7", resources=Resources("50m", "64Mi", None, "256Mi"),
                                  uid=2000, admin_port=16000, identity_server=MESH_IDENTITY, metrics_compat="none",
                                  merge_metrics=False)
    assert fail_open is False
    hook = find(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert hook["failurePolicy"] == "Fail"


def test_one_repository_value_moves_every_image():
    """After pushing `make image`'s archives to a registry, image.repository is the only value to set."""
    docs = render("image.repository=reg.example/mesh/meshlet", "image.tag=v7")
    config, _ = webhook_config(docs)
    assert config.image == "reg.example/mesh/meshlet:v7"
    for deployment in ("mesh-meshlet-webhook", "mesh-meshlet-identity"):  # one image for every role
        containers = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        assert containers[0]["image"] == "reg.example/mesh/meshlet:v7", deployment
    agent = find(docs, "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    assert agent["image"] == "reg.example/mesh/meshlet:v7-agent"
    assert find(render("agent.image=other/agent:1"), "DaemonSet")["spec"]["template"]["spec"]["containers"][0][
        "image"] == "other/agent:1"


def test_webhook_configuration_points_at_the_service_with_a_matching_ca():
    docs = render()
    hook = find(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    service = find(docs, "Service", "mesh-meshlet-webhook")
    assert hook["clientConfig"]["service"] == {
        "name": service["metadata"]["name"], "namespace": "meshlet-system", "path": "/mutate", "port": 443}
    assert hook["namespaceSelector"] == {"matchLabels": {"meshlet.dev/inject": "enabled"}}
    assert hook["rules"][0]["resources"] == ["pods"] and hook["rules"][0]["operations"] == ["CREATE"]
    ca = x509.load_pem_x509_certificate(base64.b64decode(hook["clientConfig"]["caBundle"]))
    secret = find(docs, "Secret", f"{service['metadata']['name']}-tls")
    serving = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["tls.crt"]))
    serving.verify_directly_issued_by(ca)
    names = serving.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert f"{service['metadata']['name']}.meshlet-system.svc" in names
    port = find(docs, "Deployment", "mesh-meshlet-webhook")["spec"]["template"]["spec"]["containers"][0]["ports"][0]
    assert service["spec"]["ports"][0]["targetPort"] == port["name"]


def test_provided_webhook_certificate_is_used(tmp_path):
    from test_k8s_webhook_https import self_signed  # a real certificate, as an operator would bring

    cert, key = self_signed(tmp_path)
    result = subprocess.run(
        [HELM, "template", "mesh", str(CHART), "--set-file", f"webhook.tls.cert={cert}",
         "--set-file", f"webhook.tls.key={key}", "--set-file", f"webhook.tls.caBundle={cert}"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    docs = [d for d in yaml.safe_load_all(result.stdout) if d]
    hook = find(docs, "MutatingWebhookConfiguration")["webhooks"][0]
    assert base64.b64decode(hook["clientConfig"]["caBundle"]).decode() == cert.read_text()
    missing_ca = subprocess.run([HELM, "template", "mesh", str(CHART), "--set-file", f"webhook.tls.cert={cert}"],
                                capture_output=True, text=True, timeout=60)
    assert missing_ca.returncode != 0
    assert "webhook.tls.caBundle is required" in missing_ca.stderr


def test_agent_is_privileged_host_network_with_kernel_mounts_and_read_only_api_access():
    docs = render()
    daemonset = find(docs, "DaemonSet")
    pod = daemonset["spec"]["template"]["spec"]
    assert pod["hostNetwork"] is True
    container = pod["containers"][0]
    assert container["securityContext"]["privileged"] is True
    assert container["securityContext"]["runAsUser"] == 0  # whatever user the image names
    assert {m["mountPath"] for m in container["volumeMounts"]} >= {
        "/sys/fs/bpf", "/sys/kernel/tracing", "/lib/modules", "/usr/src", "/run/meshlet/cgroupv2"}
    assert pod["automountServiceAccountToken"] is True
    assert container["env"] == [{"name": "NODE_NAME", "valueFrom": {"fieldRef": {"fieldPath": "spec.nodeName"}}}]
    annotations = daemonset["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == "15090"
    (binding,) = [b for b in docs if b["kind"] in ("RoleBinding", "ClusterRoleBinding")
                  and any(s.get("name") == pod["serviceAccountName"] for s in b["subjects"])]
    assert binding["kind"] == "ClusterRoleBinding" and binding["subjects"] == [
        {"kind": "ServiceAccount", "name": pod["serviceAccountName"], "namespace": "meshlet-system"}]
    role = find(docs, "ClusterRole", binding["roleRef"]["name"])
    assert role["rules"] == [
        {"apiGroups": ["meshlet.dev"], "resources": ["trafficpolicies", "qospolicies"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["pods", "services"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": [""], "resources": ["nodes"], "verbs": ["get"]},
    ], "read-only: the agent writes nothing to the API"


def test_rbac_is_least_privilege():
    docs = render("rbac.sidecarNamespaces={shop,books}")
    bindings = [d for d in docs if d["kind"] == "RoleBinding"]
    assert sorted((b["metadata"]["namespace"], b["subjects"][0]["name"]) for b in bindings) == [
        ("books", "system:serviceaccounts:books"), ("shop", "system:serviceaccounts:shop")]
    [sidecar_role] = {b["roleRef"]["name"] for b in bindings}
    assert find(docs, "ClusterRole", sidecar_role)["rules"] == [
        {"apiGroups": ["meshlet.dev"], "resources": ["trafficpolicies"], "verbs": ["get", "list", "watch"]},
        {"apiGroups": ["meshlet.dev"], "resources": ["trafficpolicies/status"], "verbs": ["patch"]},
        {"apiGroups": ["coordination.k8s.io"], "resources": ["leases"], "verbs": ["get", "create", "update"]},
    ]
    # cluster-wide: the agent's read-only role (above), and TokenReviews for the identity service only
    [delegator] = [d for d in docs if d["kind"] == "ClusterRoleBinding" and d["roleRef"]["name"] == "system:auth-delegator"]
    assert delegator["subjects"] == [{"kind": "ServiceAccount", "name": "mesh-meshlet-identity",
                                      "namespace": "meshlet-system"}]


def test_mesh_ca_secret_is_a_ca():
    secret = find(render(), "Secret", "mesh-meshlet-mesh-ca")
    ca = x509.load_pem_x509_certificate(base64.b64decode(secret["data"]["ca.pem"]))
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca is True
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


def test_pod_monitor_toggle_and_scrape_config():
    assert not [d for d in render() if d["kind"] == "PodMonitor"]
    monitors = [d for d in render("monitoring.podMonitor.enabled=true") if d["kind"] == "PodMonitor"]
    assert [m["spec"]["podMetricsEndpoints"][0]["port"] for m in monitors] == ["mesh-health", "metrics"]
    config = find(render(), "ConfigMap", "mesh-meshlet-scrape-config")
    jobs = yaml.safe_load(config["data"]["scrape-configs.yaml"])
    assert jobs == yaml.safe_load((CHART / "files" / "scrape-configs.yaml").read_text())
    assert jobs[0]["relabel_configs"][0]["source_labels"] == ["__meta_kubernetes_pod_annotation_prometheus_io_scrape"]


def test_agent_args_are_accepted_by_meshlet_agent():
    container = find(render(), "DaemonSet")["spec"]["template"]["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])
    assert args.handler.__module__ == "meshlet.commands.agent"
    assert args.kube and args.node == "$(NODE_NAME)", "the kubelet expands $(NODE_NAME) from the env"
    assert (args.cgroup_root, args.metrics, args.interface) == ("/run/meshlet/cgroupv2/kubepods.slice", ":15090", None)
    assert not args.accelerate and args.cgroup is None and args.policy == [], "acceleration is off unless asked for"
    other = find(render("agent.interface=eth1", "agent.cgroup=kubepods", "agent.cgroupfs=/sys/fs/cgroup/unified"),
                 "DaemonSet")["spec"]["template"]["spec"]
    args = build_parser().parse_args(other["containers"][0]["args"])
    assert (args.interface, args.cgroup_root) == ("eth1", "/run/meshlet/cgroupv2/kubepods")
    assert {v["name"]: v.get("hostPath", {}).get("path") for v in other["volumes"]}["cgroup"] == "/sys/fs/cgroup/unified"


@pytest.mark.parametrize(("values", "ports"), [
    ((), "15001,15006"),
    (("proxy.ports.outbound=16001",), "16001,15006"),
    (("agent.sidecarPorts={15001,15006,15010}",), "15001,15006,15010"),
])
def test_agent_accelerate_renders_flags_meshlet_agent_accepts(values, ports):
    """`agent.accelerate` is the values-level toggle; the sockmap redirect has no policy-level one
    (it changes no routing decision, only how the same bytes cross loopback)."""
    spec = find(render("agent.accelerate=true", *values), "DaemonSet")["spec"]["template"]["spec"]
    args = build_parser().parse_args(spec["containers"][0]["args"])
    assert args.accelerate and args.sidecar_ports == ports
    assert args.kube and args.cgroup is None, "every meshed Pod of the node, found under --cgroup-root"
    mounts = {m["name"]: m["mountPath"] for m in spec["containers"][0]["volumeMounts"]}
    volumes = {v["name"]: v.get("hostPath", {}).get("path") for v in spec["volumes"]}
    assert mounts["cgroup"] == "/run/meshlet/cgroupv2" and volumes["cgroup"] == "/sys/fs/cgroup"


def test_injected_sidecar_flags_are_known_to_meshlet_run():
    from meshlet.k8s.sidecar import proxy_container

    container = proxy_container(InjectConfig(), app_port=9080, workload="productpage",
                                app_metrics="http://127.0.0.1:9081/metrics")
    assert container["command"] == ["meshlet"] and container["args"][0] == "run"
    from meshlet.commands import run as run_command

    subparsers = argparse.ArgumentParser().add_subparsers()
    run_command.register(subparsers)
    run_parser = subparsers.choices["run"]
    known = {option for action in run_parser._actions for option in action.option_strings}
    used = {arg for arg in container["args"][1:] if arg.startswith("--")}
    assert used <= known
    parsed = run_parser.parse_args(container["args"][1:])  # every value parses as run would
    assert parsed.watch_kube and parsed.policy is None, "the injected sidecar follows its namespace's policies"
    assert parsed.identity is None, "no identity dir: the certificate comes from the identity service"
    assert parsed.identity_server == InjectConfig().identity_server
    assert (parsed.workload, parsed.metrics_compat, parsed.app_metrics) == (
        "productpage", "istio", "http://127.0.0.1:9081/metrics")
    assert parsed.workload_namespace == "$(POD_NAMESPACE)", "the kubelet expands it from the Downward API env"
    assert (str(parsed.identity_token), str(parsed.trust_bundle)) == ("/var/run/secrets/meshlet/token",
                                                                      "/etc/meshlet/trust/ca.pem")


def test_the_done_when_pipeline():
    """Issue 7's acceptance line, verbatim: helm template helm/meshlet | kubernetes-validate --strict."""
    validate = Path(sys.executable).parent / "kubernetes-validate"
    result = subprocess.run(f"set -o pipefail; {HELM} template helm/meshlet | {validate} --strict -", shell=True,
                            executable="/bin/bash", cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "passed for resource mutatingwebhookconfiguration/" in result.stdout


@pytest.mark.parametrize(("value", "error"), [
    ("proxy.ports.admin=70000", "/proxy/ports/admin"),
    ("proxy.resources.requests.cpu=lots", "/proxy/resources/requests/cpu"),
    ("proxy.imagee=typo", "additional properties 'imagee' not allowed"),
    ("agent.interface=a/b", "/agent/interface"),
    ("agent.cgroup=/sys/fs/cgroup", "/agent/cgroup"),
    ("agent.cgroupfs=sys/fs/cgroup", "/agent/cgroupfs"),
    ("agent.sidecarPorts={0}", "/agent/sidecarPorts/0"),
    ("proxy.metricsCompat=prom", "/proxy/metricsCompat"),
])
def test_values_schema_refuses_bad_values_with_their_path(value, error):
    result = subprocess.run([HELM, "template", "mesh", str(CHART), "--set", value], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode != 0
    assert error in result.stderr


def test_identity_mode_none_reaches_the_webhook_and_drops_the_identity_service():
    docs = render("proxy.identity.mode=none")
    config, _ = webhook_config(docs)
    assert config == InjectConfig(identity="none", identity_server=MESH_IDENTITY)
    assert not [d for d in docs if "identity" in d["metadata"]["name"] or d["metadata"]["name"] == "meshlet-trust-bundle"]


def identity_deployment(docs: list[dict]) -> tuple[dict, argparse.Namespace]:
    pod = find(docs, "Deployment", "mesh-meshlet-identity")["spec"]["template"]
    container = pod["spec"]["containers"][0]
    args = build_parser().parse_args(container["args"])  # as `meshlet` in the container parses them
    assert args.handler.__module__ == "meshlet.commands.identity"
    return pod, args


def test_the_identity_service_is_rendered_with_its_ca_rbac_and_service():
    docs = render("rbac.sidecarNamespaces={shop,books}")
    pod, args = identity_deployment(docs)
    assert pod["metadata"]["labels"]["meshlet.dev/inject"] == "false"
    service = find(docs, "Service", "mesh-meshlet-identity")
    container = pod["spec"]["containers"][0]
    assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["name"] == "https"
    assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
    # its serving certificate names what sidecars dial (the webhook injects that URL)
    assert args.listen == "0.0.0.0:15012" and "mesh-meshlet-identity.meshlet-system.svc" in args.san
    assert (args.ttl, args.trust_domain) == ("24h", "cluster.local")
    # the CA dir from the chart's Secret, read-only
    mount = container["volumeMounts"][0]
    assert (mount["mountPath"], mount["readOnly"]) == (str(args.ca), True)
    ca_volume = next(v for v in pod["spec"]["volumes"] if v["name"] == mount["name"])
    secret = find(docs, "Secret", ca_volume["secret"]["secretName"])
    assert set(secret["data"]) == {"ca.pem", "ca-key.pem"}
    # TokenReviews need the ServiceAccount's token, and system:auth-delegator
    account = find(docs, "ServiceAccount", pod["spec"]["serviceAccountName"])
    assert account["automountServiceAccountToken"] is True
    # each sidecar namespace gets the trust bundle: the CA the Secret holds
    bundles = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "meshlet-trust-bundle"]
    assert sorted(b["metadata"]["namespace"] for b in bundles) == ["books", "shop"]
    ca = base64.b64decode(secret["data"]["ca.pem"]).decode()
    assert {b["data"]["ca.pem"] for b in bundles} == {ca}


def test_no_workload_private_key_in_any_secret():
    """The only keys the chart stores: the mesh CA's and the webhook's serving key. Workload keys
    are generated inside each sidecar; an injected Pod mounts no Secret at all."""
    docs = render()
    stored = {(d["metadata"]["name"], key) for d in docs if d["kind"] == "Secret" for key in d["data"]}
    assert stored == {("mesh-meshlet-mesh-ca", "ca.pem"), ("mesh-meshlet-mesh-ca", "ca-key.pem"),
                      ("mesh-meshlet-webhook-tls", "tls.crt"), ("mesh-meshlet-webhook-tls", "tls.key")}
    from meshlet.k8s.inject import inject_pod

    config, _ = webhook_config(docs)
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
           "spec": {"containers": [{"name": "app", "image": "app"}]}}
    volumes = inject_pod(pod, config).obj["spec"]["volumes"]
    assert not [v for v in volumes if "secret" in v or "secret" in str(v.get("projected", ""))]
    token = next(v for v in volumes if "projected" in v)["projected"]["sources"][0]["serviceAccountToken"]
    assert token["audience"] == "meshlet"


def test_a_ca_the_user_supplies():
    docs = render("meshCA.existingSecret=corp-mesh-ca", "meshCA.bundle=PEM-OF-THE-CORP-CA")
    pod, _ = identity_deployment(docs)
    assert pod["spec"]["volumes"][0]["secret"]["secretName"] == "corp-mesh-ca"
    assert not [d for d in docs if d["kind"] == "Secret" and "mesh-ca" in d["metadata"]["name"]]
    assert find(docs, "ConfigMap", "meshlet-trust-bundle")["data"]["ca.pem"] == "PEM-OF-THE-CORP-CA"
    missing = subprocess.run([HELM, "template", "mesh", str(CHART), "--set", "meshCA.existingSecret=corp"],
                             capture_output=True, text=True, timeout=60)
    assert missing.returncode != 0 and "give its trust bundle as meshCA.bundle" in missing.stderr
