"""The Prometheus registry behind `/metrics`, and what it exports: counts and latencies, never text.

Served beside the API (`--api`) unless `APP_METRICS=0`, behind the API's key when one is set (server.openai_api
mounts the route). Nothing in it comes from a request's content or its sender: no prompt, no token, no secret, no
address, and no model path (the loaded model is described by its kind and precision only).

| metric | type | what |
|---|---|---|
| `app_requests_total{route, status}` | counter | /v1 requests answered, by route and HTTP status |
| `app_queue_waiting` | gauge | requests waiting for the model (read from the worker at scrape time) |
| `app_batch_running` | gauge | chats decoding together in the running batch now |
| `app_generated_tokens_total{source}` | counter | tokens generated, for the API (`api`) or the page (`ui`) |
| `app_time_to_first_token_seconds{source}` | histogram | from the moment a chat joins the batch to its first token |
| `app_time_per_output_token_seconds{source}` | histogram | decode time per token after the first, per answer |
| `app_model_info{kind, quantization, dtype}` | gauge | 1 for the loaded model |
| `app_model_footprint_bytes` | gauge | the loaded model's weights in memory |
| `process_resident_memory_bytes`, ... | gauge | the process (prometheus-client's process collector) |
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, ProcessCollector
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily

from core.serving.requests import ChatResult

# Seconds; TTFT spans a GPU's few milliseconds to a long prompt on two CPU cores.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
PER_TOKEN_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0)


class Metrics:
    """One app's registry (its own, so two apps in one process, as in tests, never share counts)."""

    def __init__(self, worker) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("app_requests", "/v1 requests answered, by route and HTTP status",
                                ["route", "status"], registry=self.registry)
        self.tokens = Counter("app_generated_tokens", "Tokens generated", ["source"], registry=self.registry)
        self.ttft = Histogram("app_time_to_first_token_seconds", "Time from joining the batch to the first token",
                              ["source"], buckets=TTFT_BUCKETS, registry=self.registry)
        self.per_token = Histogram("app_time_per_output_token_seconds", "Decode time per token after the first",
                                   ["source"], buckets=PER_TOKEN_BUCKETS, registry=self.registry)
        self.registry.register(_WorkerState(worker))
        ProcessCollector(registry=self.registry)

    def request(self, route: str, status: int) -> None:
        self.requests.labels(route=route, status=str(status)).inc()

    def answered(self, result: ChatResult, source: str) -> None:
        """An answer's counts and latencies (a stopped one's too: its tokens were generated)."""
        metrics = result.metrics
        self.tokens.labels(source=source).inc(metrics.new_tokens)
        if metrics.new_tokens:
            self.ttft.labels(source=source).observe(metrics.ttft_s)
        if metrics.new_tokens > 1 and metrics.decode_tokens_per_s > 0:
            self.per_token.labels(source=source).observe(1 / metrics.decode_tokens_per_s)

    def page(self, accept: str) -> tuple[bytes, str]:
        """The exposition in the format the scraper asked for (its Accept header), and its content type."""
        encode, content_type = choose_encoder(accept)
        return encode(self.registry), content_type


class _WorkerState:
    """What the model worker is doing now, read at scrape time (its read-only counts and published snapshot)."""

    def __init__(self, worker) -> None:
        self.worker = worker

    def collect(self):
        yield GaugeMetricFamily("app_queue_waiting", "Requests waiting for the model", value=self.worker.waiting)
        yield GaugeMetricFamily("app_batch_running", "Chats decoding together in the running batch",
                                value=self.worker.together)
        snap = self.worker.snapshot
        info = GaugeMetricFamily("app_model_info", "The loaded model (1), by kind and precision",
                                 labels=["kind", "quantization", "dtype"])
        if snap is not None:
            info.add_metric([snap.report.kind, snap.spec.quant.mode, snap.spec.dtype], 1)
        yield info
        yield GaugeMetricFamily("app_model_footprint_bytes", "The loaded model's weights in memory",
                                value=snap.report.footprint_bytes if snap is not None else 0)
