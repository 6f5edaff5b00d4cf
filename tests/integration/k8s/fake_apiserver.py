"""A small fake of kube-apiserver's custom-object endpoints, for tests only.

A real kube-apiserver (with etcd) cannot run on this machine, so this stands in for it — the
ONLY faked part: the client is the official `kubernetes` package over real HTTP on loopback.
It keeps objects with resourceVersion/generation, does server-side apply (create or replace
spec, bumping versions only on change), merge-patches status, and streams watch events.
It also keeps coordination.k8s.io/v1 Leases (GET, POST, PUT), refusing with 409 Conflict a PUT
whose resourceVersion is not the stored one and a POST of a Lease that exists, as etcd's
compare-and-swap makes kube-apiserver do: that is what leader election relies on.

For the node agent it serves core/v1 Pods, Services and Nodes too (`put_core`, as the
kubelet, controllers and kubectl would write them): list and watch across all namespaces,
Pods filtered by the `spec.nodeName` field selector, a Node by name; and lists and watches of
the namespaced custom objects across all namespaces (`/apis/meshlet.dev/v1alpha1/trafficpolicies`).
And it answers authentication.k8s.io/v1 TokenReviews (POST) for the tokens a test minted with
`service_account_token`, as kube-apiserver does for projected ServiceAccount tokens: unknown or
revoked tokens and tokens for none of the requested audiences come back `authenticated: false`
with an error, a valid one with the ServiceAccount's username and the matching audiences.
"""

from __future__ import annotations

import copy
import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

PREFIX = "/apis/meshlet.dev/v1alpha1/"
CORE = "/api/v1/"
LEASES = "/apis/coordination.k8s.io/v1/namespaces/"
TOKEN_REVIEWS = "/apis/authentication.k8s.io/v1/tokenreviews"
PLURALS = {"TrafficPolicy": "trafficpolicies", "QoSPolicy": "qospolicies", "Pod": "pods", "Service": "services",
           "Node": "nodes"}
NAMESPACED = frozenset({"trafficpolicies", "pods", "services"})


def selected(plural: str, namespace: str, query: dict, obj_plural: str, obj_namespace: str, obj: dict) -> bool:
    """Whether a list or watch of `plural` (in `namespace`, "" for all) with `query`'s field selector has obj."""
    if obj_plural != plural:
        return False
    if (namespace or plural not in NAMESPACED) and obj_namespace != namespace:
        return False  # a namespace's list, or a cluster-scoped kind; else every namespace
    for term in filter(None, query.get("fieldSelector", [""])[0].split(",")):
        field, _, value = term.partition("=")
        found: object = obj
        for part in field.split("."):
            found = found.get(part) if isinstance(found, dict) else None
        if str(found) != value.lstrip("="):
            return False
    return True


