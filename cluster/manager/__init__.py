"""The lifecycle manager role: the registry of live agents (registry.py), the desired deployments and their rollouts
(deployments.py), both without sockets, and the process that runs them (manager.py)."""

from cluster.manager.manager import Manager
from cluster.manager.registry import Registry

__all__ = ["Manager", "Registry"]
