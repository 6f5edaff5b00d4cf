"""What the agent re-reads from its policy files: the kernel splits they ask for now."""

from __future__ import annotations

import pytest

from meshlet.ebpf.acceleration import accel_config
from meshlet.ebpf.agent import reload_splits
from meshlet.ebpf.cgroup import UNIFIED
from meshlet.policy import PolicyInvalid
from meshlet.policy.model import Address

POLICY = """\
apiVersion: meshlet.dev/v1alpha1
kind: TrafficPolicy
metadata: {{name: {name}}}
spec:
  host: {name}
  dataplane: {dataplane}
  backends:
    v1: {{address: "127.0.0.1:9081"}}
    v2: {{address: "127.0.0.1:9082"}}
  routes:
    - name: canary
      to: [{{backend: v1, weight: {w1}}}, {{backend: v2, weight: {w2}}}]
"""


def write(tmp_path, name="reviews", dataplane="kernel", w1=90, w2=10):
    path = tmp_path / f"{name}.yaml"
    path.write_text(POLICY.format(name=name, dataplane=dataplane, w1=w1, w2=w2))
    return path


def test_weights_come_from_the_file_and_the_vip_from_the_flag(tmp_path):
    (split,) = reload_splits([write(tmp_path, w1=70, w2=30)], ["reviews=127.0.0.1:9080"])
    assert split.vip == Address("127.0.0.1", 9080)
    assert [(b.backend, b.weight) for b in split.backends] == [("v1", 70), ("v2", 30)]


def test_a_policy_back_on_the_proxy_asks_for_no_split(tmp_path):
    assert reload_splits([write(tmp_path, dataplane="proxy")], ["reviews=127.0.0.1:9080"]) == ()


def test_a_removed_policy_named_by_kernel_vip_is_no_error(tmp_path):
    """At start a --kernel-vip naming no policy is a typo; on reload it is a policy taken away."""
    assert reload_splits([write(tmp_path, name="ratings", dataplane="proxy")], ["reviews=127.0.0.1:9080"]) == ()


def test_a_bad_file_raises_with_its_location(tmp_path):
    with pytest.raises(PolicyInvalid) as e:
        reload_splits([write(tmp_path, w1=90, w2=20)], ["reviews=127.0.0.1:9080"])
    assert str(e.value.errors[0]) == f"{tmp_path}/reviews.yaml:12:12: route 'canary': weights sum to 110, must be 100"


@pytest.mark.skipif(not (UNIFIED / "cgroup.controllers").is_file(), reason=f"needs cgroup v2 at {UNIFIED}")
def test_a_cgroup_alone_keeps_a_config_for_splits_that_come_later():
    config = accel_config(str(UNIFIED), False, "15001,15006", [], [])
    assert config is not None and config.splits == () and not config.sockmap


def test_nothing_asked_and_no_cgroup_is_no_config():
    assert accel_config(None, False, "15001,15006", [], []) is None
