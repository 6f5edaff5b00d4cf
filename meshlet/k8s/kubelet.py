"""Where the kubelet put each Pod's cgroup, found from the Pods' UIDs.

The kubelet names a Pod's cgroup after its UID, under its QoS class: with the systemd driver
`kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod<uid, - as _>.slice`, with the
cgroupfs driver `kubepods/burstable/pod<uid>`; a Guaranteed Pod sits directly under the root.
So two levels under the kubelet's root hold every Pod, and one walk of them indexes them all.
"""

from __future__ import annotations

import re
from pathlib import Path

_SYSTEMD = re.compile(r"(?:.*-)?pod([0-9a-f]{8}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{4}_[0-9a-f]{12})\.slice")
_CGROUPFS = re.compile(r"pod([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")


def pod_uid(name: str) -> str | None:
    """The Pod UID a cgroup directory's name carries, or None for any other directory."""
    found = _SYSTEMD.fullmatch(name)
    if found:
        return found.group(1).replace("_", "-")
    found = _CGROUPFS.fullmatch(name)
    return found.group(1) if found else None


def pod_cgroups(root: Path) -> dict[str, Path]:
    """Pod UID → its cgroup directory, for every Pod cgroup within two levels of `root`."""
    found: dict[str, Path] = {}
    for child in _directories(root):
        uid = pod_uid(child.name)
        if uid is not None:
            found[uid] = child
            continue
        for grandchild in _directories(child):  # a QoS class directory: burstable, besteffort
            uid = pod_uid(grandchild.name)
            if uid is not None:
                found[uid] = grandchild
    return found


def _directories(path: Path) -> list[Path]:
    try:
        return [p for p in path.iterdir() if p.is_dir()]
    except OSError:  # not there (yet), or removed while we looked
        return []
