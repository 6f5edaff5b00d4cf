"""The admission core as a pure function: AdmissionReview fixtures in, responses out.

Patches are applied with the `jsonpatch` library (an independent RFC 6902 implementation,
as the API server would apply them) and must give exactly what `meshlet inject` gives.
"""

from __future__ import annotations

import base64
import copy
import json

import jsonpatch
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from meshlet.k8s import admission
from meshlet.k8s.inject import inject_pod
from meshlet.k8s.patch import diff, pointer
from meshlet.k8s.sidecar import InjectConfig

CFG = InjectConfig()
POD = {
    "apiVersion": "v1", "kind": "Pod",
    "metadata": {"generateName": "reviews-v1-7d9f-", "namespace": "default", "labels": {"app": "reviews"}},
    "spec": {
        "serviceAccountName": "bookinfo-reviews",
        "containers": [{"name": "reviews", "image": "reviews:1", "ports": [{"containerPort": 9080}]}],
        "volumes": [{"name": "kube-api-access", "projected": {"sources": []}}],
    },
}


def review_of(pod: dict, *, operation: str = "CREATE", kind: str = "Pod") -> dict:
    return {
        "apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview",
        "request": {
            "uid": "705ab4f5-6393-11e8-b7cc-42010a800002",
            "kind": {"group": "", "version": "v1", "kind": kind},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "namespace": "default", "operation": operation, "object": pod,
        },
    }


def answer(review: dict, **kwargs) -> admission.Response:
    request = admission.parse(json.dumps(review).encode())["request"]
    out = admission.review(request, CFG, **kwargs)
    assert out["apiVersion"] == "admission.k8s.io/v1" and out["kind"] == "AdmissionReview"
    assert out["response"]["uid"] == review["request"]["uid"]
    return out["response"]


def patched(pod: dict, response: admission.Response) -> dict:
    assert response["patchType"] == "JSONPatch"
    ops = json.loads(base64.b64decode(response["patch"]))
    return jsonpatch.apply_patch(pod, ops)


def test_patch_does_what_inject_does():
    response = answer(review_of(POD))
    assert response["allowed"] is True
    assert patched(POD, response) == inject_pod(POD, CFG).obj


def test_annotation_keys_with_slashes_are_escaped():
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = {"prometheus.io/port": "8080", "a~b": "x"}
    ops = json.loads(base64.b64decode(answer(review_of(pod))["patch"]))
    assert {"op": "replace", "path": "/metadata/annotations/prometheus.io~1port", "value": "15020"} in ops
    assert pointer(["a~b/c", 0]) == "/a~0b~1c/0"


def test_already_injected_pod_gets_no_patch():
    response = answer(review_of(inject_pod(POD, CFG).obj))
    assert response == {"uid": response["uid"], "allowed": True}


def test_opted_out_pod_is_admitted_silently():
    pod = copy.deepcopy(POD)
    pod["metadata"]["annotations"] = {"meshlet.dev/inject": "false"}
    response = answer(review_of(pod))
    assert response == {"uid": response["uid"], "allowed": True}


def test_pod_that_cannot_be_injected_is_admitted_with_a_warning():
    pod = copy.deepcopy(POD)
    pod["spec"]["hostNetwork"] = True
    response = answer(review_of(pod))
    assert response["allowed"] is True and "patch" not in response
    assert response["warnings"] == [
        "meshlet: pod default/reviews-v1-7d9f- not injected: hostNetwork: true; the redirect would capture "
        "the node's traffic"
    ]


def test_fail_closed_refuses_it():
    pod = copy.deepcopy(POD)
    pod["spec"]["containers"][0]["ports"] = [{"containerPort": 15000}]
    response = answer(review_of(pod), fail_open=False)
    assert response["allowed"] is False
    assert response["status"]["code"] == 403
    assert "port 15000, reserved for the sidecar" in response["status"]["message"]


@pytest.mark.parametrize("review", [
    review_of(POD, operation="UPDATE"),
    review_of({"apiVersion": "v1", "kind": "Service"}, kind="Service"),
])
def test_other_requests_pass_unchanged(review):
    response = answer(review)
    assert response == {"uid": response["uid"], "allowed": True}


@pytest.mark.parametrize(("body", "reason"), [
    (b"{not json", "body is not JSON"),
    (b"[1, 2]", "not a JSON object"),
    (json.dumps({"apiVersion": "admission.k8s.io/v1beta1", "kind": "AdmissionReview"}).encode(),
     "expected apiVersion admission.k8s.io/v1 kind AdmissionReview, got 'admission.k8s.io/v1beta1'"),
    (json.dumps({**review_of(POD), "request": None}).encode(), "no request object"),
    (json.dumps({**review_of(POD), "request": {**review_of(POD)["request"], "uid": ""}}).encode(), "uid"),
    (json.dumps({**review_of(POD), "request": {**review_of(POD)["request"], "object": "x"}}).encode(),
     "request.object is not an object"),
    (b"\xff\xfe", "body is not JSON"),
])
def test_malformed_reviews_are_webhook_errors(body, reason):
    with pytest.raises(admission.WebhookError, match=reason.replace("(", r"\(")):
        admission.parse(body)


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 5) | st.text("ab/~", max_size=3),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text("ab/~", max_size=3), inner, max_size=3),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(_json, _json)
def test_diff_is_a_patch_from_old_to_new(old, new):
    """Any JSON value to any other: applying diff(old, new) to old gives new, type for type."""
    result = jsonpatch.apply_patch(old, diff(old, new)) if diff(old, new) else old
    assert json.dumps(result, sort_keys=True) == json.dumps(new, sort_keys=True)


def test_patch_of_a_realistic_deployment_pod_round_trips():
    text = """
    apiVersion: v1
    kind: Pod
    metadata: {name: p, annotations: {prometheus.io/scrape: "false"}}
    spec:
      initContainers: [{name: setup, image: busybox}]
      containers: [{name: app, image: app, ports: [{containerPort: 8080, protocol: UDP}]}]
    """
    pod = yaml.safe_load(text.replace("\n    ", "\n"))
    assert patched(pod, answer(review_of(pod))) == inject_pod(pod, CFG).obj
