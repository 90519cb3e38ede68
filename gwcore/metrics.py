"""``/metrics``: the Prometheus exposition of the counters gwcore keeps.

The components count what happens as plain attributes (ints, and :class:`Buckets` for the
histograms), where it happens; nothing is built per request. At scrape time each component's
``metrics()`` returns its counters as a list of metric families (:data:`Families`), the one shape
all of them share, and :class:`GatewayCollector` hands them to prometheus_client, which writes the
exposition (label values escaped, numbers exact). Which families a gateway has is
:meth:`gwcore.Gateway.metric_families`; docs/operations.md lists them.
"""

from __future__ import annotations

import bisect
import platform
from typing import Any, Iterable, Iterator, Sequence

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from ._core import core

__all__ = ("Buckets", "Families", "counter", "gauge", "histogram", "GatewayCollector", "registry_for", "render",
           "SECONDS", "CONTENT_TYPE")

#: What every component's ``metrics()`` returns.
Families = list[Metric]

#: The exposition's content type (text format 0.0.4, which every Prometheus reads).
CONTENT_TYPE = b"text/plain; version=0.0.4; charset=utf-8"

#: Bucket bounds of the duration histograms, in seconds: 0.5 ms to 10 s (the compiled path
#: counts its answers in the same buckets).
SECONDS: tuple[float, ...] = core.DURATION_BOUNDS


class Buckets:
    """A histogram kept as plain numbers: ``counts[i]`` observations ``<= bounds[i]`` (and above
    the bound before it), the last one above every bound; ``sum`` of all. An observation is a
    bisect and two additions."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float] = SECONDS) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum: float = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value

    def merge(self, other: "Buckets") -> None:
        """Add *other*'s observations (same bounds) to these."""
        for i, n in enumerate(other.counts):
            self.counts[i] += n
        self.sum += other.sum

    def cumulative(self) -> list[tuple[str, int]]:
        """``[(le, observations <= le)]`` ending with ``+Inf``, as the exposition has them."""
        out, running = [], 0
        for bound, n in zip(self.bounds, self.counts):
            running += n
            out.append((floatToGoString(bound), running))
        out.append(("+Inf", running + self.counts[-1]))
        return out


def _family(kind: Any, name: str, help_text: str, value: float | None, labels: Sequence[str],
            samples: Iterable[tuple[Sequence[str], float]]) -> Any:
    family = kind(name, help_text, value=value, labels=labels or None)
    for values, v in samples:
        family.add_metric(list(values), v)
    return family


def counter(name: str, help_text: str, value: float | None = None, *, labels: Sequence[str] = (),
            samples: Iterable[tuple[Sequence[str], float]] = ()) -> CounterMetricFamily:
    """A counter family: one unlabelled *value*, or *samples* of ``(label values, value)``.
    *name* ends with ``_total`` as it is exposed."""
    return _family(CounterMetricFamily, name, help_text, value, labels, samples)


def gauge(name: str, help_text: str, value: float | None = None, *, labels: Sequence[str] = (),
          samples: Iterable[tuple[Sequence[str], float]] = ()) -> GaugeMetricFamily:
    """A gauge family, as :func:`counter`."""
    return _family(GaugeMetricFamily, name, help_text, value, labels, samples)


def histogram(name: str, help_text: str, buckets: Buckets | None = None, *, labels: Sequence[str] = (),
              samples: Iterable[tuple[Sequence[str], Buckets]] = ()) -> HistogramMetricFamily:
    family = HistogramMetricFamily(name, help_text, labels=labels or None)
    if buckets is not None:
        family.add_metric([], buckets.cumulative(), buckets.sum)
    for values, b in samples:
        family.add_metric(list(values), b.cumulative(), b.sum)
    return family


def build_info(version: str, mode: str) -> GaugeMetricFamily:
    return gauge("gwcore_build_info", "Always 1: the gwcore version, its Python and the deployment mode.",
                 labels=("version", "python", "mode"), samples=[((version, platform.python_version(), mode), 1)])


class GatewayCollector(Collector):
    """prometheus_client's view of one gateway: its families, read at scrape time."""

    def __init__(self, source: Any) -> None:
        self.source = source  # anything with metric_families() -> Families

    def collect(self) -> Iterator[Metric]:
        yield from self.source.metric_families()


def registry_for(source: Any, *, process: bool = True) -> CollectorRegistry:
    """A registry of its own for one gateway (not prometheus_client's global one, so that two
    gateways in one process, or an embedding application's metrics, never collide), with the
    process collector (``process_*``: CPU, memory, open files) beside it."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(GatewayCollector(source))
    if process:
        registry.register(ProcessCollector(registry=None))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    """The text exposition of *registry*."""
    return generate_latest(registry)
