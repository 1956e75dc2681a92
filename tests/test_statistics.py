"""The statistics extension and the Triton-named metrics on a real cluster: requests through the bus client and
the HTTP edge are all counted (on the agents), and the edge's /v2/models/echo/stats (read with unmodified
tritonclient.http) and /metrics show the sum over both agents."""

from __future__ import annotations

import re
import shutil

import httpx
import numpy as np
import pytest
import tritonclient.http as triton_http

from tests.harness import LocalCluster, wait_for

pytestmark = pytest.mark.cluster
BUS_REQUESTS, HTTP_REQUESTS = 7, 5


def test_stats_and_metrics_count_every_door(demo_share, tmp_path):
    share = tmp_path / "share"
    shutil.copytree(demo_share, share)
    cluster = LocalCluster(share, tmp_path / "logs")
    try:
        cluster.start_manager()
        cluster.start_broker()
        cluster.start_agents(2)
        cluster.wait_for_agents(2, model="echo")
        cluster.start_edge()
        url = cluster.edge_url
        with cluster.client() as client:
            for _ in range(BUS_REQUESTS):
                client.infer("echo", {"x": np.ones((1, 4), np.float32)})
        body = {"inputs": [{"name": "x", "shape": [1, 2], "datatype": "FP32", "data": [1, 2]}]}
        for _ in range(HTTP_REQUESTS):
            answer = httpx.post(f"{url}/v2/models/echo/infer", json=body, timeout=30)
            assert answer.status_code == 200, answer.text
        expected = BUS_REQUESTS + HTTP_REQUESTS
        triton = triton_http.InferenceServerClient(url.split("://", 1)[1])

        def counted():
            stats = triton.get_inference_statistics("echo")["model_stats"]
            return stats if stats and stats[0]["inference_stats"]["success"]["count"] >= expected else None

        stats = wait_for(counted, 15, f"{expected} successes in /v2/models/echo/stats")[0]
        assert stats["name"] == "echo" and stats["version"] == "1"
        assert stats["inference_stats"]["success"]["count"] == expected, stats
        assert stats["execution_count"] == expected, stats
        assert stats["inference_stats"]["fail"]["count"] == 0, stats
        metrics = httpx.get(f"{url}/metrics", timeout=30).text
        per_agent = re.findall(r'^nv_inference_request_success\{[^}]*model="echo"[^}]*\} (\S+)$', metrics, re.M)
        assert sum(float(v) for v in per_agent) == expected, metrics
    except BaseException:
        print(cluster.logs())
        raise
    finally:
        cluster.stop_all()
