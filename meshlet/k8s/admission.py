"""The admission webhook's core: an `admission.k8s.io/v1` AdmissionReview in, its answer out.

A pure function, kopf-style: no sockets, no clock, so every case is a fixture in a unit test
and the HTTPS server (`meshlet.k8s.server`) only moves bytes. The patch is the difference
between the Pod and `inject_pod(Pod)`, the very function `meshlet inject` uses.
"""

from __future__ import annotations

import base64
import json
from typing import Literal, NotRequired, TypedDict

from meshlet.k8s.inject import inject_pod
from meshlet.k8s.patch import diff
from meshlet.k8s.sidecar import InjectConfig

API_VERSION = "admission.k8s.io/v1"


class WebhookError(Exception):
    """The request itself is malformed (not an AdmissionReview): answered with HTTP 400."""


class GroupVersionKind(TypedDict):
    group: str
    version: str
    kind: str


class Request(TypedDict):
    uid: str
    kind: GroupVersionKind
    operation: Literal["CREATE", "UPDATE", "DELETE", "CONNECT"]
    namespace: NotRequired[str]
    name: NotRequired[str]
    object: NotRequired[dict]
    dryRun: NotRequired[bool]


class Review(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    request: Request


class Status(TypedDict):
    code: int
    message: str


class Response(TypedDict):
    uid: str
    allowed: bool
    patchType: NotRequired[Literal["JSONPatch"]]
    patch: NotRequired[str]  # base64 of the JSON Patch
    warnings: NotRequired[list[str]]
    status: NotRequired[Status]


class ReviewResponse(TypedDict):
    apiVersion: str
    kind: Literal["AdmissionReview"]
    response: Response


def parse(body: bytes) -> Review:
    """Bytes of an HTTP body → a checked AdmissionReview, or WebhookError with the reason."""
    try:
        review = json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise WebhookError(f"body is not JSON: {e}") from None
    if not isinstance(review, dict):
        raise WebhookError("body is not a JSON object")
    if review.get("apiVersion") != API_VERSION or review.get("kind") != "AdmissionReview":
        raise WebhookError(f"expected apiVersion {API_VERSION} kind AdmissionReview, got "
                           f"{review.get('apiVersion')!r} {review.get('kind')!r}")
    request = review.get("request")
    if not isinstance(request, dict):
        raise WebhookError("AdmissionReview has no request object")
    if not isinstance(request.get("uid"), str) or not request["uid"]:
        raise WebhookError("request.uid is missing")
    if not isinstance(request.get("kind"), dict):
        raise WebhookError("request.kind is missing")
    if "object" in request and not isinstance(request["object"], dict):
        raise WebhookError("request.object is not an object")
    return review  # type: ignore[return-value]  # checked field by field above


def review(request: Request, cfg: InjectConfig, *, fail_open: bool = True) -> ReviewResponse:
    """Answer one admission request: a JSONPatch injecting the sidecar, or the Pod unchanged.

    A Pod the sidecar cannot join (host network, a port clash) is admitted unchanged with a
    warning when `fail_open`, refused otherwise; an opted-out Pod is admitted silently.
    """
    uid = request["uid"]
    kind = request["kind"].get("kind")
    pod = request.get("object")
    if kind != "Pod" or request.get("operation") != "CREATE" or pod is None:
        return _answer({"uid": uid, "allowed": True})
    result = inject_pod(pod, cfg)
    where = f"pod {request.get('namespace', '')}/{result.name or '?'}"
    if result.outcome == "cannot-inject":
        message = f"meshlet: {where} not injected: {result.reason}"
        if fail_open:
            return _answer({"uid": uid, "allowed": True, "warnings": [message]})
        return _answer({"uid": uid, "allowed": False, "status": {"code": 403, "message": message}})
    if not result.changed:
        return _answer({"uid": uid, "allowed": True})
    patch = json.dumps(diff(pod, result.obj), separators=(",", ":")).encode()
    return _answer({
        "uid": uid, "allowed": True, "patchType": "JSONPatch", "patch": base64.b64encode(patch).decode("ascii"),
    })


def _answer(response: Response) -> ReviewResponse:
    return {"apiVersion": API_VERSION, "kind": "AdmissionReview", "response": response}
