"""Typed access to composed YAML nodes that records located errors instead of raising.

The loader walks PyYAML's node graph (not the constructed Python objects) because only
nodes keep their start marks; that is what lets every error name FILE:LINE:COL. Each
accessor returns None when the node is unusable and records why, so one pass over a
document collects all of its errors.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import TypeVar

import yaml

from meshlet.policy.errors import PolicyError, PolicyWarning
from meshlet.policy.model import Mark

T = TypeVar("T")
Renamed = tuple[str, str]  # a deprecated field's new name, and why it changed

_IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_BOOL = "tag:yaml.org,2002:bool"
_NULL = "tag:yaml.org,2002:null"

_TYPE_NAMES = {
    _STR: "a string",
    _INT: "an integer",
    _BOOL: "a boolean",
    _NULL: "null",
    "tag:yaml.org,2002:float": "a number",
    "tag:yaml.org,2002:map": "a mapping",
    "tag:yaml.org,2002:seq": "a list",
}


def describe(node: yaml.Node) -> str:
    """How a node reads to a user: `a list`, `the integer 10`, `the string 'ten'`."""
    if isinstance(node, yaml.ScalarNode) and node.tag in (_STR, _INT, _BOOL, "tag:yaml.org,2002:float"):
        kind = _TYPE_NAMES[node.tag].split(" ", 1)[1]
        return f"the {kind} {node.value!r}" if node.tag == _STR else f"the {kind} {node.value}"
    return _TYPE_NAMES.get(node.tag, node.tag)


class Reader:
    """Reads one file's nodes; every problem becomes a PolicyError in `errors`, every deprecated
    spelling a PolicyWarning in `warnings`."""

    def __init__(self, file: str):
        self.file = file
        self.errors: list[PolicyError] = []
        self.warnings: list[PolicyWarning] = []

    def mark(self, node: yaml.Node) -> Mark:
        return Mark(self.file, node.start_mark.line + 1, node.start_mark.column + 1)

    def error(self, at: yaml.Node | Mark, message: str) -> None:
        mark = at if isinstance(at, Mark) else self.mark(at)
        # Keys and values come from the user: keep the error on one line whatever they hold.
        printable = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
        self.errors.append(PolicyError(mark, printable))

    def warn(self, at: yaml.Node, message: str) -> None:
        self.warnings.append(PolicyWarning(self.mark(at), message))

    def type_error(self, node: yaml.Node, where: str, expected: str) -> None:
        self.error(node, f"{where}: expected {expected}, got {describe(node)}")

    # -- containers ---------------------------------------------------------------------------

    def mapping(
        self, node: yaml.Node, where: str, fields: Mapping[str, bool], renamed: Mapping[str, Renamed] | None = None
    ) -> dict[str, yaml.Node] | None:
        """A mapping with a fixed set of fields (name → required); unknown fields are errors.

        A field written under its old name (`renamed`: old → new name and why) is found under the
        new one, with a warning; both names at once are an error, as the two could disagree.
        """
        entries = self.entries(node, where)
        if entries is None:
            return None
        found: dict[str, yaml.Node] = {}
        for key, (key_node, value) in entries.items():
            if renamed and key in renamed:
                new, why = renamed[key]
                if new in entries:
                    self.error(key_node, f"{where}: give {new!r} only, not also {key!r} (its deprecated old name)")
                    continue
                self.warn(key_node, f"{where}: {key!r} is deprecated, write {new!r}: {why}")
                key = new
            if key not in fields:
                self.error(key_node, f"{where}: unknown field {key!r}{_suggest(key, fields)}")
            else:
                found[key] = value
        for name, required in fields.items():
            if required and name not in found:
                self.error(node, f"{where}: missing required field {name!r}")
        return found

    def entries(self, node: yaml.Node, where: str) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """A mapping with free-form string keys (backend names, header names); duplicates are errors."""
        if not isinstance(node, yaml.MappingNode):
            self.type_error(node, where, "a mapping")
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag not in (_STR, _INT, _BOOL):
                self.type_error(key_node, where, "a plain key")
                continue
            key = key_node.value
            if key in out:
                first = self.mark(out[key][0])
                self.error(key_node, f"{where}: duplicate key {key!r} (first defined at line {first.line})")
                continue
            out[key] = (key_node, value)
        return out

    def sequence(self, node: yaml.Node, where: str) -> list[yaml.Node] | None:
        if not isinstance(node, yaml.SequenceNode):
            self.type_error(node, where, "a list")
            return None
        return list(node.value)

    # -- scalars ------------------------------------------------------------------------------

    def string(self, node: yaml.Node, where: str, *, scalars_ok: bool = False) -> str | None:
        """A string; with `scalars_ok`, numbers and booleans are taken as written (header values)."""
        allowed = (_STR, _INT, _BOOL, "tag:yaml.org,2002:float") if scalars_ok else (_STR,)
        if not isinstance(node, yaml.ScalarNode) or node.tag not in allowed:
            self.type_error(node, where, "a string")
            return None
        if not node.value and not scalars_ok:
            self.error(node, f"{where}: must not be empty")
            return None
        return node.value

    def integer(self, node: yaml.Node, where: str, *, low: int | None = None, high: int | None = None) -> int | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _INT:
            self.type_error(node, where, "an integer")
            return None
        try:
            value = int(yaml.safe_load(node.value))  # YAML 1.1 ints: 0x1f, 1_000, 0o17
        except (ValueError, TypeError, yaml.YAMLError):
            self.type_error(node, where, "an integer")
            return None
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"from {low} to {high}" if high is not None else f"at least {low}"
            self.error(node, f"{where}: {value} is out of range, must be {bounds}")
            return None
        return value

    def number(self, node: yaml.Node, where: str, *, low: float, high: float) -> float | None:
        """An integer or decimal number within [low, high] (percentages, ratios)."""
        if not isinstance(node, yaml.ScalarNode) or node.tag not in (_INT, "tag:yaml.org,2002:float"):
            self.type_error(node, where, "a number")
            return None
        value = float(yaml.safe_load(node.value))
        if not low <= value <= high:
            self.error(node, f"{where}: {node.value} is out of range, must be from {low:g} to {high:g}")
            return None
        return value

    def identifier(self, node: yaml.Node, name: str, where: str) -> bool:
        """Route, backend and class names become metric labels and log fields: keep them plain."""
        if _IDENTIFIER.fullmatch(name):
            return True
        self.error(node, f"{where}: name {name!r} must be letters, digits, '-', '_' or '.' (at most 63, "
                         "starting with a letter or digit)")
        return False

    def boolean(self, node: yaml.Node, where: str) -> bool | None:
        if not isinstance(node, yaml.ScalarNode) or node.tag != _BOOL:
            self.type_error(node, where, "true or false")
            return None
        return node.value.lower() in ("true", "yes", "on", "y")

    def choice(self, node: yaml.Node, where: str, choices: tuple[str, ...]) -> str | None:
        value = self.string(node, where)
        if value is None:
            return None
        if value not in choices:
            folded = [c for c in choices if c.lower() == value.lower()]
            close = folded or difflib.get_close_matches(value, choices, n=1, cutoff=0.6)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            self.error(node, f"{where}: {value!r} is not one of {', '.join(choices)}{hint}")
            return None
        return value

    def parsed(self, node: yaml.Node, where: str, parse: Callable[[str], T], *, ints_ok: bool = False) -> T | None:
        """A string run through one of `meshlet.policy.values`' parsers; its ValueError becomes the error."""
        accepted = (_STR, _INT) if ints_ok else (_STR,)
        if isinstance(node, yaml.ScalarNode) and node.tag in accepted:
            text: str | None = node.value  # empty text too: the parser says what a good value looks like
        else:
            text = self.string(node, where)
        if text is None:
            return None
        try:
            return parse(text)
        except ValueError as e:
            self.error(node, f"{where}: {e}")
            return None

    def string_list(self, node: yaml.Node, where: str) -> list[tuple[yaml.Node, str]] | None:
        """A list of strings, each with its node so later checks can point at the item."""
        items = self.sequence(node, where)
        if items is None:
            return None
        out = []
        for i, item in enumerate(items):
            value = self.string(item, f"{where}[{i}]")
            if value is not None:
                out.append((item, value))
        return out


def _suggest(word: str, options: Mapping[str, object] | tuple[str, ...]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else f" (expected one of: {', '.join(options)})"
