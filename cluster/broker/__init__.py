"""The broker role: routes client requests to live agents. See broker.py and routing.py."""

from cluster.broker.broker import Broker
from cluster.broker.routing import LeastOutstanding, RoundRobin, RoutingPolicy, make_policy

__all__ = ["Broker", "RoutingPolicy", "RoundRobin", "LeastOutstanding", "make_policy"]
