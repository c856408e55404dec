"""Prometheus metrics of the server (``GET /metrics``), on a registry of their own (one per app)."""
from __future__ import annotations

from .._optional import import_extra


class Metrics:
    """requests (by endpoint, adapter, status), latency (by endpoint), batch sizes (by task), loaded
    adapters, queue depth."""

    def __init__(self):
        pc = import_extra("prometheus_client", "fastpeft serve's /metrics")
        self._pc = pc
        self.registry = pc.CollectorRegistry()
        self.requests = pc.Counter("fastpeft_requests", "HTTP requests answered",
                                   ["endpoint", "adapter", "status"], registry=self.registry)
        self.latency = pc.Histogram("fastpeft_request_latency_seconds", "time from request to answer",
                                    ["endpoint"], registry=self.registry,
                                    buckets=(.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60))
        self.batch_size = pc.Histogram("fastpeft_batch_size", "requests per model batch", ["task"],
                                       registry=self.registry, buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.adapters = pc.Gauge("fastpeft_loaded_adapters", "adapters loaded", registry=self.registry)
        self.queue = pc.Gauge("fastpeft_queue_depth", "requests waiting or running", registry=self.registry)

    def render(self) -> tuple[bytes, str]:
        return self._pc.generate_latest(self.registry), self._pc.CONTENT_TYPE_LATEST
