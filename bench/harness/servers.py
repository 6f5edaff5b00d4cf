"""Configurations of the reference servers: nginx as the backends, HAProxy as the reference proxy."""

from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

from harness.procs import free_port, service


def start_backends(stack: contextlib.ExitStack, work: Path) -> dict[str, int]:
    """nginx serving backends v1 and v2 on free ports until `stack` closes; their ports by name."""
    backends = {"v1": free_port(), "v2": free_port()}
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    stack.enter_context(service("nginx", [nginx, "-c", str(nginx_conf(work, backends)), "-p", str(work)],
                                list(backends.values()), work / "nginx.log"))
    return backends


def nginx_conf(workdir: Path, ports: dict[str, int], hosts: dict[str, str] | None = None) -> Path:
    """One nginx worker serving each named backend on its port (and address: `hosts`, default
    loopback) with a tiny fixed body."""
    servers = "\n".join(
        f"    server {{ listen {(hosts or {}).get(name, '127.0.0.1')}:{port} reuseport; keepalive_requests 1000000; "
        f"location / {{ return 200 '{name}\\n'; }} }}"
        for name, port in ports.items()
    )
    conf = workdir / "nginx.conf"
    conf.write_text(f"""\
daemon off;
master_process off;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {workdir}/body;
    proxy_temp_path {workdir}/proxy;
    fastcgi_temp_path {workdir}/fastcgi;
    uwsgi_temp_path {workdir}/uwsgi;
    scgi_temp_path {workdir}/scgi;
    default_type text/plain;
{servers}
}}
""")
    return conf


def haproxy_conf(workdir: Path, port: int, backends: dict[str, tuple[int, int]], threads: int = 1) -> Path:
    """HAProxy doing the same weighted split as the meshlet policy: name → (port, weight).

    `threads` (nbthread) is what a meshlet target of as many `--workers` is compared with."""
    servers = "\n".join(
        f"    server {name} 127.0.0.1:{backend_port} weight {weight}"
        for name, (backend_port, weight) in backends.items()
    )
    conf = workdir / "haproxy.cfg"
    conf.write_text(f"""\
global
    nbthread {threads}
defaults
    mode http
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    option http-keep-alive
frontend fe
    bind 127.0.0.1:{port}
    default_backend be
backend be
    balance roundrobin
    http-reuse always
{servers}
""")
    return conf


def meshlet_policy(
    workdir: Path, backends: dict[str, tuple[int, int]], tls: str = "none", identity: str = "", spec: str = ""
) -> Path:
    """The canary policy every proxy under test applies: host `reviews`, the same weights as HAProxy.

    `tls: mesh` backends expect `identity`; `spec` adds lines under `spec:` (`dataplane: kernel`, a `vip`)."""
    more = f', identity: "{identity}"' if identity else ""
    lines = [f'    {name}: {{address: "127.0.0.1:{port}", tls: {tls}{more}}}' for name, (port, _) in backends.items()]
    targets = ", ".join(f"{{backend: {name}, weight: {weight}}}" for name, (_, weight) in backends.items())
    policy = workdir / "policy.yaml"
    header = "apiVersion: meshlet.dev/v1alpha1\nkind: TrafficPolicy\nmetadata: {name: reviews}\n"
    header += "spec:\n  host: reviews\n" + "".join(f"  {line}\n" for line in spec.splitlines())
    routes = f"  routes:\n    - name: canary\n      to: [{targets}]\n"
    policy.write_text(header + "  backends:\n" + "\n".join(lines) + "\n" + routes)
    return policy