class FakeApiServer:
    """`host`/`port`: where it listens (a peer network namespace's address, for the Pod tests)."""

    def __init__(self, token: str = "test-token", host: str = "127.0.0.1", port: int = 0):
        self.token = token
        self.objects: dict[tuple[str, str, str], dict] = {}  # (plural, namespace, name) → object
        self.leases: dict[tuple[str, str], dict] = {}  # (namespace, name) → Lease
        self.tokens: dict[str, tuple[str, tuple[str, ...]]] = {}  # token → (username, audiences)
        self.reviews: list[dict] = []  # the TokenReview specs received
        self.events: list[tuple[int, str, str, str, dict]] = []  # (rv, type, plural, namespace, object)
        self.requests: list[tuple[str, str, str]] = []  # (method, path?query, content type)
        self.version = 100
        self.gone = False  # the next watch request gets 410 Gone
        self.epoch = 0  # bumped to end open watches
        self.changed = threading.Condition()
        self.closing = False
        self.server = ThreadingHTTPServer((host, port), self._handler())
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> FakeApiServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        with self.changed:
            self.closing = True
            self.changed.notify_all()
        self.server.shutdown()
        self.server.server_close()

    # -- what other actors (kubectl, controllers) do -------------------------------------------

    def put_core(self, obj: dict) -> dict:
        """Create or replace a Pod, Service or Node whole (status too), keeping a given uid."""
        obj = copy.deepcopy(obj)
        meta = obj["metadata"]
        plural = PLURALS[obj["kind"]]
        namespace = meta.get("namespace", "") if plural in NAMESPACED else ""
        key = (plural, namespace, meta["name"])
        with self.changed:
            old = self.objects.get(key)
            self.version += 1
            meta["resourceVersion"] = str(self.version)
            meta.setdefault("uid", old["metadata"]["uid"] if old else str(uuid.uuid4()))
            self.objects[key] = obj
            self._emit("MODIFIED" if old else "ADDED", plural, namespace, obj)
            return copy.deepcopy(obj)

    def put(self, obj: dict) -> dict:
        """Create or update an object as another client would; returns the stored object."""
        meta = obj["metadata"]
        plural = PLURALS[obj["kind"]]
        with self.changed:
            stored, _ = self._apply(plural, meta.get("namespace", ""), meta["name"], obj)
            return copy.deepcopy(stored)

    def delete(self, plural: str, namespace: str, name: str) -> None:
        with self.changed:
            obj = self.objects.pop((plural, namespace, name))
            self.version += 1
            obj["metadata"]["resourceVersion"] = str(self.version)
            self._emit("DELETED", plural, namespace, obj)

    def expire_history(self) -> None:
        """As after etcd compaction: open watches end and the next one gets 410 Gone."""
        with self.changed:
            self.gone = True
            self.epoch += 1
            self.changed.notify_all()

    def service_account_token(self, namespace: str, name: str, audiences: tuple[str, ...] = ("meshlet",)) -> str:
        """A token as the kubelet projects it for a Pod running as ServiceAccount NAMESPACE/NAME."""
        token = f"sa-{namespace}-{name}-{uuid.uuid4().hex}"
        with self.changed:
            self.tokens[token] = (f"system:serviceaccount:{namespace}:{name}", audiences)
        return token

    def revoke(self, token: str) -> None:
        """As when the Pod or ServiceAccount the token is bound to is deleted."""
        with self.changed:
            self.tokens.pop(token, None)

    def _review(self, spec: dict) -> dict:
        wanted = spec.get("audiences") or ["https://kubernetes.default.svc"]
        known = self.tokens.get(spec.get("token", ""))
        if known is None:
            return {"authenticated": False, "error": "[invalid bearer token, token has been invalidated]"}
        username, audiences = known
        matching = [a for a in wanted if a in audiences]
        if not matching:
            return {"authenticated": False,
                    "error": f"[invalid bearer token, token audiences {list(audiences)} is invalid for the target "
                             f"audiences {wanted}]"}
        namespace = username.split(":")[2]
        return {"authenticated": True, "audiences": matching,
                "user": {"username": username, "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, username)),
                         "groups": ["system:serviceaccounts", f"system:serviceaccounts:{namespace}",
                                    "system:authenticated"]}}

    def get(self, plural: str, namespace: str, name: str) -> dict | None:
        with self.changed:
            return copy.deepcopy(self.objects.get((plural, namespace, name)))

    # -- the API ---------------------------------------------------------------------------------

    def _emit(self, kind: str, plural: str, namespace: str, obj: dict) -> None:
        self.events.append((self.version, kind, plural, namespace, copy.deepcopy(obj)))
        self.changed.notify_all()

    def _apply(self, plural: str, namespace: str, name: str, body: dict) -> tuple[dict, int]:
        key = (plural, namespace, name)
        old = self.objects.get(key)
        labels = body.get("metadata", {}).get("labels")
        if old is not None and old.get("spec") == body.get("spec") and old["metadata"].get("labels") == labels:
            return old, 200
        self.version += 1
        meta = {"name": name, "resourceVersion": str(self.version),
                "uid": old["metadata"]["uid"] if old else str(uuid.uuid4()),
                "generation": old["metadata"]["generation"] + 1 if old else 1,
                "creationTimestamp": "2026-01-01T00:00:00Z"}
        if namespace:
            meta["namespace"] = namespace
        if labels is not None:
            meta["labels"] = labels
        new = {"apiVersion": body["apiVersion"], "kind": body["kind"], "metadata": meta, "spec": body.get("spec")}
        if old and "status" in old:
            new["status"] = old["status"]
        self.objects[key] = new
        self._emit("MODIFIED" if old else "ADDED", plural, namespace, new)
        return new, 200 if old else 201

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def _route(self) -> tuple[str, str, str, bool, dict] | None:
                url = urlsplit(self.path)
                fake.requests.append((self.command, self.path, self.headers.get("Content-Type", "")))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._send(401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
                    return None
                prefix = next((p for p in (PREFIX, CORE) if url.path.startswith(p)), None)
                if prefix is None:
                    self._send(404, {"kind": "Status", "code": 404, "message": f"no route {url.path}"})
                    return None
                parts = url.path[len(prefix):].split("/")
                namespace = ""
                if parts[0] == "namespaces":
                    namespace, parts = parts[1], parts[2:]
                plural, name = parts[0], parts[1] if len(parts) > 1 else ""
                status = len(parts) > 2 and parts[2] == "status"
                return plural, namespace, name, status, parse_qs(url.query)

            def _lease(self) -> None:
                """GET, POST (create) or PUT (replace, compare-and-swap on resourceVersion) a Lease."""
                fake.requests.append((self.command, self.path, self.headers.get("Content-Type", "")))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._send(401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
                    return
                parts = urlsplit(self.path).path[len(LEASES):].split("/")  # NS/leases[/NAME]
                namespace, name = parts[0], parts[2] if len(parts) > 2 else ""
                body = None
                if self.command != "GET":
                    body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                    name = name or body["metadata"]["name"]
                with fake.changed:
                    stored = fake.leases.get((namespace, name))
                    if self.command == "GET" or (self.command == "PUT" and stored is None):
                        if stored is None:
                            self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound",
                                             "message": f'leases.coordination.k8s.io "{name}" not found'})
                        else:
                            self._send(200, copy.deepcopy(stored))
                        return
                    assert body is not None
                    if self.command == "POST" and stored is not None:
                        self._send(409, {"kind": "Status", "code": 409, "reason": "AlreadyExists",
                                         "message": f'leases.coordination.k8s.io "{name}" already exists'})
                        return
                    if stored is not None and body["metadata"].get("resourceVersion") != \
                            stored["metadata"]["resourceVersion"]:
                        self._send(409, {"kind": "Status", "code": 409, "reason": "Conflict",
                                         "message": f'Operation cannot be fulfilled on leases.coordination.k8s.io '
                                                    f'"{name}": the object has been modified'})
                        return
                    fake.version += 1
                    meta = {**body["metadata"], "name": name, "namespace": namespace,
                            "resourceVersion": str(fake.version)}
                    lease = {"apiVersion": "coordination.k8s.io/v1", "kind": "Lease", "metadata": meta,
                             "spec": body.get("spec") or {}}
                    fake.leases[(namespace, name)] = lease
                    self._send(201 if stored is None else 200, copy.deepcopy(lease))

            def do_POST(self) -> None:
                if self.path.startswith(TOKEN_REVIEWS):
                    self._token_review()
                else:
                    self._lease_only()

            def _token_review(self) -> None:
                """Only an authenticated caller may ask (kube-apiserver also checks RBAC: auth-delegator)."""
                fake.requests.append((self.command, self.path, self.headers.get("Content-Type", "")))
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    self._send(401, {"kind": "Status", "code": 401, "message": "Unauthorized"})
                    return
                with fake.changed:
                    fake.reviews.append(body.get("spec") or {})
                    status = fake._review(body.get("spec") or {})
                self._send(201, {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview",
                                 "metadata": {"creationTimestamp": None}, "spec": body.get("spec"),
                                 "status": status})

            def do_PUT(self) -> None:
                self._lease_only()

            def _lease_only(self) -> None:
                if self.path.startswith(LEASES):
                    self._lease()
                else:
                    self._send(405, {"kind": "Status", "code": 405, "message": f"{self.command} not faked here"})

            def do_GET(self) -> None:
                if self.path.startswith(LEASES):
                    self._lease()
                    return
                route = self._route()
                if route is None:
                    return
                plural, namespace, name, _, query = route
                if name:
                    obj = fake.get(plural, namespace, name)
                    if obj is None:
                        self._send(404, {"kind": "Status", "code": 404, "reason": "NotFound",
                                         "message": f'{plural}.meshlet.dev "{name}" not found'})
                    else:
                        self._send(200, obj)
                elif query.get("watch") == ["true"]:
                    self._watch(plural, namespace, query)
                else:
                    with fake.changed:
                        items = [copy.deepcopy(o) for (p, ns, _), o in sorted(fake.objects.items())
                                 if selected(plural, namespace, query, p, ns, o)]
                        version = str(fake.version)
                    self._send(200, {"apiVersion": "meshlet.dev/v1alpha1", "kind": "TrafficPolicyList",
                                     "metadata": {"resourceVersion": version}, "items": items})

            def do_PATCH(self) -> None:
                route = self._route()
                if route is None:
                    return
                plural, namespace, name, status, query = route
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                content_type = self.headers.get("Content-Type", "")
                with fake.changed:
                    if status:
                        obj = fake.objects.get((plural, namespace, name))
                        if obj is None:
                            self._send(404, {"kind": "Status", "code": 404, "message": "not found"})
                            return
                        fake.version += 1
                        obj["status"] = {**(obj.get("status") or {}), **body["status"]}  # a merge patch
                        obj["metadata"]["resourceVersion"] = str(fake.version)
                        fake._emit("MODIFIED", plural, namespace, obj)
                        self._send(200, copy.deepcopy(obj))
                        return
                    if content_type != "application/apply-patch+yaml" or query.get("fieldManager") is None:
                        self._send(415, {"kind": "Status", "code": 415, "message": "expected server-side apply"})
                        return
                    if "spec" not in body:
                        self._send(422, {"kind": "Status", "code": 422, "reason": "Invalid",
                                         "message": "spec: Required value"})
                        return
                    obj, code = fake._apply(plural, namespace, name, body)
                    self._send(code, copy.deepcopy(obj))

            def _watch(self, plural: str, namespace: str, query: dict) -> None:
                since = int(query.get("resourceVersion", ["0"])[0] or 0)
                timeout = min(float(query.get("timeoutSeconds", ["5"])[0]), 5.0)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Connection", "close")
                # Chunked, as kube-apiserver streams: a client reading a body without length waits
                # for its buffer to fill or the connection to close, so each event arrives at once.
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                try:
                    self._stream(since, timeout, plural, namespace, query)
                finally:
                    self._chunk(b"")
                self.close_connection = True

            def _stream(self, since: int, timeout: float, plural: str, namespace: str, query: dict) -> None:
                with fake.changed:
                    gone, fake.gone, epoch = fake.gone, False, fake.epoch
                if gone:
                    self._line({"type": "ERROR", "object": {"kind": "Status", "code": 410, "reason": "Expired",
                                                            "message": "too old resource version"}})
                    return
                sent = since
                end = time.monotonic() + timeout
                with fake.changed:
                    while not fake.closing and fake.epoch == epoch:
                        for version, kind, p, ns, obj in fake.events:
                            if version > sent and selected(plural, namespace, query, p, ns, obj):
                                self._line({"type": kind, "object": obj})
                        sent = fake.version
                        remaining = end - time.monotonic()
                        if remaining <= 0:
                            break
                        fake.changed.wait(remaining)

            def _line(self, event: dict) -> None:
                self._chunk(json.dumps(event).encode() + b"\n")

            def _chunk(self, data: bytes) -> None:
                try:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                    self.wfile.flush()
                except OSError:
                    pass

            def _send(self, code: int, body: dict) -> None:
                data = json.dumps(body).encode()
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        return Handler


def kubeconfig(path, servers: dict[str, FakeApiServer], current: str, namespace: str = "default") -> str:
    """A kubeconfig file with one context per fake server, named after the dict keys."""
    config = {
        "apiVersion": "v1", "kind": "Config", "current-context": current,
        "clusters": [{"name": n, "cluster": {"server": s.url}} for n, s in servers.items()],
        "users": [{"name": n, "user": {"token": s.token}} for n, s in servers.items()],
        "contexts": [{"name": n, "context": {"cluster": n, "user": n, "namespace": namespace}} for n in servers],
    }
    path.write_text(json.dumps(config))
    return str(path)
