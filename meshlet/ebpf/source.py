"""Where the C lives and how it becomes one bcc translation unit.

bcc rewrites map calls and generates tracepoint argument structs only in the main source it
is handed, not in `#include`d files, so the loader concatenates the shared header and the
programs (each program file still includes the header and compiles on its own; the include
guard makes the second copy a no-op).
"""

from __future__ import annotations

from pathlib import Path

# meshlet/bpf is a link to the repository's bpf/ in a checkout, and a copy of it in the wheel
# (pyproject.toml's package-data), so an installed meshlet (the image) finds its C too.
BPF_DIR = Path(__file__).resolve().parents[1] / "bpf"
HEADER = "meshlet_hist.h"
OBSERVERS = ("tcp_connlat.c", "tcp_rtt.c", "tcp_retrans.c")
CLASSIFIER = "tc_classify.c"


def translation_unit(*files: str) -> bytes:
    return b"\n".join((BPF_DIR / name).read_bytes() for name in files)


def include_flags() -> list[str]:
    return [f"-I{BPF_DIR}"]
