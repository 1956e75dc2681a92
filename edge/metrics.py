"""The edge's Prometheus metrics, in a registry of its own (so several apps in one process never collide).

    edge_requests_total{model, outcome, protocol}
                                           inference requests by outcome: success, bad_request, not_found,
                                           too_large, overloaded, unavailable, timeout, failed, cancelled, error;
                                           protocol: http (REST) or grpc
    edge_request_seconds{model, protocol}  latency of inference requests (histogram), whatever the outcome
    edge_batch_size{model}                 requests in the agent's forward pass that served each request (histogram)
    edge_queue_wait_seconds{model}         time each request waited in the agent for a worker or a batch (histogram)
    edge_requests_in_flight                inference requests being served now
    edge_agents_alive                      live agents the broker reports (refreshed at each scrape)
    edge_broker_up                         1 if the broker answered the last scrape's query, else 0

Cluster-wide, built at each scrape from one `statistics` query to the broker (agents' counts from their latest
heartbeats; an agent that leaves takes its counts with it, so these may drop), in Triton's names, exactly
(counters without a `_total` suffix, as Triton writes them), labelled model, version, agent:
    nv_inference_request_success                 requests answered
    nv_inference_request_failure{reason}         requests failed: BACKEND (the model raised), TIMEOUT (deadline
                                                 passed before it ran), CANCELED (client gave up before it ran)
    nv_inference_count                           inferences (samples: batch rows)
    nv_inference_exec_count                      forward passes
    nv_inference_request_duration_us             cumulative queue + compute time of successful requests
    nv_inference_queue_duration_us               cumulative broker queue + agent queue time
    nv_inference_compute_input_duration_us       cumulative time building input tensors
    nv_inference_compute_infer_duration_us       cumulative forward-pass time
    nv_inference_compute_output_duration_us      cumulative time encoding outputs
and the cluster's own, from the broker (and the manager, for the rollouts):
    cluster_agents_alive                         live agents
    cluster_broker_queue_depth{model}            requests waiting in the broker now
    cluster_broker_in_flight                     requests sent to agents, unanswered
    cluster_requests_total                       requests the broker accepted
    cluster_redispatched_total                   requests re-sent after an agent was lost
    cluster_rejected_total                       requests shed at once (overloaded)
    cluster_timeouts_total                       requests that passed their deadline in the broker
    cluster_cancelled_total                      requests their clients cancelled
    cluster_agents_lost_total                    agents that went silent or away
    cluster_rollouts_total{outcome}              rollouts finished (ok, failed), from the manager's `rollouts` query
    cluster_rollouts_in_progress                 rollouts staging or switching now

The `model` label only takes names the cluster has confirmed (a bus answer other than "not found"); any other
name is counted as "_other", so random paths cannot blow up the label set.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

OTHER_MODEL = "_other"
MAX_MODEL_LABELS = 1000
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class EdgeMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "edge_requests",
            "Inference requests through the edge, by model, outcome and protocol (http, grpc).",
            ["model", "outcome", "protocol"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "edge_request_seconds",
            "Latency of inference requests through the edge, by model and protocol (http, grpc).",
            ["model", "protocol"],
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
        self.requests_in_flight = 0  # counted by the event loop, read at a scrape (no gauge lock per request)
        self.in_flight.set_function(lambda: self.requests_in_flight)
        self.agents_alive = Gauge("edge_agents_alive", "Live agents the broker reports.", registry=self.registry)
        self.broker_up = Gauge(
            "edge_broker_up", "1 if the broker answered the last query, else 0.", registry=self.registry
        )
        self.known_models: set[str] = set()
        # the labelled children, looked up once per label (prometheus_client's labels() costs more than inc())
        self._outcome_children: dict[tuple[str, str, str], tuple] = {}
        self._batching_children: dict[tuple, object] = {}

    def confirm_model(self, model: str) -> None:
        """The cluster knows this model: count it under its own name from now on."""
        if len(self.known_models) < MAX_MODEL_LABELS:
            self.known_models.add(model)

    def label(self, model: str) -> str:
        return model if model in self.known_models else OTHER_MODEL

    def observe(self, model: str, outcome: str, seconds: float, protocol: str = "http") -> None:
        """One inference request answered, through `protocol` ("http" or "grpc")."""
        key = (self.label(model), outcome, protocol)
        children = self._outcome_children.get(key)
        if children is None:
            children = (
                self.requests.labels(model=key[0], outcome=outcome, protocol=protocol),
                self.latency.labels(model=key[0], protocol=protocol),
            )
            self._outcome_children[key] = children
        children[0].inc()
        children[1].observe(seconds)

    def observe_batching(self, model: str, batch_size: int | None, queue_seconds: float | None) -> None:
        label = self.label(model)
        if batch_size is not None:
            self._child(self.batch_size, label).observe(batch_size)
        if queue_seconds is not None:
            self._child(self.queue_wait, label).observe(queue_seconds)

    def _child(self, histogram: Histogram, label: str):
        child = self._batching_children.get((histogram, label))
        if child is None:
            child = self._batching_children[(histogram, label)] = histogram.labels(model=label)
        return child

    def set_cluster(self, agents: int | None) -> None:
        """Record what the broker said at a scrape; None = it did not answer."""
        self.broker_up.set(0 if agents is None else 1)
        self.agents_alive.set(agents or 0)

    def render(self, cluster: dict | None = None, rollouts: dict | None = None) -> bytes:
        """The edge's own metrics, plus the cluster's from a `statistics` answer (None: the broker did not answer)
        and the manager's `rollouts` answer (None: the manager did not answer)."""
        own = generate_latest(self.registry)
        families = (cluster_metric_families(cluster) if cluster is not None else []) + rollout_families(rollouts)
        if not families:
            return own
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Families(families))
        text = generate_latest(registry).decode()
        for family in families:  # prometheus_client names a counter's HELP/TYPE name_total; Triton's have no suffix
            if isinstance(family, _TritonCounter):
                for line in ("# HELP", "# TYPE"):
                    text = text.replace(f"{line} {family.name}_total ", f"{line} {family.name} ")
        return own + text.encode()


