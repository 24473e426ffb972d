"""Prometheus metrics of a server (prometheus-client), served over HTTP on an optional port.

From the server, per call and per finished turn:
    pensieve_requests_total{method, code}             RPCs by method and final status code
    pensieve_active_streams                           Chat / Generate calls in progress
    pensieve_tokens_total{kind}                       prompt, cached, prefilled, recomputed,
                                                      completion tokens of finished turns
    pensieve_time_to_first_token_seconds              histogram, per turn
    pensieve_time_per_output_token_seconds            histogram, per turn: (total - ttft) /
                                                      (completion_tokens - 1)
    pensieve_turn_duration_seconds                    histogram, per turn
From the engine's stats() at each scrape:
    pensieve_cache_hit_tokens_total{tier}             prompt tokens served from the cache
    pensieve_cache_miss_tokens_total{kind}            prefilled / recomputed prompt tokens
    pensieve_kv_pages{tier, state}                    KV pages used / free per tier
    pensieve_running_turns, pensieve_waiting_turns, pensieve_conversations,
    pensieve_cached_tokens_resident, pensieve_preemptions_total, pensieve_evicted_tokens_total,
    pensieve_engine_steps_total, pensieve_compilations_total
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from pensieve_jax.engine.request import Usage

if TYPE_CHECKING:
    from pensieve_jax.engine.engine import Engine

log = logging.getLogger(__name__)

TOKEN_KINDS = ("prompt", "cached", "prefilled", "recomputed", "completion")
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                   30.0, 60.0)


class EngineCollector(Collector):
    """Reads engine.stats() at scrape time."""

    def __init__(self, engine: "Engine"):
        self.engine = engine

    def collect(self):
        try:
            stats = self.engine.stats()
        except Exception:  # a scrape must not fail the server
            log.exception("engine stats failed")
            return
        hits = CounterMetricFamily("pensieve_cache_hit_tokens",
                                   "Prompt tokens served from the KV cache, by tier", labels=["tier"])
        for tier, n in (stats.get("hit_tokens_by_tier") or {"device": stats["hit_tokens"]}).items():
            hits.add_metric([tier], n)
        yield hits
        misses = CounterMetricFamily("pensieve_cache_miss_tokens",
                                     "Prompt tokens computed: prefilled (new) or recomputed "
                                     "(their cache had been dropped)", labels=["kind"])
        misses.add_metric(["prefilled"], stats["prefilled_tokens"])
        misses.add_metric(["recomputed"], stats["recomputed_tokens"])
        yield misses
        pages = GaugeMetricFamily("pensieve_kv_pages", "KV cache pages by tier and state",
                                  labels=["tier", "state"])
        for tier, p in stats["pages"].items():
            pages.add_metric([tier, "used"], p["used"])
            pages.add_metric([tier, "free"], p["free"])
        yield pages
        for name, key, doc in (("running_turns", "running", "Turns being computed"),
                               ("waiting_turns", "waiting", "Turns queued"),
                               ("conversations", "conversations", "Conversations the engine holds"),
                               ("cached_tokens_resident", "cached_tokens_resident",
                                "Tokens with KV held for idle conversations")):
            yield GaugeMetricFamily(f"pensieve_{name}", doc, value=stats[key])
        for name, key, doc in (("preemptions", "preemptions", "Running turns preempted"),
                               ("evicted_tokens", "evicted_tokens", "Cached tokens evicted"),
                               ("engine_steps", "steps", "Engine steps run"),
                               ("compilations", "compilations", "Step shapes compiled")):
            yield CounterMetricFamily(f"pensieve_{name}", doc, value=stats[key])
        disk = stats.get("disk") or {}
        if disk.get("enabled"):            # the disk tier (EngineConfig.disk_cache_bytes)
            yield GaugeMetricFamily("pensieve_disk_cache_bytes", "Bytes of KV page files on disk",
                                    value=disk["used_bytes"])
            yield CounterMetricFamily("pensieve_disk_served_tokens",
                                      "Prompt tokens whose KV was loaded from disk",
                                      value=disk["served_tokens"])
            yield CounterMetricFamily("pensieve_disk_load_seconds",
                                      "Time spent reading page files", value=disk["load_s"])


class Metrics:
    def __init__(self, engine: "Engine | None" = None, registry: CollectorRegistry | None = None):
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter("pensieve_requests", "RPCs by method and final status code",
                                ["method", "code"], registry=r)
        self.active = Gauge("pensieve_active_streams", "Chat and Generate calls in progress",
                            registry=r)
        self.tokens = Counter("pensieve_tokens", "Tokens of finished turns by kind", ["kind"],
                              registry=r)
        self.ttft = Histogram("pensieve_time_to_first_token_seconds",
                              "Time from a turn's arrival at the engine to its first token",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("pensieve_time_per_output_token_seconds",
                              "Mean time between output tokens of a turn",
                              buckets=LATENCY_BUCKETS, registry=r)
        self.duration = Histogram("pensieve_turn_duration_seconds", "Whole turn",
                                  buckets=LATENCY_BUCKETS, registry=r)
        if engine is not None:
            r.register(EngineCollector(engine))
        self._http = None

    def observe_turn(self, usage: Usage) -> None:
        for kind in TOKEN_KINDS:
            self.tokens.labels(kind).inc(getattr(usage, f"{kind}_tokens"))
        if usage.completion_tokens:
            self.ttft.observe(usage.ttft_s)
        if usage.completion_tokens > 1:
            self.tpot.observe((usage.total_s - usage.ttft_s) / (usage.completion_tokens - 1))
        self.duration.observe(usage.total_s)

    def serve(self, port: int, host: str = "127.0.0.1") -> int:
        """Serve /metrics over HTTP; returns the port (port 0: a free one)."""
        self._http, _ = start_http_server(port, addr=host, registry=self.registry)
        return self._http.server_port

    def close(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
