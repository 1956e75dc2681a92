"""The broker role: routes client requests to live agents. broker.py is the socket loop; dispatcher.py (requests,
queues, deadlines, re-dispatch) and agents.py (the live agents and what they serve) are its logic, without I/O;
routing.py holds the policies that pick an agent."""

from cluster.broker.agents import AgentEntry, AgentTable
from cluster.broker.broker import Broker
from cluster.broker.dispatcher import BrokerRequest, Dispatcher, Send
from cluster.broker.routing import LeastOutstanding, RoundRobin, RoutingPolicy, make_policy

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
