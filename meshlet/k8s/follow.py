"""`meshlet run --watch-kube`: feed the namespace's TrafficPolicies to the sidecar's own admin API.

The watch (`kube.watch_policies`) decides what is valid and writes status conditions; each
new set is then PUT to `/policy` on this sidecar's admin port, so a watched policy takes the
very path of `meshlet apply`: validated again, compiled, reconciled with rollouts, handed to
every `--workers` process, then swapped in. The watch runs in a daemon thread beside the
sidecar's event loop, so a slow or unreachable API server never delays a request.

The sidecar is ready with an empty pass-through table before the first list answers. In an
injected Pod the app starts only once the sidecar's startup probe passes; waiting for the API
server there would turn an API outage (or a namespace with no policy yet) into Pods that never
start, while passing traffic through unshaped for the moment of the first list loses nothing.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request

from meshlet.k8s.kube import Cluster, watch_policies
from meshlet.policy.model import PolicySet

log = logging.getLogger("meshlet.kube")
PUT_TIMEOUT = 30.0


def admin_url(admin: str) -> str:
    """The admin listener as the ready line prints it (`HOST:PORT`), reachable from this host."""
    host, _, port = admin.rpartition(":")
    host = host.strip("[]")
    if host in ("0.0.0.0", "", "::"):
        host = "127.0.0.1"
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def put_policy(url: str, source: str) -> str:
    """PUT the set's text; the line to log (the sidecar may still refuse, e.g. mTLS without identity)."""
    request = urllib.request.Request(f"{url}/policy", data=source.encode(), method="PUT",
                                     headers={"content-type": "application/yaml"})
    try:
        with urllib.request.urlopen(request, timeout=PUT_TIMEOUT) as response:
            generation = json.loads(response.read()).get("generation")
        return f"watch-kube: table generation {generation} in use"
    except urllib.error.HTTPError as e:
        try:
            errors = json.loads(e.read()).get("errors") or [e.reason]
        except ValueError:
            errors = [e.reason]
        return f"watch-kube: the sidecar refused the set ({e.code}), old table kept: {'; '.join(errors)}"
    except OSError as e:
        return f"watch-kube: cannot reach the admin API at {url}: {e}"


def follow(cluster: Cluster, admin: str, namespace: str | None = None) -> threading.Event:
    """Start watching in a daemon thread; set the returned event to stop it."""
    url, stop = admin_url(admin), threading.Event()

    def on_policies(policies: PolicySet, source: str) -> None:
        log.info("%s", put_policy(url, source))

    thread = threading.Thread(target=watch_policies, name="watch-kube", daemon=True,
                              args=(cluster, on_policies, stop, log.info), kwargs={"namespace": namespace})
    thread.start()
    log.info("watch-kube: watching TrafficPolicies in namespace %s", namespace or cluster.namespace)
    return stop
