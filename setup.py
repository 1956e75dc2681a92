"""The full install (`pip install .`, the README's first command): every role, `cluster up` included. For one role
without the others' packages (an edge or broker node without torch) see slim/setup.py; the lists live in
cluster/dependencies.py."""

import runpy
from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).resolve().parent
DEPENDENCIES = runpy.run_path(str(HERE / "cluster" / "dependencies.py"))

setup(
    name="torch-serving-cluster",
    version="0.1.0",
    description="A model-serving cluster for PyTorch over a ZeroMQ bus, with an Open Inference Protocol HTTP edge.",
    python_requires=">=3.10",
    packages=find_packages(include=["cluster", "cluster.*", "edge", "edge.*"]),
    package_data={"cluster": ["data/*"]},  # the digits demo model's data set and its licence
    install_requires=DEPENDENCIES["every_role"](),
    extras_require={"test": DEPENDENCIES["TEST"]},
    data_files=[("share/torch-serving-cluster", ["frontend.html"])],  # the page the edge serves at /
    entry_points={"console_scripts": ["cluster=cluster.cli:main"]},
)
