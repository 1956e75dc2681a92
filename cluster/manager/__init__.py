"""The lifecycle manager role: the registry of live agents (registry.py), the desired deployments and their rollouts
(deployments.py), both without sockets, and the process that runs them (manager.py).

`Manager` and `Registry` are imported on first use: `cluster deploy` and the edge only need cluster.manager.client,
and every CLI command's start-up counts (bench/cold_start.py).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.manager.manager import Manager
    from cluster.manager.registry import Registry

__all__ = ["Manager", "Registry"]


def __getattr__(name: str):
    if name == "Manager":
        from cluster.manager.manager import Manager

        return Manager
    if name == "Registry":
        from cluster.manager.registry import Registry

        return Registry
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
