"""The edge's Prometheus metrics, in a registry of its own (so several apps in one process never collide).

    edge_requests_total{model, outcome}    inference requests by outcome: success, bad_request, not_found,
                                           too_large, overloaded, unavailable, timeout, failed, error
    edge_request_seconds{model}            latency of inference requests (histogram), whatever the outcome
    edge_batch_size{model}                 requests in the agent's forward pass that served each request (histogram)
    edge_queue_wait_seconds{model}         time each request waited in the agent for a worker or a batch (histogram)
    edge_requests_in_flight                inference requests being served now
    edge_agents_alive                      live agents the broker reports (refreshed at each scrape)
    edge_broker_up                         1 if the broker answered the last scrape's query, else 0

The `model` label only takes names the cluster has confirmed (a bus answer other than "not found"); any other
name is counted as "_other", so random paths cannot blow up the label set.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

OTHER_MODEL = "_other"
MAX_MODEL_LABELS = 1000
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EdgeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edge_requests",
            "Inference requests through the edge, by model and outcome.",
            ["model", "outcome"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edge_request_seconds",
            "Latency of inference requests through the edge, by model.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.batch_size = Histogram(
            "edge_batch_size",
            "Requests in the agent's forward pass that served each request (dynamic batching).",
            ["model"],
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            registry=self.registry,
        )
        self.queue_wait = Histogram(
            "edge_queue_wait_seconds",
            "Time a request waited in the agent for a worker or for its batch to fill.",
            ["model"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "edge_requests_in_flight", "Inference requests being served now.", registry=self.registry
        )
        self.agents_alive = Gauge("edge_agents_alive", "Live agents the broker reports.", registry=self.registry)
        self.broker_up = Gauge(
            "edge_broker_up", "1 if the broker answered the last query, else 0.", registry=self.registry
        )
        self.known_models: set[str] = set()

    def confirm_model(self, model: str) -> None:
        """The cluster knows this model: count it under its own name from now on."""
        if len(self.known_models) < MAX_MODEL_LABELS:
            self.known_models.add(model)

    def label(self, model: str) -> str:
        return model if model in self.known_models else OTHER_MODEL

    def observe(self, model: str, outcome: str, seconds: float) -> None:
        label = self.label(model)
        self.requests.labels(model=label, outcome=outcome).inc()
        self.latency.labels(model=label).observe(seconds)

    def observe_batching(self, model: str, batch_size: int | None, queue_seconds: float | None) -> None:
        label = self.label(model)
        if batch_size is not None:
            self.batch_size.labels(model=label).observe(batch_size)
        if queue_seconds is not None:
            self.queue_wait.labels(model=label).observe(queue_seconds)

    def set_cluster(self, agents: int | None) -> None:
        """Record what the broker said at a scrape; None = it did not answer."""
        self.broker_up.set(0 if agents is None else 1)
        self.agents_alive.set(agents or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
