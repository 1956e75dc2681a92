"""A broker's load (`broker_load`: what its reports to the manager carry) and its own Prometheus metrics.

With `--metrics-port` (0: off, the default; -1: any free port, in the ready file as "metrics") the broker serves
http://HOST:PORT/metrics (HOST: --metrics-host, default the host of its clients' address; prometheus_client's HTTP
server, a daemon thread), each sample labelled broker=<name>:

    cluster_broker_queue_depth{model}    requests waiting in this broker's queue
    cluster_broker_in_flight{model}      requests held at agents (a hedged request's two copies count twice)
    cluster_broker_capacity{model}       slots the agents it routes to offer for the model (their share for it)
    cluster_broker_agents                agents it routes to (not draining)
    cluster_broker_requests_total        requests it accepted
    cluster_broker_redispatched_total    requests re-sent after an agent was lost
    cluster_broker_busy_total            requests an agent answered BUSY (queued again, no attempt counted)

While a canary runs (cluster/broker/canary.py), per model:

    cluster_canary_weight{model}                          percent of unpinned requests sent to the canary here
    cluster_canary_breaker_tripped{model}                 1 once this broker's circuit breaker stopped the canary
    cluster_canary_answers_total{model,version,outcome}   answers counted (ok, error, timeout, other) per version
    cluster_canary_retries_total{model}                   failed canary requests run again on the stable version
    cluster_canary_decisions_total{model,decision}        the manager's decisions in the desired state (start,
                                                          pass...); a run's end as seen here: promote, rollback
                                                          (or abort), ended (shadow-only)
    cluster_shadow_pairs_total{model,kind}                answer pairs compared (kind: shadow, or floor: stable
    cluster_shadow_mismatched_total{model,kind}           mirrored to itself); of those, names/shapes/dtypes differ
    cluster_shadow_not_compared_total{reason}             pairs not compared (queue full, compare failed)

Thread-safety without a lock on the hot path: the broker's loop builds a fresh snapshot dict each tick and
publishes it by one assignment (`BrokerMetrics.publish`); the HTTP thread's collector only reads the latest one.
Queue depth per agent (what an autoscaler such as KEDA wants) is sum(queue_depth) / sum(agents) across brokers.
"""

from __future__ import annotations

import ipaddress
import logging

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from cluster.config import BROKER_METRICS_HOST

log = logging.getLogger("cluster.broker")

COUNTERS = {  # load key -> (metric name without _total, help)
    "requests": ("cluster_broker_requests", "Requests this broker accepted."),
    "redispatched": ("cluster_broker_redispatched", "Requests re-sent after an agent was lost."),
    "busy": ("cluster_broker_busy", "Requests an agent answered BUSY (queued again, no attempt counted)."),
}
PER_MODEL = {  # load key -> (metric name, help)
    "queued_by_model": ("cluster_broker_queue_depth", "Requests waiting in this broker's queue, by model."),
    "in_flight_by_model": ("cluster_broker_in_flight", "Requests held at agents, by model."),
    "capacity": ("cluster_broker_capacity", "Slots the agents this broker routes to offer, by model."),
}


def metrics_host_for(clients_address: str) -> str:
    """Where the metrics listen when --metrics-host does not say: the host the broker serves clients on (a broker
    reachable from other machines is scraped from them too: 0.0.0.0 in a pod), else BROKER_METRICS_HOST."""
    if not clients_address.startswith("tcp://"):
        return BROKER_METRICS_HOST
    host = clients_address[len("tcp://") :].rsplit(":", 1)[0].strip("[]")
    if host == "*":
        return "0.0.0.0"
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:  # an interface name (eth0) or a host name: say --metrics-host to be sure
        return BROKER_METRICS_HOST


def broker_load(dispatcher) -> dict:
    """This broker's load now, from its Dispatcher: {agents, in_flight, queued, capacity: {model: slots},
    queued_by_model, in_flight_by_model, requests, redispatched, busy}. O(agents x models), no request is walked.
    `in_flight` counts the slots agents hold (a hedge copy too); capacity and `agents` only agents not draining."""
    capacity: dict[str, int] = {}
    in_flight: dict[str, int] = {}
    routable = 0
    for agent in dispatcher.agents.agents.values():
        for model, n in agent.model_in_flight.items():
            in_flight[model] = in_flight.get(model, 0) + n
        if agent.beat.draining:
            continue
        routable += 1
        for model in agent.models:
            slots = min(agent.model_capacity.get(model, agent.capacity), agent.capacity)
            capacity[model] = capacity.get(model, 0) + slots
    stats = dispatcher.stats
    return {
        "agents": routable,
        "in_flight": sum(in_flight.values()),
        "queued": dispatcher.pending_count,
        "capacity": capacity,
        "queued_by_model": {model: len(queue) for model, queue in dispatcher.pending.items() if queue},
        "in_flight_by_model": in_flight,
        "requests": stats.get("requests", 0),
        "redispatched": stats.get("redispatched", 0),
        "busy": stats.get("busy", 0),
    }


