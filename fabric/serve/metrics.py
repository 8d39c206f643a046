"""The gateway's Prometheus metrics (prometheus-client), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LAT = (.0005, .001, .002, .005, .01, .02, .05, .1, .2, .5, 1, 2, 5, 10, 30)
_SIZES = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("fabric_serve_requests", "HTTP requests answered", ["deployment", "code"], registry=r)
        self.latency = Histogram("fabric_serve_request_seconds", "request latency in the gateway, total",
                                 ["deployment"], buckets=_LAT, registry=r)
        self.queue = Histogram("fabric_serve_queue_seconds", "time a request waited for a replica",
                               ["deployment"], buckets=_LAT, registry=r)
        self.compute = Histogram("fabric_serve_compute_seconds", "time of the replica call a request rode in",
                                 ["deployment"], buckets=_LAT, registry=r)
        self.in_flight = Gauge("fabric_serve_in_flight", "requests queued or running", ["deployment"], registry=r)
        self.batch = Histogram("fabric_serve_batch_size", "requests per replica call", ["deployment"],
                               buckets=_SIZES, registry=r)
        self.replicas = Gauge("fabric_serve_replicas", "replicas by state", ["deployment", "state"], registry=r)
        self._counters = {}

    def for_deployment(self, name):
        """Pre-bound children: a label lookup per request costs more than the increment."""
        return (self.latency.labels(name), self.queue.labels(name), self.compute.labels(name),
                self.in_flight.labels(name), self.batch.labels(name))

    def count(self, name, code):
        c = self._counters.get((name, code))
        if c is None:
            c = self._counters[(name, code)] = self.requests.labels(name, str(code))
        c.inc()

    def forget(self, name):
        for m in (self.latency, self.queue, self.compute, self.in_flight, self.batch):
            try:
                m.remove(name)
            except KeyError:
                pass

    def render(self) -> bytes:
        return generate_latest(self.registry)
