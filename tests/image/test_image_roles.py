"""Every role the chart gives the image, run inside its unpacked root file system.

The image `make image` wrote to dist/ is unpacked layer by layer (scripts/image/ociarchive.py)
and each role runs in it as a runtime would start it (image_support: unshare + chroot, read-only
root, the image's user and environment): the sidecar serving a weighted split, the init
container's iptables redirect, the webhook as the chart's UID, and the -agent variant loading
its eBPF programs. No mock: the backends, the clients and the kernel are real.
"""

from __future__ import annotations

import http.client
import re
import socket
import ssl
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from image_support import AGENT_ARCHIVE, NEEDS_ROOT, REPO, SIDECAR_ARCHIVE, unpacked

import meshlet
from meshlet.k8s.sidecar import InjectConfig, init_container, redirect_script

sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "sidecar"))
sys.path.insert(0, str(Path(__file__).parents[1] / "integration" / "k8s"))
from sidecar_support import READY, Backends, free_port, load, policy
from test_k8s_helm import find, render
from test_k8s_webhook_https import self_signed

pytestmark = [*NEEDS_ROOT, pytest.mark.timeout(180)]

SPLIT = "    - name: canary\n      to: [{backend: v1, weight: 80}, {backend: v2, weight: 20}]\n"
REQUESTS = 200
PEM_KEY = re.compile(rb"-----BEGIN [A-Z ]*PRIVATE KEY-----\r?\n[A-Za-z0-9+/=]{40,}")
COMPILERS = ("cc", "c++", "gcc", "g++", "clang", "clang++", "ld", "as", "cpp", "tcc")


@pytest.fixture(scope="module")
def sidecar_image():
    with unpacked(SIDECAR_ARCHIVE) as rootfs:
        yield rootfs


@pytest.fixture(scope="module")
def agent_image():
    with unpacked(AGENT_ARCHIVE) as rootfs:
        yield rootfs


def test_image_holds_no_tests_keys_build_venv_or_compilers(sidecar_image):
    root = sidecar_image.path
    site = root / "opt/meshlet/lib/python3.11/site-packages"
    # meshlet's tests never reach the wheel; the packages' own suites are removed (Containerfile).
    suites = [p for p in site.glob("*/*") if p.is_dir() and p.name in ("test", "tests")]
    assert suites == []
    assert not (site / "tests").exists() and sorted(p.name for p in site.glob("meshlet*")) == [
        "meshlet", f"meshlet-{meshlet.__version__}.dist-info"]
    # The venv was made in the image for the image's Python, not copied from a build machine.
    assert (root / "opt/meshlet/pyvenv.cfg").read_text().startswith("home = /usr/bin\n")
    # A compromised sidecar cannot rewrite the code it runs, even on a writable root file system.
    writable = [p for p in (root / "opt/meshlet").rglob("*")
                if not p.is_symlink() and (p.stat().st_uid != 0 or p.stat().st_mode & 0o022)]
    assert writable == []
    assert not list(root.glob("**/.venv"))
    keys = [p for p in root.rglob("*") if p.is_file() and not p.is_symlink() and PEM_KEY.search(p.read_bytes())]
    assert keys == []
    assert compilers(root) == []


def test_agent_variant_adds_bccs_libraries_but_no_compiler(agent_image):
    """bcc compiles through libclang and LLVM, which it links: no compiler program comes with them."""
    libs = agent_image.path / "usr/lib/x86_64-linux-gnu"
    assert list(libs.glob("libLLVM-*.so*")) and list(libs.glob("libclang-cpp.so*"))
    assert compilers(agent_image.path) == []


def compilers(root: Path) -> list[str]:
    bins = [root / "usr/bin", root / "usr/sbin", root / "opt/meshlet/bin"]
    found = [f"{d}/{c}" for d in bins for c in COMPILERS if (d / c).exists()]
    return found + [str(p) for p in (root / "usr/lib/gcc", root / "usr/include/linux") if p.exists()]


