"""Prometheus metrics of one app (a registry of its own, so that several apps can live in one process).

Totals over the process life (frames, answers, latencies) are plain counters and histograms.
Per-stream values are read from the open streams when scraped, so a stream's series go away with
it: the ``stream`` label takes at most ``max_streams`` values at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from mukv.serve.streams import ServedStream

# Seconds: a token on a GPU takes milliseconds, a first token on a CPU behind a backlog seconds.
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)
CONTENT_TYPE = CONTENT_TYPE_LATEST


class ServeMetrics:
    """The counters the server updates, plus a collector of per-stream values read at scrape time."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.frames_ingested = Counter(
            "mukv_frames_ingested", "Frames encoded into a stream's memory (all streams).", registry=self.registry
        )
        self.frames_dropped = Counter(
            "mukv_frames_dropped",
            "Frames received but never encoded (all streams), by reason: queue_full (the oldest waiting "
            "frames of a stream that fell behind), memory_budget, stream_closed, encode_failed.",
            ["reason"],
            registry=self.registry,
        )
        self.answers = Counter(
            "mukv_answers",
            "Questions by outcome: completed, cancelled (client gone), failed.",
            ["outcome"],
            registry=self.registry,
        )
        self.answer_tokens = Counter(
            "mukv_answer_tokens",
            "Answer tokens produced (token events, also of cancelled answers).",
            registry=self.registry,
        )
        self.first_token = Histogram(
            "mukv_question_first_token_seconds",
            "Request received -> first answer token (queueing included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.answer_seconds = Histogram(
            "mukv_question_seconds",
            "Request received -> answer done (queueing included).",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )

    def watch(self, streams: Callable[[], Iterable[ServedStream]], queue_depth: Callable[[], dict[str, int]]) -> None:
        """Report per-stream values and the device queue, read from these callables at each scrape."""
        self.registry.register(_LiveCollector(streams, queue_depth))

    def render(self) -> bytes:
        """The text exposition format (content type :data:`CONTENT_TYPE`)."""
        return generate_latest(self.registry)


class _LiveCollector:
    def __init__(
        self, streams: Callable[[], Iterable[ServedStream]], queue_depth: Callable[[], dict[str, int]]
    ) -> None:
        self._streams = streams
        self._queue_depth = queue_depth

    def describe(self) -> list[Metric]:
        return []  # values exist only at scrape time

    def collect(self) -> Iterator[Metric]:
        streams = list(self._streams())
        ingested = CounterMetricFamily(
            "mukv_stream_frames_ingested", "Frames encoded into this stream's memory.", labels=["stream"]
        )
        dropped = CounterMetricFamily(
            "mukv_stream_frames_dropped",
            "Frames of this stream never encoded, by reason (those above, and source_behind: dropped by a "
            "live source's reader before the stream took them).",
            labels=["stream", "reason"],
        )
        memory = GaugeMetricFamily("mukv_stream_memory_bytes", "Bytes held by this stream's memory.", labels=["stream"])
        queued = GaugeMetricFamily(
            "mukv_stream_queued_frames", "Frames of this stream waiting to be encoded.", labels=["stream"]
        )
        for stream in streams:
            info = stream.counters()
            ingested.add_metric([stream.id], info["encoded"])
            for reason, count in info["dropped_by_reason"].items():
                dropped.add_metric([stream.id, reason], count)
            memory.add_metric([stream.id], stream.memory_bytes)
            queued.add_metric([stream.id], info["queued"])
        depth = GaugeMetricFamily(
            "mukv_device_queue_depth", "Jobs waiting for the device worker, by kind.", labels=["kind"]
        )
        for kind, count in self._queue_depth().items():
            depth.add_metric([kind], count)
        open_streams = GaugeMetricFamily("mukv_streams_open", "Streams open.", value=len(streams))
        yield from (ingested, dropped, memory, queued, depth, open_streams)
