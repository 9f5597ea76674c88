"""The server's Prometheus metrics (`GET /metrics`, text exposition format, through prometheus_client).

Each app gets its own registry, so several servers (tests) can live in one process. Latencies are measured on
the engine thread when a token leaves `engine.step()`: time to first token from the request's submission, and
the gap between two consecutive tokens of the same completion.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queued = Gauge("lmforge_queue_waiting_requests", "requests waiting for a batch row", registry=r)
        self.running = Gauge("lmforge_running_rows", "completions decoding now (batch rows in use)", registry=r)
        self.requests = Counter("lmforge_requests", "HTTP API requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.finished = Counter("lmforge_completions_finished", "completions by finish reason", ["reason"],
                                registry=r)
        self.prompt_tokens = Counter("lmforge_prompt_tokens", "prompt tokens submitted", registry=r)
        self.generation_tokens = Counter("lmforge_generation_tokens", "tokens generated", registry=r)
        self.ttft = Histogram("lmforge_time_to_first_token_seconds", "submission to first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.prefix_hit_rate = Gauge("lmforge_prefix_cache_hit_rate",
                                     "share of prompt tokens whose keys/values came from the prefix cache", registry=r)
        self.prefix_hit_tokens = Gauge("lmforge_prefix_cache_hit_tokens", "prompt tokens served from the prefix cache",
                                       registry=r)
        self.prefix_blocks = Gauge("lmforge_prefix_cache_blocks", "blocks held by the prefix cache", registry=r)
        self.inter_token = Histogram("lmforge_inter_token_latency_seconds", "gap between two tokens of a completion",
                                     buckets=LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
