"""The broker role: routes client requests to live agents. broker.py is the socket loop; dispatcher.py (requests,
queues, deadlines, re-dispatch) and agents.py (the live agents and what they serve) are its logic, without I/O;
admission.py, stalls.py and registration.py decide for the dispatcher (it applies what they return); routing.py
holds the policies that pick an agent. Imports go one way: broker -> dispatcher -> its parts -> agents."""

from cluster.broker.agents import AgentEntry, AgentTable, BrokerRequest
from cluster.broker.broker import Broker
from cluster.broker.dispatcher import Dispatcher
from cluster.broker.routing import LeastOutstanding, RoundRobin, RoutingPolicy, make_policy
from cluster.broker.sends import Send

__all__ = [
    "AgentEntry",
    "AgentTable",
    "Broker",
    "BrokerRequest",
    "Dispatcher",
    "LeastOutstanding",
    "RoundRobin",
    "RoutingPolicy",
    "Send",
    "make_policy",
]