def test_version_as_the_image_user(sidecar_image):
    uid, _ = sidecar_image.user()
    assert uid != 0
    result = sidecar_image.run(["meshlet", "--version"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"meshlet {meshlet.__version__}"


def test_validate_the_example_policies(sidecar_image):
    files = sorted((REPO / "policies").glob("*.yaml"))
    assert files
    result = sidecar_image.run(["meshlet", "validate", *(f"/tmp/policies/{f.name}" for f in files)],
                               binds={"/tmp/policies": REPO / "policies"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert [line.split(":")[0] for line in result.stdout.splitlines()] == [f"/tmp/policies/{f.name}" for f in files]
    bad = sidecar_image.run(["meshlet", "validate", "/etc/hostname"])
    assert bad.returncode == 1


def test_both_engines_load_from_bytecode_under_O(sidecar_image):
    """A read-only root cannot cache bytecode, so what the sidecar imports under `python -O`
    must ship compiled for -O, or every start (and every worker) compiles it again."""
    script = (
        "import sys, importlib.util, uvloop, httptools, h2.connection, meshlet.proxy.lean.engine, "
        "meshlet.proxy.mitm.engine, meshlet.commands.run, kubernetes.client\n"
        "files = [m.__file__ for m in list(sys.modules.values()) if getattr(m, '__file__', None)]\n"
        "py = [f for f in files if f.endswith('.py')]\n"
        "missing = [f for f in py if not __import__('os').path.exists(importlib.util.cache_from_source(f))]\n"
        "print(len(py), missing)\n"
    )
    result = sidecar_image.run(["python", "-O", "-c", script])
    assert result.returncode == 0, result.stderr
    count, missing = result.stdout.split(" ", 1)
    assert int(count) > 500 and missing.strip() == "[]"


def test_sidecar_serves_a_weighted_split(sidecar_image, tmp_path):
    backends = Backends()
    try:
        port = {name: backends.start(name) for name in ("v1", "v2")}
        (tmp_path / "policy.yaml").write_text(policy("reviews", port, SPLIT))
        tmp_path.chmod(0o755)  # as a ConfigMap volume: readable by the Pod's user
        outbound, admin = free_port(), free_port()
        argv = ["meshlet", "run", "--policy", "/tmp/policy/policy.yaml", "--workers", "1",
                "--outbound", f"127.0.0.1:{outbound}", "--inbound", f"127.0.0.1:{free_port()}",
                "--admin", f"127.0.0.1:{admin}", "--app", f"127.0.0.1:{free_port()}"]
        with sidecar_image.start(argv, ready=READY, binds={"/tmp/policy": tmp_path}) as sidecar:
            answers = load(("127.0.0.1", outbound), REQUESTS)
            ready = http.client.HTTPConnection("127.0.0.1", admin, timeout=10)
            ready.request("GET", "/readyz")
            assert ready.getresponse().status == 200
            ready.close()
        assert sidecar.process.returncode == 0, sidecar.stderr()  # SIGTERM drains and exits cleanly
    finally:
        backends.close()
    counts = Counter(a.backend for a in answers if not isinstance(a, Exception) and a.status == 200)
    assert sum(counts.values()) == REQUESTS, answers[:3]
    # 80/20 of 200: v2 expects 40 (sd 5.7); 15..65 fails by chance about once in 10^5 runs.
    assert 15 <= counts["v2"] <= 65, counts


def test_init_container_installs_the_redirect(sidecar_image):
    """The injected init container's script, with its capabilities only, in a fresh network namespace."""
    init = init_container(InjectConfig())
    caps = init["securityContext"]["capabilities"]["add"]
    script = redirect_script(InjectConfig()) + "iptables -w 5 -t nat -S\n"
    result = sidecar_image.run(["/bin/sh", "-c", script], uid=init["securityContext"]["runAsUser"], net=True,
                               caps=caps)
    assert result.returncode == 0, result.stderr
    cfg = InjectConfig()
    assert f"-A MESHLET_OUTPUT -m owner --uid-owner {cfg.uid} -j RETURN" in result.stdout
    assert f"-A MESHLET_INBOUND -p tcp -j REDIRECT --to-ports {cfg.inbound_port}" in result.stdout
    without_caps = sidecar_image.run(["/bin/sh", "-c", script], uid=0, net=True, caps=[])
    assert without_caps.returncode != 0  # the capabilities are what makes it work, not root alone


def test_webhook_serves_as_the_charts_uid(sidecar_image, tmp_path):
    deployment = find(render(), "Deployment", "mesh-meshlet-webhook")["spec"]["template"]["spec"]
    uid = deployment["securityContext"]["runAsUser"]
    assert sidecar_image.passwd(str(uid)), f"UID {uid} has no /etc/passwd entry in the image"
    cert, _ = self_signed(tmp_path)
    tmp_path.chmod(0o755)  # as the chart's Secret volume: readable by the webhook's user
    port = free_port()
    args = [a for a in deployment["containers"][0]["args"] if not a.startswith(("--tls-", "--port"))]
    argv = ["meshlet", *args, "--tls-cert=/tmp/tls/tls.crt", "--tls-key=/tmp/tls/tls.key", "--host=127.0.0.1",
            f"--port={port}"]
    with sidecar_image.start(argv, ready=re.compile(r"serving https://"), uid=uid, binds={"/tmp/tls": tmp_path}):
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=10,
                                           context=ssl.create_default_context(cafile=str(cert)))
        conn.request("GET", "/healthz")
        assert conn.getresponse().status == 200
        conn.close()


def test_agent_variant_loads_its_ebpf_programs(agent_image):
    """The -agent variant with the node's kernel headers and /sys mounted as the chart mounts them:
    bcc compiles bpf/*.c with the image's LLVM, and a real connection shows in its histograms."""
    pins = f"/sys/fs/bpf/image-test-{uuid.uuid4().hex[:8]}"
    metrics = free_port()
    with socket.create_server(("127.0.0.1", 0)) as server:
        watched = server.getsockname()[1]
        argv = ["meshlet", "agent", "--ports", str(watched), "--metrics", f"127.0.0.1:{metrics}", "--pin-dir", pins]
        try:
            with agent_image.start(argv, ready=re.compile(r"agent: ready"), uid=0, timeout=120,
                                   binds={"/lib/modules": Path("/lib/modules"), "/usr/src": Path("/usr/src")},
                                   rbinds={"/sys": Path("/sys")}) as agent:
                socket.create_connection(("127.0.0.1", watched), timeout=5).close()
                count = scrape(metrics, "meshlet_tcp_connect_latency_seconds_count",
                               {"port": str(watched), "direction": "out"})
            assert agent.process.returncode == 0, agent.stderr()
        finally:
            if Path(pins).exists():
                for pin in Path(pins).iterdir():
                    pin.unlink()
                Path(pins).rmdir()
    assert count >= 1


def scrape(port: int, name: str, labels: dict[str, str], attempts: int = 50) -> float:
    """The value of one series once it appears (the agent reads its maps on each scrape)."""
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for _ in range(attempts):
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
        conn.close()
        for line in body.splitlines():
            series, _, value = line.rpartition(" ")
            if series.startswith(name + "{") and wanted <= set(series[len(name) + 1:-1].split(",")):
                return float(value)
        time.sleep(0.1)
    raise AssertionError(f"{name}{labels} never appeared in:\n{body[-2000:]}")
