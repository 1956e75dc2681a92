"""Logs an operator can search: `--log-format json` (cluster/logs.py) on every role, one JSON object a line, and a
request followed across processes by its request_id (the OIP `id`): the edge, the broker and the agent each log it.
In-process: the formatter's fields; on real processes: the whole path."""

from __future__ import annotations

import json
import logging

import httpx
import pytest

from cluster.logs import CONTEXT, JsonFormatter, logging_config
from tests.harness import LocalCluster, wait_for


def test_json_lines_carry_component_agent_and_request_id():
    formatter = JsonFormatter("agent")
    record = logging.LogRecord("cluster.agent", logging.WARNING, __file__, 1, "model %s failed", ("m",), None)
    record.request_id = "trace-1"
    CONTEXT["agent"] = "gpu-7"
    try:
        line = json.loads(formatter.format(record))
    finally:
        CONTEXT.pop("agent")
    assert {k: line[k] for k in ("level", "component", "agent", "message", "request_id")} == {
        "level": "WARNING",
        "component": "agent",
        "agent": "gpu-7",
        "message": "model m failed",
        "request_id": "trace-1",
    }
    assert line["time"].endswith("+00:00") and isinstance(line["pid"], int)
    with pytest.raises(ValueError, match="text, json"):
        logging_config("broker", "INFO", "xml")


def _json_lines(text: str, who: str) -> list[dict]:
    lines = [line for line in text.splitlines() if line.strip()]
    assert lines, f"{who} logged nothing"
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{who} wrote a line that is not JSON: {line[:300]}") from None
    return parsed


@pytest.mark.cluster
def test_one_request_is_followed_across_edge_broker_and_agent(share, tmp_path):
    cluster = LocalCluster(share, tmp_path / "logs", log_level="DEBUG", extra_env={"CLUSTER_LOG_FORMAT": "json"})
    try:
        cluster.start_manager()
        cluster.start_broker()
        agent = cluster.start_agent("trace-agent")
        cluster.wait_for_agents(1, model="echo")
        cluster.start_edge()
        body = {"id": "trace-me-42", "inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        answer = httpx.post(f"{cluster.edge_url}/v2/models/echo/infer", json=body, timeout=30)
        assert answer.status_code == 200, answer.text

        def traced() -> dict | None:
            found = {}
            for proc in cluster.procs:
                lines = _json_lines(proc.log(), proc.name)
                hits = [line for line in lines if line.get("request_id") == "trace-me-42"]
                if hits:
                    found[proc.role] = hits
            return found if {"edge", "broker", "agent"} <= set(found) else None

        found = wait_for(traced, 10, "request trace-me-42 in the edge's, the broker's and the agent's JSON logs")
        assert all(line["component"] == role for role, hits in found.items() for line in hits), found
        assert all(line["agent"] == "trace-agent" for line in found["agent"]), found["agent"]
        assert any("answered" in line["message"] for line in found["agent"]), found["agent"]
        assert agent.alive()
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()
