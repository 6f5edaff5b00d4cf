"""Side-by-side figures: a table on stdout, results/latest.json, and a latency chart."""

from __future__ import annotations

import json
import math
import platform
import statistics
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass(frozen=True)
class Row:
    target: str
    scenario: str
    rps: float
    p50: float
    p90: float
    p99: float
    errors: int
    cpu_per_1k: float | None  # CPU seconds of the proxy process tree per 1 000 requests
    peak_rss_mb: float | None  # the sum over the process tree
    largest_rss_mb: float | None = None  # its largest process (a worker, for a multi-worker sidecar)


def median_rows(samples: Sequence[Row]) -> Row:
    """The median of alternating rounds of one (target, scenario): drift hits every target alike."""
    first = samples[0]

    def med(field: str) -> float | None:
        values = [getattr(s, field) for s in samples if getattr(s, field) is not None]
        return statistics.median(values) if values else None

    return Row(first.target, first.scenario, med("rps"), med("p50"), med("p90"), med("p99"),
               sum(s.errors for s in samples), med("cpu_per_1k"), max((s.peak_rss_mb or 0) for s in samples) or None,
               max((s.largest_rss_mb or 0) for s in samples) or None)


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None or math.isnan(seconds) else f"{seconds * 1000:.2f}"


def table(rows: Sequence[Row], unavailable: dict[str, str], reference: dict[str, str]) -> str:
    """`reference`: target → the HAProxy it is compared with (the one with as many threads as it has workers)."""
    by_key = {(r.target, r.scenario): r for r in rows}
    head = (f"{'target':<22} {'scenario':<12} {'req/s':>9} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8} "
            f"{'+p50 ms':>8} {'x direct':>8} {'x HAProxy':>9} {'cpu s/1k':>8} {'RSS MB':>7} {'errors':>6}")
    lines = [head, "-" * len(head)]
    for r in rows:
        direct = by_key.get(("direct", r.scenario))
        haproxy = by_key.get((reference.get(r.target, ""), r.scenario))
        added = _ms(r.p50 - direct.p50) if direct and r.target != "direct" else "-"
        cpu = f"{r.cpu_per_1k:.3f}" if r.cpu_per_1k is not None else "-"
        rss = f"{r.peak_rss_mb:.0f}" if r.peak_rss_mb else "-"
        lines.append(f"{r.target:<22} {r.scenario:<12} {r.rps:>9.0f} {_ms(r.p50):>8} {_ms(r.p90):>8} {_ms(r.p99):>8} "
                     f"{added:>8} {_ratio(r, direct):>8} {_ratio(r, haproxy):>9} {cpu:>8} {rss:>7} {r.errors:>6}")
    for target, reason in unavailable.items():
        lines.append(f"{target:<22} unavailable: {reason}")
    return "\n".join(lines)


def _ratio(row: Row, base: Row | None) -> str:
    return f"{row.rps / base.rps:.3f}" if base and base.rps else "-"


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    cores = Path("/proc/cpuinfo").read_text().count("processor\t:")
    return f"{platform.system()} {platform.release()}, {cores} cores ({cpu}), Python {platform.python_version()}"


def write(
    results_dir: Path, rows: Sequence[Row], unavailable: dict[str, str], settings: dict, findings: dict
) -> None:
    """`findings`: what is not a row (idle RSS per target, the targets checklist), kept beside the rows."""
    results_dir.mkdir(parents=True, exist_ok=True)
    doc = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "machine": machine(),
        "settings": settings,
        "rows": [asdict(r) for r in rows],
        "unavailable": unavailable,
        **findings,
    }
    (results_dir / "latest.json").write_text(json.dumps(doc, indent=2) + "\n")
    chart(results_dir / "latest.png", rows, doc["date"], doc["machine"])


def chart(path: Path, rows: Sequence[Row], date: str, machine_line: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scenarios = list(dict.fromkeys(r.scenario for r in rows))
    width = max(5.0, 0.5 * len({r.target for r in rows}))  # room for every target's label
    fig, axes = plt.subplots(1, len(scenarios), figsize=(width * len(scenarios), 4.5), squeeze=False)
    for ax, scenario in zip(axes[0], scenarios, strict=True):
        picked = [r for r in rows if r.scenario == scenario]
        xs = range(len(picked))
        for offset, (label, field) in enumerate((("p50", "p50"), ("p90", "p90"), ("p99", "p99"))):
            ax.bar([x + (offset - 1) * 0.27 for x in xs], [getattr(r, field) * 1000 for r in picked], 0.27, label=label)
        ax.set_xticks(list(xs), [r.target for r in picked], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylabel("latency, ms (log)")
        ax.set_title(scenario)
        ax.legend(fontsize=8)
    fig.suptitle(f"meshlet latency percentiles — {date}\n{machine_line}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
