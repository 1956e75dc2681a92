from setuptools import find_packages, setup

setup(
    name="torch-serving-cluster",
    version="0.1.0",
    description="A model-serving cluster for PyTorch over a ZeroMQ bus, with an Open Inference Protocol HTTP edge.",
    python_requires=">=3.10",
    packages=find_packages(include=["cluster", "cluster.*", "edge", "edge.*"]),
    install_requires=[
        "torch>=2.1",  # kept open for GPU users; README and CI pin the CPU build with constraints.txt
        "numpy>=1.24",
        "pyzmq>=25",
        "msgpack>=1.0",
        "typer>=0.9",
        "rich>=13",
        "scikit-learn>=1.3",  # the digits demo model's data set
        "Pillow>=10",  # the built-in image decode of a BYTES input (config `decode`: JPEG, PNG)
        "fastapi>=0.110",
        "fastapi-offline>=1.7",  # /docs and /redoc with Swagger UI and ReDoc served by the edge, not from a CDN
        "uvicorn>=0.27",
        # the edge's event loop and HTTP parser, faster than asyncio's and h11 (what uvicorn[standard] brings;
        # uvicorn's "auto" picks them when present)
        "uvloop>=0.19; sys_platform != 'win32'",
        "httptools>=0.6",
        "prometheus_client>=0.19",
        "httpx>=0.27",  # `cluster bench --http`: the load generator's HTTP client
        "pydantic>=2",
        "orjson>=3.10",  # the edge's large JSON bodies: number arrays read in chunks, numpy outputs written directly
        # the edge's OIP gRPC: grpcio plus KServe's generated service_pb2 / service_pb2_grpc, which tritonclient ships
        "tritonclient[grpc]>=2.40",
    ],
    extras_require={
        "test": [
            "pytest>=7",
            "pytest-timeout>=2",
            "hypothesis>=6",
            "psutil>=5",
            "playwright>=1.40",
            "tritonclient[http]>=2.40",
            "kubernetes-validate>=1.28",  # tests/test_kubernetes.py: the Kubernetes API schemas, offline
            "cryptography>=42",  # tests/test_edge_security.py and the gRPC TLS tests: a CA and certificates
            "ruff>=0.17.6,<0.18",  # `ruff check .` and `ruff format --check .` in CI (constraints.txt pins it)
        ],
    },
    data_files=[("share/torch-serving-cluster", ["frontend.html"])],  # the page the edge serves at /
    entry_points={"console_scripts": ["cluster=cluster.cli:main"]},
)
