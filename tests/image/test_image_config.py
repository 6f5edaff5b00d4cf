"""The built image's configuration against what the chart and `meshlet inject` expect of it.

Reads the OCI archives `make image` wrote (dist/) and the chart as the real `helm` renders it;
no root needed. The root file system itself is tested in test_image_roles.py.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import yaml
from image_support import AGENT_ARCHIVE, REPO, SIDECAR_ARCHIVE, numeric_user, read_image

import meshlet
from meshlet.k8s.sidecar import InjectConfig, init_container, proxy_container

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "k8s"))
from test_k8s_helm import CHART, find, render, webhook_config

SIZE_TARGET = 200e6  # bytes, compressed: the target for the image every Pod pulls


def values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


WEBHOOK, IDENTITY = "mesh-meshlet-webhook", "mesh-meshlet-identity"  # the chart's Deployments (release "mesh")


def containers(docs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return find(docs, kind, name)["spec"]["template"]["spec"]["containers"]


def test_chart_defaults_name_the_images_make_image_builds():
    sidecar, agent = read_image(SIDECAR_ARCHIVE), read_image(AGENT_ARCHIVE)
    docs = render()
    assert containers(docs, "Deployment", WEBHOOK)[0]["image"] == sidecar.name
    assert containers(docs, "Deployment", IDENTITY)[0]["image"] == sidecar.name  # the identity service
    assert webhook_config(docs)[0].image == sidecar.name  # what it injects
    assert InjectConfig().image == sidecar.name  # what `meshlet inject` adds
    assert containers(docs, "DaemonSet")[0]["image"] == agent.name
    assert sidecar.name == f"localhost/meshlet:{meshlet.__version__}"
    assert agent.name == f"{sidecar.name}-agent"


def test_every_command_the_chart_runs_is_the_entrypoint():
    docs = render()
    for image in (read_image(SIDECAR_ARCHIVE), read_image(AGENT_ARCHIVE)):
        assert image.config["Entrypoint"] == ["meshlet"]
        assert "/opt/meshlet/bin" in dict(e.split("=", 1) for e in image.config["Env"])["PATH"].split(":")
    roles = (("Deployment", WEBHOOK), ("Deployment", IDENTITY), ("DaemonSet", None))
    commands = [c["command"] for kind, name in roles for c in containers(docs, kind, name)]
    commands.append(proxy_container(InjectConfig(), 8080)["command"])
    assert commands == [["meshlet"]] * 4
    assert init_container(InjectConfig())["command"][0] == "/bin/sh"  # the image's shell; test_image_roles runs it


def test_users_match_what_the_chart_runs_each_role_as():
    sidecar, agent = read_image(SIDECAR_ARCHIVE), read_image(AGENT_ARCHIVE)
    uid = values()["proxy"]["uid"]
    # The sidecar runs as the image's own user, which is the UID the Pod's iptables rules exempt.
    assert numeric_user(sidecar) == (uid, uid) == (InjectConfig().uid, InjectConfig().uid)
    assert proxy_container(InjectConfig(), None)["securityContext"]["runAsUser"] == uid
    assert numeric_user(agent) == (0, 0)
    docs = render()
    assert containers(docs, "DaemonSet")[0]["securityContext"]["runAsUser"] == 0
    for deployment in (WEBHOOK, IDENTITY):  # neither may run as root, nor as the sidecar's exempt UID
        pod = find(docs, "Deployment", deployment)["spec"]["template"]["spec"]["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] not in (0, uid), deployment


def test_labels_say_which_meshlet_and_which_commit():
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    license_ = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["license"]
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout
    for image, variant in ((read_image(SIDECAR_ARCHIVE), "sidecar"), (read_image(AGENT_ARCHIVE), "agent")):
        labels = image.config["Labels"]
        assert labels["org.opencontainers.image.version"] == chart["appVersion"] == meshlet.__version__
        assert labels["org.opencontainers.image.title"] == "meshlet"
        assert labels["org.opencontainers.image.licenses"] == license_
        assert labels["dev.meshlet.variant"] == variant
        if head.strip():  # built from this checkout: the commit, "-dirty" when files differed from it
            assert labels["org.opencontainers.image.revision"].split("-")[0] == head.strip()


def test_agent_variant_is_one_layer_on_the_sidecar_image_and_sizes():
    sidecar, agent = read_image(SIDECAR_ARCHIVE), read_image(AGENT_ARCHIVE)
    # A node running the agent and sidecars pulls the shared layers once.
    assert agent.layers[: len(sidecar.layers)] == sidecar.layers
    assert len(agent.layers) == len(sidecar.layers) + 1
    added = agent.compressed_size - sidecar.compressed_size
    print(f"\nsidecar image {sidecar.compressed_size / 1e6:.1f} MB compressed; "
          f"agent variant {agent.compressed_size / 1e6:.1f} MB (+{added / 1e6:.1f} MB: bcc, LLVM, clang)")
    assert sidecar.compressed_size <= SIZE_TARGET
    assert all(layer.media_type.endswith("tar+gzip") for layer in agent.layers)  # any containerd imports gzip