class BrokerMetrics:
    """The broker's Prometheus collector over the latest published load (a registry of its own)."""

    def __init__(self, broker: str) -> None:
        self.broker = broker
        self._load: dict = {}
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)
        self._server = None

    def publish(self, load: dict) -> None:
        """The loop's snapshot (a dict it no longer changes): one assignment, atomic for the reader."""
        self._load = load

    def collect(self):
        load = self._load  # one read: every family below comes from the same snapshot
        labels = ["broker"]
        agents = GaugeMetricFamily(
            "cluster_broker_agents", "Agents this broker routes to (not draining).", labels=labels
        )
        agents.add_metric([self.broker], load.get("agents", 0))
        yield agents
        for key, (name, text) in PER_MODEL.items():
            family = GaugeMetricFamily(name, text, labels=["broker", "model"])
            for model, value in sorted((load.get(key) or {}).items()):
                family.add_metric([self.broker, model], value)
            yield family
        for key, (name, text) in COUNTERS.items():
            family = CounterMetricFamily(name, text, labels=labels)
            family.add_metric([self.broker], load.get(key, 0))
            yield family
        canary = load.get("canary")
        if canary:
            yield from self.canary_families(canary)

    def canary_families(self, canary: dict):
        """The canary series from CanarySplit.snapshot()."""
        b = self.broker
        gauges = (
            ("weight", "cluster_canary_weight", "Percent of unpinned requests this broker sends to the canary."),
            ("tripped", "cluster_canary_breaker_tripped", "1 once this broker's circuit breaker stopped the canary."),
        )
        for key, name, text in gauges:
            family = GaugeMetricFamily(name, text, labels=["broker", "model"])
            for model, value in sorted(canary[key].items()):
                family.add_metric([b, model], value)
            yield family
        answers = CounterMetricFamily(
            "cluster_canary_answers",
            "Answers counted per version under canary.",
            labels=["broker", "model", "version", "outcome"],
        )
        for (model, version, outcome), n in sorted(canary["answers"].items()):
            answers.add_metric([b, model, str(version), outcome], n)
        yield answers
        retries = CounterMetricFamily(
            "cluster_canary_retries",
            "Failed canary requests run again on the stable version.",
            labels=["broker", "model"],
        )
        for model, n in sorted(canary["retries"].items()):
            retries.add_metric([b, model], n)
        yield retries
        decisions = CounterMetricFamily(
            "cluster_canary_decisions", "The manager's canary decisions.", labels=["broker", "model", "decision"]
        )
        for (model, decision), n in sorted(canary["decisions"].items()):
            decisions.add_metric([b, model, decision], n)
        yield decisions
        pairs = CounterMetricFamily(
            "cluster_shadow_pairs", "Shadow answer pairs compared.", labels=["broker", "model", "kind"]
        )
        mismatched = CounterMetricFamily(
            "cluster_shadow_mismatched",
            "Shadow pairs whose outputs differ in names, shapes or dtypes.",
            labels=["broker", "model", "kind"],
        )
        for (model, kind), (n, bad) in sorted(canary["shadow"].items()):
            pairs.add_metric([b, model, kind], n)
            mismatched.add_metric([b, model, kind], bad)
        yield pairs
        yield mismatched
        uncompared = CounterMetricFamily(
            "cluster_shadow_not_compared", "Shadow pairs not compared.", labels=["broker", "reason"]
        )
        for reason, n in sorted(canary["not_compared"].items()):
            uncompared.add_metric([b, reason], n)
        yield uncompared

    def serve(self, host: str, port: int) -> str:
        """Serve /metrics on host:port (-1: any free port) in a daemon thread; returns its http:// URL."""
        self._server, _ = start_http_server(max(0, port), host, self.registry)
        bound = self._server.server_port
        url = f"http://{host if ':' not in host else f'[{host}]'}:{bound}"
        log.info("broker metrics on %s/metrics", url)
        return url

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
