"""RFC 6902 JSON Patch as the difference of two JSON values: how the webhook turns
`inject(pod)` into the patch the API server applies, so webhook and CLI share one code path.

Lists whose length changed are replaced whole: a Pod's container lists are short, and a
positional add/remove script would be fragile if the API server's copy differs in order.
"""

from __future__ import annotations

Patch = list[dict[str, object]]


def pointer(parts: list[str | int]) -> str:
    """RFC 6901: `~` → `~0`, `/` → `~1` (annotation keys like `prometheus.io/port` need it)."""
    return "".join("/" + str(p).replace("~", "~0").replace("/", "~1") for p in parts)


def diff(old: object, new: object) -> Patch:
    ops: Patch = []
    _diff(old, new, [], ops)
    return ops


def _same(a: object, b: object) -> bool:
    return type(a) is type(b) and a == b  # True == 1 in Python, not in JSON


def _diff(old: object, new: object, path: list[str | int], ops: Patch) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in old:
            if key not in new:
                ops.append({"op": "remove", "path": pointer([*path, key])})
        for key, value in new.items():
            if key not in old:
                ops.append({"op": "add", "path": pointer([*path, key]), "value": value})
            else:
                _diff(old[key], value, [*path, key], ops)
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new, strict=True)):
            _diff(a, b, [*path, i], ops)
    elif not _same(old, new):
        ops.append({"op": "replace", "path": pointer(path), "value": new})
