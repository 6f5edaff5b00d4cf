"""The HTB tree a QoSPolicy asks for, and the smallest set of tc changes that gets there.

Pure: `tree_for(policy)` and `changes(desired, observed)` touch no kernel, so idempotence
(re-applying the same policy changes nothing) is a unit-tested property. `meshlet.ebpf.tc`
reads the observed tree and applies the changes with pyroute2.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from meshlet.policy.model import QoSPolicy

MAJOR = 1
TC_H_ROOT = 0xFFFFFFFF  # the parent the kernel reports for a top-level class
ROOT_HANDLE = MAJOR << 16  # 1:
PARENT_CLASS = ROOT_HANDLE | 1  # 1:1, holds the link rate the leaves borrow from
FIRST_LEAF = 0x10  # leaves are 1:10, 1:11, ... in priority order


@dataclass(frozen=True, slots=True)
class HtbClass:
    classid: int
    parent: int
    rate: int  # bytes per second, as the kernel stores it
    ceil: int
    prio: int
    name: str = ""  # the policy's class name; the kernel does not keep it


@dataclass(frozen=True, slots=True)
class HtbTree:
    default: int  # minor of the class unclassified packets go to
    classes: tuple[HtbClass, ...]

    def by_id(self) -> dict[int, HtbClass]:
        return {c.classid: c for c in self.classes}

    def named(self, name: str) -> HtbClass:
        return next(c for c in self.classes if c.name == name)


@dataclass(frozen=True, slots=True)
class Change:
    op: Literal["create-root", "add", "change", "delete"]
    htb_class: HtbClass | None = None
    default: int = 0

    def __str__(self) -> str:
        if self.htb_class is None:
            return f"{self.op} htb {MAJOR}: default {MAJOR}:{self.default:x}"
        c = self.htb_class
        name = c.name or "(link)"
        return f"{self.op} class {_tc_id(c.classid)} {name} rate {c.rate * 8}bit ceil {c.ceil * 8}bit prio {c.prio}"


def tree_for(policy: QoSPolicy) -> HtbTree:
    """Leaves in priority order (ties by name); the parent's rate is the largest ceil."""
    ordered = sorted(policy.classes, key=lambda c: (c.priority, c.name))
    link = max(c.ceil for c in ordered)
    leaves = tuple(
        HtbClass(ROOT_HANDLE | (FIRST_LEAF + i), PARENT_CLASS, c.rate // 8, c.ceil // 8, c.priority, c.name)
        for i, c in enumerate(ordered)
    )
    default = next((leaf for leaf in leaves if leaf.name == "default"), leaves[-1])
    parent = HtbClass(PARENT_CLASS, TC_H_ROOT, link // 8, link // 8, 0, "")
    return HtbTree(default.classid & 0xFFFF, (parent, *leaves))


def port_classes(policy: QoSPolicy, tree: HtbTree) -> dict[int, int]:
    """Port -> class id for the classifier's map."""
    return {port: tree.named(c.name).classid for c in policy.classes for port in c.ports}


def changes(desired: HtbTree, observed: HtbTree | None) -> list[Change]:
    """What turns `observed` (None: no meshlet HTB root) into `desired`; empty when equal.

    Names are not compared: the kernel does not store them.
    """
    if observed is None or observed.default != desired.default:
        # HTB cannot change its default class in place ("Change operation not supported"):
        # a new default means a new root, rebuilt with every class.
        return [Change("create-root", default=desired.default), *(Change("add", c) for c in desired.classes)]
    out: list[Change] = []
    have = observed.by_id()
    for wanted in desired.classes:
        current = have.get(wanted.classid)
        if current is None:
            out.append(Change("add", wanted))
        elif replace(current, name=wanted.name) != wanted:
            out.append(Change("change", wanted))
    wanted_ids = {c.classid for c in desired.classes}
    # Leaves before parents, so a parent is never deleted while it has children.
    stale = [c for c in observed.classes if c.classid not in wanted_ids]
    out.extend(Change("delete", c) for c in sorted(stale, key=lambda c: c.parent == TC_H_ROOT))
    return out


def with_ceil(tree: HtbTree, name: str, ceil_bits: int) -> HtbTree:
    return HtbTree(
        tree.default,
        tuple(replace(c, ceil=ceil_bits // 8) if c.name == name else c for c in tree.classes),
    )


def _tc_id(classid: int) -> str:
    return f"{classid >> 16:x}:{classid & 0xFFFF:x}"
