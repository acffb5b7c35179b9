"""
The proxy's counters and histograms, in memory (per-backend load counts are
L{edgeproxy.routing.load.LoadTable}).

Both are written on the data plane's hot path, so they are plain
dictionaries of ints: no string formatting, and a histogram observation
allocates nothing but its float sum.  The Prometheus names, help texts and
label names are given only at scrape time, by
L{edgeproxy.control.metrics.EdgeproxyCollector}.
"""

from __future__ import annotations

from bisect import bisect_left
from typing import Container, Dict, List, Mapping, Sequence, Tuple

import attrs
from zope.interface import implementer

from edgeproxy.interfaces import IMetricsStore

__all__ = ["CONNECT_SECONDS_BUCKETS", "HistogramSnapshot", "MetricsStore"]

#: Upper bounds (seconds) of the default histogram buckets, fit for the
#: backend connect latency: from half a millisecond on a LAN to a 10 s
#: connect timeout.  An implicit C{+Inf} bucket follows.
CONNECT_SECONDS_BUCKETS: Tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)


@attrs.frozen
class HistogramSnapshot:
    """
    A copy of one histogram.

    @ivar bounds: The finite upper bounds, ascending.
    @ivar counts: Observations per bucket, not cumulative: C{counts[i]} is
        how many values were in C{(bounds[i-1], bounds[i]]}, and the last
        entry (one more than C{bounds}) those above the last bound.
    @ivar sum: Sum of every observed value.
    @ivar count: Number of observations.
    """

    bounds: Tuple[float, ...]
    counts: Tuple[int, ...]
    sum: float
    count: int


class _Histogram:
    __slots__ = ("bounds", "count", "counts", "sum")

    def __init__(self, bounds: Tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts: List[int] = [0] * (len(bounds) + 1)
        self.sum = 0.0
        self.count = 0


@implementer(IMetricsStore)
class MetricsStore:
    """
    An in-memory L{IMetricsStore}.

    @param buckets: Bucket upper bounds per histogram name; a name not in it
        gets L{CONNECT_SECONDS_BUCKETS}.
    """

    def __init__(self, buckets: Mapping[str, Sequence[float]] | None = None) -> None:
        self._counters: Dict[Tuple[str, str], int] = {}
        self._histograms: Dict[str, _Histogram] = {}
        self._buckets: Dict[str, Tuple[float, ...]] = {}
        for name, bounds in (buckets or {}).items():
            ordered = tuple(float(b) for b in bounds)
            if list(ordered) != sorted(set(ordered)):
                raise ValueError(f"buckets of {name!r} must be strictly increasing")
            self._buckets[name] = ordered

    def __repr__(self) -> str:
        return f"<MetricsStore counters={len(self._counters)} histograms={len(self._histograms)}>"

    def increment(self, name: str, label: str = "", amount: int = 1) -> None:
        """
        See L{IMetricsStore.increment}.
        """
        key = (name, label)
        counters = self._counters
        counters[key] = counters.get(key, 0) + amount

    def observe(self, name: str, value: float) -> None:
        """
        See L{IMetricsStore.observe}.  A value equal to a bound falls in that
        bound's bucket (Prometheus's C{le}).
        """
        histogram = self._histograms.get(name)
        if histogram is None:
            histogram = self._histograms[name] = _Histogram(
                self._buckets.get(name, CONNECT_SECONDS_BUCKETS)
            )
        histogram.counts[bisect_left(histogram.bounds, value)] += 1
        histogram.sum += value
        histogram.count += 1

    def counter(self, name: str, label: str = "") -> int:
        """
        See L{IMetricsStore.counter}.
        """
        return self._counters.get((name, label), 0)

    def counters(self) -> Mapping[Tuple[str, str], int]:
        """
        See L{IMetricsStore.counters}.
        """
        return dict(self._counters)

    def histograms(self) -> Mapping[str, HistogramSnapshot]:
        """
        A copy of every histogram observed so far, by name.
        """
        return {
            name: HistogramSnapshot(h.bounds, tuple(h.counts), h.sum, h.count)
            for name, h in self._histograms.items()
        }

    def retain(self, name: str, labels: Container[str]) -> int:
        """
        Drop every counter called C{name} whose label is not in C{labels}
        (for counters labelled with a backend id, when the backend leaves
        the routing table).

        @return: How many counters were dropped.
        """
        counters = self._counters
        gone = [key for key in counters if key[0] == name and key[1] not in labels]
        for key in gone:
            del counters[key]
        return len(gone)
