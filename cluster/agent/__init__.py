"""The agent role: hosts models and answers inference requests. See agent.py (I/O), link.py (the broker
link), recovery.py (restart by exit) and runner.py (inference).

`Agent` is imported on first use, not with the package: the edge reads cluster.agent.stats (torch-free), and importing
the package must not import torch into it (about 1.5 s and 300 MB of RSS).
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
