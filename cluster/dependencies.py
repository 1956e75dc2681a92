"""What each role of the cluster needs from PyPI: the one list that both installs are built from, that
scripts/lock.py pins (constraints.lock), and that a role's command checks before it starts (`missing`).

- `setup.py` (the repository root, distribution `torch-serving-cluster`): CORE and every ROLES list, everything
  `cluster up` needs. The README's first command installs it.
- `slim/setup.py` (distribution `torch-serving-cluster-slim`, the same code): CORE alone, and each ROLES list as an
  extra, so an edge or broker node installs no torch: `pip install './slim[edge]'`. See README, "Install by role".

Plain data, the standard library alone and imports only inside functions: setup.py loads it with runpy, inside
pip's isolated build environment, before anything else is installed.
"""

# Every role: the bus, the manager, the broker, the clients (Client, AsyncClient) and the `cluster` command.
CORE = [
    "numpy>=1.24",
    "pyzmq>=25",
    "msgpack>=1.0",
    "typer>=0.9",
    "rich>=13",
    "prometheus_client>=0.19",  # the broker's /metrics (and the edge's)
]

ROLES = {
    # Hosts models: `cluster agent`, and `cluster deploy --compile` (torch.export / AOTInductor at publish).
    # The floor is the oldest release the agent works with (README, "Which torch": 2.9 writes .pt2 weights without
    # pickle and has ExportedProgram.module(check_guards=)); open above it for GPU users, who install their CUDA
    # build. constraints.txt pins the CPU build for the README and CI.
    "agent": [
        "torch>=2.9",
        "Pillow>=10",  # the built-in image decode of a BYTES input (config `decode`: JPEG, PNG)
    ],
    # The Open Inference Protocol front door: `cluster edge`.
    "edge": [
        "fastapi>=0.110",
        "fastapi-offline>=1.7",  # /docs and /redoc with Swagger UI and ReDoc served by the edge, not from a CDN
        "uvicorn>=0.27",
        # the edge's event loop and HTTP parser, faster than asyncio's and h11 (what uvicorn[standard] brings;
        # uvicorn's "auto" picks them when present)
        "uvloop>=0.19; sys_platform != 'win32'",
        "httptools>=0.6",
        "pydantic>=2",
        "orjson>=3.10",  # the edge's large JSON bodies: number arrays read in chunks, numpy outputs written directly
        # the edge's OIP gRPC: grpcio plus KServe's generated service_pb2 / service_pb2_grpc, which tritonclient ships
        "tritonclient[grpc]>=2.40",
    ],
    # `cluster bench --http`: the load generator's HTTP client.
    "bench": [
        "httpx>=0.27",
    ],
}

# The README's test command (scripts/run-tests.sh): `pip install -e '.[test]'`.
TEST = [
    "pytest>=7",
    "pytest-timeout>=2",
    "hypothesis>=6",
    "psutil>=5",
    "playwright>=1.40",
    "tritonclient[http]>=2.40",
    "kubernetes-validate>=1.28",  # tests/test_kubernetes.py: the Kubernetes API schemas, offline
    "cryptography>=42",  # tests/test_edge_security.py and the gRPC TLS tests: a CA and certificates
    "scikit-learn>=1.3",  # tests/test_digits_data.py: the packaged digits data and split against scikit-learn's
    "scipy>=1.10",  # tests/test_canary_cluster.py: binomial bounds (scikit-learn brings it too)
    "ruff>=0.17.6,<0.18",  # `ruff check .` and `ruff format --check .` in CI (constraints.lock pins it)
]


# What the two distributions share besides their requirements: one version for both, the same files.
DISTRIBUTION = {
    "version": "0.1.0",
    "python_requires": ">=3.10",
    "package_data": {"cluster": ["data/*"]},  # the digits demo model's data set, its split and its licence
    "data_files": [("share/torch-serving-cluster", ["frontend.html"])],  # the page the edge serves at /
    "entry_points": {"console_scripts": ["cluster=cluster.cli:main"]},
}


def every_role() -> list[str]:
    """CORE and every role's requirements: what the full install (`setup.py`, `[all]` of the slim one) needs."""
    return CORE + [requirement for role in ROLES.values() for requirement in role]


def missing(*roles: str) -> list[str]:
    """The requirements of these roles whose distribution is not installed here (as dependencies.py writes them,
    without markers), so a command can name them before an ImportError would. A requirement with an environment
    marker (uvloop) is left out: it may not apply on this platform."""
    import importlib.metadata
    import re

    absent = []
    for role in roles:
        for requirement in ROLES[role]:
            text, _, marker = requirement.partition(";")
            if marker:
                continue
            name = re.match(r"[A-Za-z0-9._-]+", text).group()
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                absent.append(text.strip())
    return absent
