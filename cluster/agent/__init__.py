"""The agent role: hosts models and answers inference requests. See agent.py (I/O), link.py (the broker
link), recovery.py (restart by exit) and runner.py (inference).

`Agent` is imported on first use, not with the package: importing the package (cluster.agent.runner's users, the
torch-free tests) must not import torch (about 1.5 s and 300 MB of RSS).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from cluster.agent.agent import Agent

__all__ = ["Agent"]


def __getattr__(name: str):
    if name == "Agent":
        from cluster.agent.agent import Agent

        return Agent
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
