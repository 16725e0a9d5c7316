"""Prometheus metrics of ``fips serve`` (``GET /metrics``, text exposition format; prometheus_client).

Each server has its own registry (several apps in one process, as in the tests, do not collide)."""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram,
                               disable_created_metrics, generate_latest)

__all__ = ["Metrics", "CONTENT_TYPE_LATEST"]

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, max_batch: int = 16):
        disable_created_metrics()  # no *_created series (process-wide; they only add noise here)
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter("fips_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("fips_prompt_tokens", "Prompt tokens of accepted generation requests",
                                     registry=r)
        self.completion_tokens = Counter("fips_completion_tokens", "Generated tokens", registry=r)
        self.queue_depth = Gauge("fips_queue_depth", "Sequences waiting for a batch slot", registry=r)
        self.active = Gauge("fips_active_sequences", "Sequences admitted (prefilling or decoding)", registry=r)
        buckets = sorted({1, 2, 4, 8, 16, 32, 64, 128, 256, max_batch})
        self.batch_size = Histogram("fips_batch_size", "Sequences decoded per session call", registry=r,
                                    buckets=[b for b in buckets if b <= max(1, max_batch)])
        self.ttft = Histogram("fips_time_to_first_token_seconds", "From queueing to the first generated token",
                              registry=r, buckets=_LATENCY)
        self.itl = Histogram("fips_inter_token_latency_seconds", "Between two generated tokens of a sequence",
                             registry=r, buckets=_LATENCY)
        self.step_seconds = Histogram("fips_decode_step_seconds", "One batched decode step (session call)",
                                      registry=r, buckets=_LATENCY)
        self.prefill_seconds = Histogram("fips_prefill_chunk_seconds", "One prefill chunk (session call)",
                                         registry=r, buckets=_LATENCY)
        self.rejected = Counter("fips_rejected", "Requests refused for overload or shutdown", ["reason"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
