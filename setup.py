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
    description="A model-serving cluster for PyTorch over a ZeroMQ bus, with an Open Inference Protocol HTTP edge.",
    packages=find_packages(include=["cluster", "cluster.*", "edge", "edge.*"]),
    install_requires=DEPENDENCIES["every_role"](),
    extras_require={"test": DEPENDENCIES["TEST"]},
    **DEPENDENCIES["DISTRIBUTION"],
)
