"""kernelhib's Prometheus metrics, served on jupyter_server's ``/metrics``.

What is kept on disk (hibernated kernels, the memory they freed, their images)
is read from the hibernator when ``/metrics`` is scraped, and jupyter_server's
running-kernel gauge is set from the kernels there are, rather than counted up
and down: neither can drift from the truth, whatever path a kernel took
(hibernated, woken, adopted by a new server, died, shut down). Durations and
failures are recorded as they happen.
"""

from __future__ import annotations

import weakref
from collections import Counter as Tally
from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from jupyter_server.prometheus.metrics import KERNEL_CURRENTLY_RUNNING_TOTAL
from prometheus_client import REGISTRY, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .engines.base import ENGINE_CHOICES

# Hibernations and wakes take from a tenth of a second (a small kernel, CRIU)
# to minutes (tens of GiB, or a dill snapshot of many variables).
DURATION_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
ENGINES = [name for name in ENGINE_CHOICES if name != "auto"]

HIBERNATE_SECONDS = Histogram(
    "kernelhib_hibernate_duration_seconds",
    "Seconds a hibernation took, from the kernel's freeze to its process's end",
    ["engine", "outcome"],
    buckets=DURATION_BUCKETS,
)
WAKE_SECONDS = Histogram(
    "kernelhib_wake_duration_seconds",
    "Seconds a wake took, until the kernel answered",
    ["engine", "outcome"],
    buckets=DURATION_BUCKETS,
)
FAILURES = Counter(
    "kernelhib_failures",
    "Hibernations and wakes that failed or were refused for want of storage "
    "(one per hibernate-failed or wake-failed event)",
    ["operation", "reason"],
)


class Kept(Protocol):
    """What the metrics need of a hibernated kernel (kernelhib.hibernator.Hibernation)."""

    engine: str
    freed_bytes: int
    gpu_freed_bytes: int
    image_bytes: int


class _KeptCollector(Collector):
    """The hibernated kernels of the server's hibernator, as gauges, at each scrape."""

    def __init__(self) -> None:
        self._source: weakref.WeakMethod[Callable[[], Iterable[Kept]]] | None = None

    def watch(self, source: Callable[[], Iterable[Kept]]) -> None:
        # Weakly: a server stopped in a test process must not be kept alive by this.
        self._source = weakref.WeakMethod(source)  # type: ignore[arg-type]

    def collect(self) -> Iterator[Metric]:
        source = self._source() if self._source is not None else None
        kept = list(source()) if source is not None else []
        kernels = GaugeMetricFamily(
            "kernelhib_hibernated_kernels",
            "Kernels hibernated (or being woken), by the engine of their image",
            labels=["engine"],
        )
        for engine in ENGINES:
            kernels.add_metric([engine], sum(k.engine == engine for k in kept))
        freed = GaugeMetricFamily(
            "kernelhib_freed_bytes",
            "Memory the hibernated kernels held: what hibernating them gave back",
            labels=["memory"],
        )
        freed.add_metric(["ram"], sum(k.freed_bytes for k in kept))
        freed.add_metric(["gpu"], sum(k.gpu_freed_bytes for k in kept))
        images = GaugeMetricFamily(
            "kernelhib_image_bytes",
            "Bytes of the images in the image store: of the hibernated kernels, and of "
            "kernels woken lazily whose memory is still coming in from theirs",
            value=sum(k.image_bytes for k in kept),
        )
        yield from (kernels, freed, images)


_KEPT = _KeptCollector()
REGISTRY.register(_KEPT)
# Kernel types whose running count this module has set: each is kept up to date,
# down to 0 when its last kernel goes.
_running_types: set[str] = set()


def watch(source: Callable[[], Iterable[Kept]]) -> None:
    """Report the kernels that the bound method ``source`` lists as hibernated."""
    _KEPT.watch(source)


def set_running(kernel_names: Iterable[str]) -> None:
    """Set jupyter_server's ``kernel_currently_running_total`` to the kernels that
    have a process, given their kernelspec names."""
    counts = Tally(kernel_names)
    _running_types.update(counts)
    for name in _running_types:
        KERNEL_CURRENTLY_RUNNING_TOTAL.labels(type=name).set(counts[name])


def finished(operation: str, engine: str, seconds: float, reason: str = "") -> None:
    """Record a hibernation's or a wake's duration, and its failure if ``reason``."""
    histogram = HIBERNATE_SECONDS if operation == "hibernate" else WAKE_SECONDS
    outcome = "error" if reason else "success"
    histogram.labels(engine=engine, outcome=outcome).observe(seconds)
    if reason:
        failed(operation, reason)


def failed(operation: str, reason: str) -> None:
    """Count a failed or refused hibernation or wake."""
    FAILURES.labels(operation=operation, reason=reason).inc()
