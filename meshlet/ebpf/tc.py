"""Kernel edge of QoS: read and change the HTB tree, attach the clsact classifier (pyroute2).

Every function takes an open pyroute2 `IPRoute` (possibly bound to a network namespace) and
an interface index, so the agent and the netns tests drive the same code.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from meshlet.ebpf.htb import MAJOR, ROOT_HANDLE, TC_H_ROOT, Change, HtbClass, HtbTree

CLSACT_HANDLE = 0xFFFF0000
EGRESS = 0xFFFFFFF3  # ffff:fff3, the clsact egress hook
FILTER_NAME = "meshlet_classify"


def read_tree(ipr: Any, index: int) -> HtbTree | None:
    """The meshlet HTB tree on the interface, or None when its root qdisc is something else."""
    root = next((q for q in ipr.get_qdiscs(index) if q["parent"] == TC_H_ROOT), None)
    if root is None or root.get_attr("TCA_KIND") != "htb" or root["handle"] != ROOT_HANDLE:
        return None
    init = root.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_INIT")
    classes = []
    for msg in ipr.get_classes(index):
        if msg.get_attr("TCA_KIND") != "htb":
            continue
        parms = msg.get_attr("TCA_OPTIONS").get_attr("TCA_HTB_PARMS")
        classes.append(HtbClass(msg["handle"], msg["parent"], parms["rate"], parms["ceil"], parms["prio"]))
    return HtbTree(init["defcls"], tuple(sorted(classes, key=lambda c: c.classid)))


def apply(ipr: Any, index: int, todo: Iterable[Change]) -> None:
    for change in todo:
        c = change.htb_class
        if change.op == "create-root":
            # `replace` swaps out another root qdisc (pfifo_fast, noqueue, a foreign HTB), but on our
            # own HTB it would mean "change", which HTB refuses: that one is deleted first.
            remove_htb(ipr, index)
            ipr.tc("replace", "htb", index, ROOT_HANDLE, default=change.default)
        elif c is not None and change.op in ("add", "change"):
            command = "add-class" if change.op == "add" else "change-class"
            parent = ROOT_HANDLE if c.parent == TC_H_ROOT else c.parent
            ipr.tc(command, "htb", index, c.classid, parent=parent, rate=c.rate, ceil=c.ceil, prio=c.prio)
        elif c is not None and change.op == "delete":
            ipr.tc("del-class", None, index, c.classid)  # no kind: pyroute2 would encode empty HTB parameters


def class_bytes(ipr: Any, index: int) -> dict[int, int]:
    """Bytes sent through each HTB class so far (tc -s class show)."""
    out = {}
    for msg in ipr.get_classes(index):
        stats = msg.get_attr("TCA_STATS2")
        basic = stats.get_attr("TCA_STATS_BASIC") if stats else None
        if basic is not None and msg["handle"] >> 16 == MAJOR:
            out[msg["handle"]] = basic["bytes"]
    return out


def attach_classifier(ipr: Any, index: int, prog_fd: int) -> None:
    """A fresh clsact with only our filter: a crashed agent's filter goes with the old clsact."""
    remove_clsact(ipr, index)
    ipr.tc("add", "clsact", index)
    ipr.tc("add-filter", "bpf", index, ":1", fd=prog_fd, name=FILTER_NAME, parent=EGRESS, classid=1, direct_action=True)


def egress_filters(ipr: Any, index: int) -> list[str]:
    """Names of the BPF programs on the clsact egress hook (to check there is exactly one)."""
    names = []
    for msg in ipr.get_filters(index=index, parent=EGRESS):
        options = msg.get_attr("TCA_OPTIONS")
        name = options.get_attr("TCA_BPF_NAME") if options else None
        if name:
            names.append(name)
    return names


def remove_clsact(ipr: Any, index: int) -> bool:
    if not any(q.get_attr("TCA_KIND") == "clsact" for q in ipr.get_qdiscs(index)):
        return False
    ipr.tc("del", "clsact", index)
    return True


def remove_htb(ipr: Any, index: int) -> bool:
    if read_tree(ipr, index) is None:
        return False
    ipr.tc("del", "htb", index, ROOT_HANDLE, parent=TC_H_ROOT)
    return True
