"""Prometheus metrics of one server, kept in its own CollectorRegistry.

A registry per app (not prometheus_client's global one) lets several apps live in one
process (tests, or a server beside a trainer) without "Duplicated timeseries" errors.
"""
from __future__ import annotations

import collections
import time

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge,
                               Histogram, generate_latest)

# Seconds: from a few ms (a tiny model on CPU, a decode step on an accelerator) to
# minutes (a long prompt behind a full queue).
TTFT_BUCKETS = (.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 120)
TPOT_BUCKETS = (.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5)

THROUGHPUT_WINDOW = 10.0

OUTCOMES = ("stop", "length", "cancelled", "invalid", "overloaded", "aborted", "error")


class Metrics:
    """The server's gauges, histograms and counters; `render()` is the /metrics body."""
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.queue_length = Gauge("jaxlm_queue_length", "Requests waiting to be scheduled",
                                  registry=r)
        self.running = Gauge("jaxlm_running_sequences", "Sequences being generated",
                             registry=r)
        self.pages_used = Gauge("jaxlm_pages_in_use", "KV-cache pages in use", registry=r)
        self.pages_total = Gauge("jaxlm_pages_total", "KV-cache pages in the pool", registry=r)
        self.pages_cached = Gauge("jaxlm_pages_cached", "Unreferenced pages kept for prefix "
                                  "reuse (evictable)", registry=r)
        self.programs = Gauge("jaxlm_compiled_programs", "Step shapes compiled so far",
                              registry=r)
        self.prefix_hits = Gauge("jaxlm_prefix_hit_tokens", "Prompt tokens served from "
                                 "shared pages instead of prefill", registry=r)
        self.preemptions = Gauge("jaxlm_preemptions", "Sequences preempted for pages "
                                 "(recomputed later)", registry=r)
        self.acceptance = Gauge("jaxlm_spec_acceptance_rate", "Speculative decoding: "
                                "accepted drafts / proposed drafts, since start", registry=r)
        self.per_forward = Gauge("jaxlm_spec_tokens_per_forward", "Speculative decoding: "
                                 "tokens emitted per row per verification forward, since "
                                 "start", registry=r)
        self.ttft = Histogram("jaxlm_time_to_first_token_seconds",
                              "From submission to the first generated token",
                              buckets=TTFT_BUCKETS, registry=r)
        self.tpot = Histogram("jaxlm_time_per_output_token_seconds",
                              "Mean time between a request's tokens after the first",
                              buckets=TPOT_BUCKETS, registry=r)
        self.tokens = Counter("jaxlm_generated_tokens", "Tokens generated", registry=r)
        # rate(jaxlm_generated_tokens_total[…]) is the Prometheus way; this gauge gives the
        # same over the last THROUGHPUT_WINDOW seconds to anyone reading /metrics by eye
        self.throughput = Gauge("jaxlm_tokens_per_second", "Tokens generated per second "
                                f"over the last {THROUGHPUT_WINDOW:g} s", registry=r)
        self._seen = collections.deque()   # (time, tokens generated so far)
        self.requests = Counter("jaxlm_requests", "Requests by how they ended",
                                ["outcome"], registry=r)
        for outcome in OUTCOMES:  # every series exists from the start, at 0
            self.requests.labels(outcome=outcome)

    def scheduler_stats(self, stats: dict) -> None:
        self.queue_length.set(stats.get("waiting", 0))
        self.running.set(stats.get("running", 0))
        self.pages_used.set(stats.get("pages_used", 0))
        self.pages_total.set(stats.get("pages_total", 0))
        self.pages_cached.set(stats.get("pages_cached", 0))
        self.programs.set(stats.get("compiled_programs", 0))
        self.prefix_hits.set(stats.get("prefix_hit_tokens", 0))
        self.preemptions.set(stats.get("preemptions", 0))
        if stats.get("spec_rounds"):
            self.acceptance.set(stats["spec_accepted"] / max(stats["spec_drafted"], 1))
            self.per_forward.set(stats["spec_emitted"] / stats["spec_rounds"])
        now, total = time.monotonic(), stats.get("tokens_total", 0)
        self._seen.append((now, total))
        while len(self._seen) > 2 and now - self._seen[1][0] >= THROUGHPUT_WINDOW:
            self._seen.popleft()
        then, before = self._seen[0]
        self.throughput.set((total - before) / (now - then) if now > then else 0.0)

    def finished(self, outcome: str) -> None:
        self.requests.labels(outcome=outcome).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
