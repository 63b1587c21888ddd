"""Prometheus metrics of one server (a registry of its own, so that several servers in one process coexist)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

PREFIX = "zeros_lm_"
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(PREFIX + "requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter(PREFIX + "prompt_tokens", "prompt tokens of finished requests (cached included)",
                                     registry=r)
        self.cached_tokens = Counter(PREFIX + "cached_tokens", "prompt tokens taken from a session's state, not re-read",
                                     registry=r)
        self.prefill_tokens = Counter(PREFIX + "prefill_tokens", "tokens read by prefill steps", registry=r)
        self.generated_tokens = Counter(PREFIX + "generated_tokens", "tokens generated", registry=r)
        self.cancelled_streams = Counter(PREFIX + "cancelled_streams",
                                         "streams that stopped because their client went away", registry=r)
        self.rejected = Counter(PREFIX + "rejected_requests", "requests refused before they started, by reason",
                                ["reason"], registry=r)
        self.session_spills = Counter(PREFIX + "session_spills", "idle sessions written to state files", registry=r)
        self.session_drops = Counter(PREFIX + "session_drops", "idle sessions dropped (no --state-dir)", registry=r)
        self.session_restores = Counter(PREFIX + "session_restores", "sessions read back from state files", registry=r)
        self.decode_steps = Counter(PREFIX + "decode_steps", "batched decode steps", registry=r)
        self.active_streams = Gauge(PREFIX + "active_streams", "streams prefilling or decoding", registry=r)
        self.waiting_requests = Gauge(PREFIX + "waiting_requests", "requests queued for a free slot", registry=r)
        self.sessions_in_memory = Gauge(PREFIX + "sessions_in_memory", "idle sessions held in memory", registry=r)
        self.session_bytes = Gauge(PREFIX + "session_state_bytes", "bytes of the idle sessions held in memory",
                                   registry=r)
        self.active_state_bytes = Gauge(PREFIX + "active_state_bytes", "bytes of the decoding streams' batched cache",
                                        registry=r)
        self.batch_size = Histogram(PREFIX + "decode_batch_size", "streams per decode step", buckets=BATCH_BUCKETS,
                                    registry=r)
        self.time_to_first_token = Histogram(PREFIX + "time_to_first_token_seconds", "arrival to first token",
                                             buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram(PREFIX + "inter_token_seconds", "time between a stream's tokens",
                                     buckets=LATENCY_BUCKETS, registry=r)
