"""Prometheus text exposition (format 0.0.4) of the daemon's counters, for ``GET /metrics``.

Rendered on request from the registry's counters: nothing is maintained on the
per-connection path beyond the integers the registry already keeps. Which metrics exist
(name, kind, help) is ``sockd.protocol.METRICS``; ``sockd.views`` fills in their samples.
A leaf: imports nothing from the package.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Sample:
    value: float
    labels: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Metric:
    name: str
    kind: str  # "counter" or "gauge"
    help: str
    samples: tuple[Sample, ...]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def render(metrics: Iterable[Metric]) -> str:
    lines: list[str] = []
    for metric in metrics:
        lines.append(f"# HELP {metric.name} {metric.help}")
        lines.append(f"# TYPE {metric.name} {metric.kind}")
        for sample in metric.samples:
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in sorted(sample.labels.items()))
            suffix = "{" + labels + "}" if labels else ""
            lines.append(f"{metric.name}{suffix} {_number(sample.value)}")
    return "\n".join(lines) + "\n"
