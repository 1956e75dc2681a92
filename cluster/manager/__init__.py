"""The lifecycle manager role: registry of live agents from their heartbeats. See manager.py and registry.py."""

from cluster.manager.manager import Manager
from cluster.manager.registry import Registry

__all__ = ["Manager", "Registry"]
