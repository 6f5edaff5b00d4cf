"""Multi-document Kubernetes YAML in and out, keeping what injection does not touch verbatim.

The stream is cut at `---` lines (at column 0 a `---` always starts a new document, even
inside a block scalar), so a document that injection leaves alone is written back byte for
byte, comments included, in its original place. Only changed documents are re-serialised.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

import yaml

_MARKER = re.compile(r"^---(?=[ \t\r\n]|$)")


class ManifestError(ValueError):
    """Malformed YAML; the message starts with FILE:LINE:COL."""


@dataclass(frozen=True, slots=True)
class Document:
    text: str  # as written, including its `---` line and trailing comments
    line: int  # 1-based line of the chunk's first line in the file
    obj: object  # the parsed value; None for an empty or comment-only chunk


def split(text: str, file: str) -> list[Document]:
    """Cut a YAML stream into documents and parse each; ManifestError names file:line:col."""
    chunks: list[tuple[int, list[str]]] = [(1, [])]
    for number, line in enumerate(text.splitlines(keepends=True), start=1):
        if _MARKER.match(line) and chunks[-1][1]:
            chunks.append((number, []))
        chunks[-1][1].append(line)
    documents = []
    for first, lines in chunks:
        chunk = "".join(lines)
        try:
            parsed = list(yaml.safe_load_all(chunk))
        except yaml.MarkedYAMLError as e:
            mark = e.problem_mark or e.context_mark
            line, column = (mark.line + first, mark.column + 1) if mark else (first, 1)
            problem = " ".join(filter(None, [e.context, e.problem]))
            raise ManifestError(f"{file}:{line}:{column}: malformed YAML: {problem}") from None
        except yaml.YAMLError as e:
            raise ManifestError(f"{file}:{first}:1: malformed YAML: {e}") from None
        documents.append(Document(chunk, first, parsed[0] if parsed else None))
    return documents


class Yaml12Loader(yaml.SafeLoader):
    """Booleans are only `true`/`false`, as in YAML 1.2 and JSON.

    PyYAML (like kubectl's go-yaml) follows YAML 1.1, where a bare `on`, `yes` or `off` is a
    boolean: `retries: {on: [5xx]}` (the deprecated name of `retryOn`) would reach the API server
    as `{"true": ["5xx"]}`. The policy loader reads node values and keeps them strings; this
    loader agrees with it.
    """


Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
Yaml12Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile("^(?:true|false)$"), list("tf"))


class _Dumper(yaml.SafeDumper):
    """kubectl's layout: lists indented under their key, no anchors, scripts as `|` literals."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> None:
        return super().increase_indent(flow, False)

    def ignore_aliases(self, data: object) -> bool:
        return True


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value and not value.endswith((" ", "\t")) else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def dump(obj: object) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, allow_unicode=True, width=120)


def rewrite(documents: list[Document], transform: Callable[[object], object]) -> str:
    """Join the documents back, re-serialising only those whose `transform` returned a new object."""
    out = []
    for doc in documents:
        new = transform(doc.obj) if doc.obj is not None else None
        if new is None or new is doc.obj:
            out.append(doc.text if doc.text.endswith("\n") or not doc.text else doc.text + "\n")
            continue
        marker = "---\n" if _MARKER.match(doc.text) else ""
        out.append(marker + dump(new))
    return "".join(out)
