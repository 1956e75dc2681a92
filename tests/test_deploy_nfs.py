"""The share over real NFS: nfs-ganesha serves it, agents configured with an nfs:// address fetch each version into
their local cache (sha256-checked) and serve it, and a deploy reaches them the same way."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from cluster.demo_models import train_digits
from tests.harness import REPO_ROOT, wait_for
from tests.nfs_server import ganesha_server, nfs_available

pytestmark = [pytest.mark.nfs, pytest.mark.cluster]


def test_agents_serve_models_from_an_nfs_share(cluster, share, tmp_path):
    ok, reason = nfs_available()
    if not ok:
        pytest.skip(reason)
    with ganesha_server(share, tmp_path / "ganesha") as url:
        cluster.start_manager()  # the manager (and `cluster deploy`) write the share where it is exported
        cluster.start_broker()
        for i in range(2):
            cluster.start_agent(f"nfs-agent-{i}", CLUSTER_SHARE=url, CLUSTER_SHARE_CACHE=str(tmp_path / f"cache-{i}"))
        cluster.wait_for_agents(2, model="digits")
        client = cluster.client()
        assert client.infer("digits", {"image": np.zeros((1, 8, 8), np.float32)}).version == 1
        for i in range(2):
            cached = tmp_path / f"cache-{i}" / "models" / "digits" / "1"
            assert (cached / "model.pt").is_file() and (cached / "manifest.json").is_file(), (
                f"agent {i} did not use its NFS cache"
            )

        model = tmp_path / "digits-v2.pt"
        train_digits(seed=1).save(str(model))
        out = subprocess.run(
            [sys.executable, "-m", "cluster", "deploy", str(model), "--name", "digits"],
            env=cluster.env(),
            capture_output=True,
            text=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        image = {"image": np.zeros((1, 8, 8), np.float32)}
        wait_for(lambda: client.infer("digits", image).version == 2, 10, "v2 to answer")
        for i in range(2):
            assert (tmp_path / f"cache-{i}" / "models" / "digits" / "2" / "model.pt").is_file()
        cluster.stop_all()  # agents stop before the NFS server does