def rollout_families(answer: dict | None) -> list:
    """The manager's rollouts (deploy, rollback, repository load), finished by outcome and in progress."""
    if answer is None:
        return []
    done = CounterMetricFamily("cluster_rollouts", "Rollouts finished since the manager started.", labels=["outcome"])
    for outcome in ("ok", "failed"):
        done.add_metric([outcome], answer.get(outcome, 0))
    running = GaugeMetricFamily(
        "cluster_rollouts_in_progress", "Rollouts staging or switching now.", value=answer.get("in_progress", 0)
    )
    return [done, running]


class _Families:
    """A collector yielding families built beforehand (one scrape's)."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return self.families


class _TritonCounter(Metric):
    """A counter whose samples carry the bare name, as Triton's do (prometheus_client would add `_total`)."""

    def __init__(self, name: str, documentation: str, labels: list[str]) -> None:
        super().__init__(name, documentation, "counter")
        self.label_names = labels

    def add_metric(self, values: list[str], value: float) -> None:
        self.add_sample(self.name, dict(zip(self.label_names, values)), value)


def cluster_metric_families(answer: dict) -> list:
    """Prometheus families in Triton's names (per model, version, agent) and the cluster's own, from one answer
    of the broker's `statistics` query. Counters are the agents' totals: they drop when an agent leaves."""
    labels = ["model", "version", "agent"]

    def counter(name: str, text: str, extra: list[str] | None = None) -> _TritonCounter:
        return _TritonCounter(name, text, labels + (extra or []))

    success = counter("nv_inference_request_success", "Successful inference requests, per agent.")
    failure = counter("nv_inference_request_failure", "Failed inference requests, by reason.", ["reason"])
    count = counter("nv_inference_count", "Inferences performed (samples: batch rows).")
    executions = counter("nv_inference_exec_count", "Model executions (forward passes).")
    request_us = counter("nv_inference_request_duration_us", "Cumulative request duration (queue + compute), us.")
    queue_us = counter("nv_inference_queue_duration_us", "Cumulative time requests waited in queues, us.")
    input_us = counter("nv_inference_compute_input_duration_us", "Cumulative time building inputs, us.")
    infer_us = counter("nv_inference_compute_infer_duration_us", "Cumulative forward-pass time, us.")
    output_us = counter("nv_inference_compute_output_duration_us", "Cumulative time encoding outputs, us.")
    for agent, models in sorted((answer.get("agents") or {}).items()):
        for model, versions in sorted((models or {}).items()):
            for version, entry in sorted((versions or {}).items()):
                values = [model, str(version), agent]
                stats = entry.get("inference_stats", {})
                success.add_metric(values, stats.get("success", {}).get("count", 0))
                for reason, n in sorted((entry.get("failures") or {}).items()):
                    failure.add_metric([*values, reason], n)
                count.add_metric(values, entry.get("inference_count", 0))
                executions.add_metric(values, entry.get("execution_count", 0))
                request_us.add_metric(values, stats.get("success", {}).get("ns", 0) / 1000)
                queue_us.add_metric(values, stats.get("queue", {}).get("ns", 0) / 1000)
                input_us.add_metric(values, stats.get("compute_input", {}).get("ns", 0) / 1000)
                infer_us.add_metric(values, stats.get("compute_infer", {}).get("ns", 0) / 1000)
                output_us.add_metric(values, stats.get("compute_output", {}).get("ns", 0) / 1000)
    broker = answer.get("broker") or {}
    alive = GaugeMetricFamily(
        "cluster_agents_alive", "Live agents the broker routes to.", value=broker.get("agents", 0)
    )
    depth = GaugeMetricFamily(
        "cluster_broker_queue_depth", "Requests waiting in the broker, per model.", labels=["model"]
    )
    for model, n in sorted((broker.get("queue_depth") or {}).items()):
        depth.add_metric([model], n)
    in_flight = GaugeMetricFamily(
        "cluster_broker_in_flight", "Requests sent to agents, unanswered.", value=broker.get("in_flight", 0)
    )
    totals = [
        ("cluster_requests", "Requests the broker accepted.", "requests"),
        ("cluster_redispatched", "Requests sent again to another agent after one was lost.", "redispatched"),
        ("cluster_rejected", "Requests refused at once by load shedding (overloaded).", "shed"),
        ("cluster_timeouts", "Requests that passed their deadline in the broker.", "timeouts"),
        ("cluster_cancelled", "Requests their clients cancelled.", "cancelled"),
        ("cluster_agents_lost", "Agents that went silent or away.", "agents_lost"),
    ]
    broker_counters = [CounterMetricFamily(name, text, value=broker.get(key, 0)) for name, text, key in totals]
    return [
        success,
        failure,
        count,
        executions,
        request_us,
        queue_us,
        input_us,
        infer_us,
        output_us,
        alive,
        depth,
        in_flight,
        *broker_counters,
    ]
