"""A Pod's labels as the Downward API writes them: one `key="value"` per line.

Injection mounts `metadata.labels` as a file and passes it to `meshlet run --workload-labels`,
so the sidecar knows which policies' `mtls.selector` pick its workload, without any API call.
The kubelet quotes values as Go's strconv.Quote does; label values are letters, digits and
`-_.`, so JSON's string syntax reads them.
"""

from __future__ import annotations

import json
from pathlib import Path

from meshlet.policy.values import parse_label_key, parse_label_value


def parse_labels(text: str, file: str = "<labels>") -> tuple[tuple[str, str], ...]:
    """Sorted (key, value) pairs; ValueError names `file:line`."""
    labels = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        key, sep, quoted = line.partition("=")
        try:
            if not sep or not quoted.startswith('"'):
                raise ValueError(f'expected key="value", got {line!r}')
            value = json.loads(quoted)
            if not isinstance(value, str):
                raise ValueError(f"expected a quoted string after {key}=")
            labels[parse_label_key(key)] = parse_label_value(value)
        except ValueError as e:  # json.JSONDecodeError is one
            raise ValueError(f"{file}:{number}: {e}") from None
    return tuple(sorted(labels.items()))


def read_labels(path: Path) -> tuple[tuple[str, str], ...]:
    """OSError or ValueError (naming the file, and the line) when unreadable or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise OSError(f"{path}: {e.strerror}") from None
    return parse_labels(text, str(path))
