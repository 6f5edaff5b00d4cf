"""Compiling a policy into the kernel split's table: which policies qualify, and the errors."""

from __future__ import annotations

import socket
import struct
import types

import pytest

from meshlet.ebpf.kernel_split import (
    KernelSplit,
    SplitBackend,
    SplitError,
    _split_value,
    compile_split,
    ineligible,
    parse_vips,
    plan_splits,
    wants_kernel,
)
from meshlet.policy import load_text
from meshlet.policy.model import Address

VIP = Address("127.0.0.1", 9080)


def policy(dataplane: str = "kernel", route: str = "", backends: str = "", weights: tuple[int, int] = (90, 10),
           vip: str = ""):
    text = f"""\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: reviews}}
spec:
  host: reviews
  dataplane: {dataplane}{f'{chr(10)}  vip: "{vip}"' if vip else ''}
  backends:
    v1: {{address: "127.0.0.1:9081"}}
    v2: {{address: "{backends or "127.0.0.2:9082"}"}}
  routes:
    - name: canary
      to: [{{backend: v1, weight: {weights[0]}}}, {{backend: v2, weight: {weights[1]}}}]
{route}"""
    return load_text(text, "p.yaml").traffic[0]


def test_a_plain_weighted_route_compiles_to_backends_in_order():
    split = compile_split(policy(), VIP)
    assert split == KernelSplit(
        "reviews",
        VIP,
        (
            SplitBackend("canary", "v1", Address("127.0.0.1", 9081), 90),
            SplitBackend("canary", "v2", Address("127.0.0.2", 9082), 10),
        ),
    )


def test_auto_chooses_the_kernel_only_when_nothing_needs_l7():
    assert wants_kernel(policy("auto"))
    assert not wants_kernel(policy("auto", route="      timeout: 2s\n"))
    assert not wants_kernel(policy("proxy"))
    assert wants_kernel(policy("kernel"))


@pytest.mark.parametrize(
    ("route", "reason"),
    [
        ("      timeout: 2s\n", "timeout"),
        ("      retries: {attempts: 2}\n", "retries"),
        ("      sticky: {source: ip}\n", "sticky"),
    ],
)
def test_proxy_only_features_are_named(route, reason):
    mark, message = ineligible(policy("auto", route=route))
    assert reason in message
    assert (mark.file, mark.line) == ("p.yaml", 11)  # the route


def test_a_dns_backend_cannot_be_split_in_the_kernel_and_the_error_points_at_it():
    with pytest.raises(
        SplitError, match=r"^p\.yaml:9:5: dataplane kernel: backend v2 address reviews-v2 is not an IPv4"
    ):
        compile_split(policy(backends="reviews-v2:9082"), VIP)


def test_zero_weights_are_left_out():
    split = compile_split(policy(weights=(100, 0)), VIP)
    assert [(b.backend, b.weight) for b in split.backends] == [("v1", 100)]


def test_map_value_holds_cumulative_weights_and_network_order_addresses():
    class Leaf:  # the shape bcc generates for struct split
        def __init__(self):
            self.count = self.total = 0
            self.upto, self.ip, self.port = [0] * 16, [0] * 16, [0] * 16

    value = _split_value(types.SimpleNamespace(Leaf=Leaf), compile_split(policy(), VIP))
    assert (value.count, value.total, value.upto[:2], value.port[:2]) == (2, 100, [90, 100], [9081, 9082])
    assert struct.pack("=I", value.ip[1]) == socket.inet_aton("127.0.0.2")


def test_vip_flags_parse_and_refuse_with_the_format():
    assert parse_vips(["reviews=127.0.0.1:9080"]) == {"reviews": VIP}
    for bad in ("reviews", "reviews=host:80", "reviews=127.0.0.1:0", "=127.0.0.1:80", "r=127.0.0.1:x"):
        with pytest.raises(ValueError, match="expected POLICY=IPV4:PORT"):
            parse_vips([bad])


def test_plan_takes_kernel_policies_and_qualifying_auto_ones_with_a_vip():
    kernel, auto = policy("kernel"), policy("auto")
    assert [s.policy for s in plan_splits([kernel], {"reviews": VIP})] == ["reviews"]
    assert plan_splits([auto], {}) == ()  # auto without a VIP stays with the proxy
    assert plan_splits([policy("auto", route="      timeout: 2s\n")], {"reviews": VIP}) == ()
    assert plan_splits([policy("proxy")], {"reviews": VIP}) == ()


def test_the_policy_carries_its_vip_and_the_flag_overrides_it():
    assert [s.vip for s in plan_splits([policy("kernel", vip=str(VIP))], {})] == [VIP]
    assert [s.vip for s in plan_splits([policy("auto", vip=str(VIP))], {})] == [VIP]
    other = Address("127.0.0.9", 9999)
    assert [s.vip for s in plan_splits([policy("kernel", vip=str(VIP))], {"reviews": other})] == [other]


def test_plan_refuses_a_kernel_policy_without_vip_and_unknown_vip_names():
    with pytest.raises(SplitError, match=r"^p\.yaml:5:3: policy reviews has dataplane kernel but no virtual address"):
        plan_splits([policy("kernel")], {})
    with pytest.raises(SplitError, match="--kernel-vip names no loaded TrafficPolicy: ratings"):
        plan_splits([policy("kernel")], {"reviews": VIP, "ratings": VIP})


def test_hook_numbers_are_the_kernel_enums_bcc_knows():
    bcc = pytest.importorskip("bcc", reason="bcc (python3-bpfcc) is not importable")
    from meshlet.ebpf.accel import SOCKMAP
    from meshlet.ebpf.kernel_split import SPLIT

    expected = {
        "meshlet_skmsg": (bcc.BPFProgType.SK_MSG, bcc.BPFAttachType.SK_MSG_VERDICT),
        "meshlet_sockops": (bcc.BPFProgType.SOCK_OPS, bcc.BPFAttachType.CGROUP_SOCK_OPS),
        "meshlet_connect4": (bcc.BPFProgType.CGROUP_SOCK_ADDR, bcc.BPFAttachType.CGROUP_INET4_CONNECT),
        "meshlet_getpeername4": (bcc.BPFProgType.CGROUP_SOCK_ADDR, bcc.BPFAttachType.CGROUP_INET4_GETPEERNAME),
    }
    assert {h.function: (h.prog_type, h.attach_type) for h in SOCKMAP.hooks + SPLIT.hooks} == expected


def test_a_backend_protocol_keeps_auto_on_the_proxy_and_names_the_backend():
    mark, message = ineligible(policy("auto", backends='127.0.0.2:9082", protocol: "http2'))
    assert message == "backend v2 needs the proxy to speak protocol http2"
    assert (mark.line, mark.column) == (9, 5)
    assert wants_kernel(policy("auto", backends='127.0.0.2:9082", protocol: "auto'))
