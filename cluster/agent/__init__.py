"""The agent role: hosts models and answers inference requests. See agent.py (I/O) and runner.py (inference)."""

from cluster.agent.agent import Agent

__all__ = ["Agent"]
